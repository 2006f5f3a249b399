"""The suite itself: no test may assert wall-clock time (the machines are shared and noisy;
speed figures belong in `effdetr bench dag` and the other benchmarks, which print them)."""
import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent
CLOCKS = {"time", "perf_counter", "monotonic", "process_time", "perf_counter_ns", "monotonic_ns", "time_ns"}


def _reads_clock(node: ast.AST) -> bool:
    """True when the expression calls time.time() / perf_counter() / ... or uses a name that
    was assigned from such a call (``elapsed = time.time() - t0``)."""
    for sub in ast.walk(node):
        if isinstance(sub, ast.Call):
            f = sub.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            if name in CLOCKS:
                return True
    return False


def timing_asserts(source: str) -> list[int]:
    """Lines of ``assert`` statements holding an ordering comparison (<, >, ...) of a clock
    reading, made directly or through a variable assigned from one."""
    tree = ast.parse(source)
    timed = {t.id for n in ast.walk(tree) if isinstance(n, ast.Assign) and _reads_clock(n.value)
             for t in n.targets if isinstance(t, ast.Name)}
    lines = []
    for n in ast.walk(tree):
        if isinstance(n, ast.Assert):
            for cmp in (c for c in ast.walk(n.test) if isinstance(c, ast.Compare)):
                ordered = any(isinstance(op, (ast.Lt, ast.LtE, ast.Gt, ast.GtE)) for op in cmp.ops)
                names = {s.id for s in ast.walk(cmp) if isinstance(s, ast.Name)}
                if ordered and (_reads_clock(cmp) or names & timed):
                    lines.append(n.lineno)
                    break
    return lines


def test_detector_finds_timing_asserts():
    src = ("import time\nt0 = time.time()\nassert time.time() - t0 < 30\n"
           "elapsed = time.perf_counter() - t0\nassert elapsed < 180\nassert t0 is not None\n")
    assert timing_asserts(src) == [3, 5]


def test_no_test_asserts_wall_clock_time():
    found = {f"{p.name}:{line}" for p in sorted(TESTS.glob("*.py")) if p.name != Path(__file__).name
             for line in timing_asserts(p.read_text())}
    assert not found, f"tests asserting wall-clock time (print the figure instead): {sorted(found)}"
