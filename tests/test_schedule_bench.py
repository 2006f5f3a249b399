"""The DAG replay that `effdetr bench schedule` prints: greedy list scheduling by priority."""
from effdetr import stages
from effdetr.evaluation.schedule_bench import downstream_counts, replay


def _stage(name, seconds, deps=(), heavy=False):
    return stages.Stage(name, [], [], deps=list(deps), outs=[f"{name}.out"], heavy=heavy), seconds


def test_a_long_chain_first_beats_many_short_children_first():
    """Two cores. A (10 s) -> B (10 s) is the long chain; C and H (2 s) each unblock three 1-s
    jobs. By downstream count C and H start first and A only at 2 s (done at 22 s); by the work
    to the end A starts at once and the short jobs fill the other core (20 s)."""
    rows = [_stage("A", 10), _stage("B", 10, ["A.out"]), _stage("C", 2), _stage("H", 2)]
    rows += [_stage(f"D{i}", 1, ["C.out"]) for i in range(3)] + [_stage(f"I{i}", 1, ["H.out"]) for i in range(3)]
    table = [st for st, _ in rows]
    seconds = {st.name: s for st, s in rows}
    by_count = downstream_counts(table)
    assert by_count["C"] == 3 and by_count["A"] == 1
    work = {"A": 20, "B": 10, "C": 3, "H": 3} | {n: 1 for n in seconds if n[0] in "DI"}
    assert replay(table, seconds, by_count, cores=2) == 22
    assert replay(table, seconds, work, cores=2) == 20


def test_a_heavy_stage_takes_every_core():
    rows = [_stage("P", 5, heavy=True), _stage("x", 3), _stage("y", 3)]
    table = [st for st, _ in rows]
    seconds = {st.name: s for st, s in rows}
    # P first (highest priority) alone on both cores, then x and y side by side
    assert replay(table, seconds, {"P": 9, "x": 1, "y": 1}, cores=2) == 8
    # x and y first, side by side, then P
    assert replay(table, seconds, {"P": 0, "x": 1, "y": 1}, cores=2) == 8
    assert replay(table, seconds, {"P": 0, "x": 1, "y": 1}, cores=4) == 5 + 3
