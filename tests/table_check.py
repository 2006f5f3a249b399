"""An independent check of a report table: every cell against the raw metrics files and the
paper YAML, read and formatted here without the reporting code (only the metric display
names are shared: presentation, not numbers). Used by the tiny DAG test and tested on
hand-made tables in tests/test_pipeline.py."""
import json
import math
import re
from pathlib import Path

PERCENT = {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"}
VERDICT = re.compile(r"(yes|no) \(.+\)|inconclusive: .+, within the seed spread [-+0-9.e]+|not run( \(\w+\))?")
NO_VALUE = object()  # the row's metrics file does not exist


def cell(v) -> str:
    """A number as the tables print it: 2 decimals from 0.1 up (and 0), 3 significant digits
    below, integers as they are, "—" for none (or NaN: a COCO area bucket without ground truth)."""
    if v is None or v is NO_VALUE or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if isinstance(v, float):
        return f"{v:.2f}" if round(abs(v), 2) >= 0.1 or v == 0 else f"{v:.3g}"
    return str(v)


def change(v) -> str:
    return "±0" if v == 0 else ("+" if v > 0 else "-") + cell(abs(float(v)))


def reproduced_value(metrics_dir: Path, source: str, key: str, metric: str):
    """The number a row's reproduced cell must show, read from the stage's own output file:
    eval.json stats (AP/AR as percent, gflops_<part> = gmacs_<part>), flops.json, speed.json."""
    if source == "flops":
        path = metrics_dir / "flops.json"
        m = json.loads(path.read_text())["models"].get(key) if path.exists() else None
        if m is None:
            return NO_VALUE
        if metric == "gflops" or metric.startswith("gflops_"):
            return m["gmacs"].get(metric.removeprefix("gflops").removeprefix("_") or "total")
        return m.get(metric)
    if source == "speed":
        path = metrics_dir / "speed.json"
        results = json.loads(path.read_text())["results"] if path.exists() else {}
        if key not in results:
            return NO_VALUE
        if metric == "speedup":
            return results["dense"]["ms"] / results[key]["ms"]
        return results[key].get(metric)
    path = metrics_dir / key / "eval.json"
    if not path.exists():
        return NO_VALUE
    stats = json.loads(path.read_text())
    if metric in PERCENT:
        return None if stats.get(metric) is None else 100 * stats[metric]
    if metric.startswith("gflops_"):
        return stats.get("gmacs_" + metric.removeprefix("gflops_"))
    if metric == "train_seconds":
        train = metrics_dir / key / "train.json"
        return json.loads(train.read_text())["train_seconds"] if train.exists() else None
    return stats.get(metric)


def row_value(metrics_dir: Path, source: str, spec: dict, key: str, metric: str):
    """A table row's number: one experiment's (reproduced_value), or for a row with ``seeds``
    the mean over its seeds (``<metric>_sd``: their sample standard deviation), and
    ``<metric>_gain`` = the row's minus its ``gain_vs`` row's."""
    row = spec["rows"].get(key, {})
    if metric.endswith("_gain"):
        if "gain_vs" not in row:
            return None if row_value(metrics_dir, source, spec, key, metric[:-5]) is not NO_VALUE else NO_VALUE
        mine, base = (row_value(metrics_dir, source, spec, k, metric[:-5]) for k in (key, row["gain_vs"]))
        if mine is NO_VALUE:
            return NO_VALUE
        return mine - base if isinstance(mine, float) and isinstance(base, (int, float)) else None
    if not row.get("seeds"):
        value = reproduced_value(metrics_dir, source, key, metric.removesuffix("_sd"))
        return None if metric.endswith("_sd") and value is not NO_VALUE else value  # one run: no sd
    values = [reproduced_value(metrics_dir, source, s, metric.removesuffix("_sd")) for s in row["seeds"]]
    if any(v is NO_VALUE for v in values):
        return NO_VALUE
    if any(v is None for v in values):
        return None
    mean = sum(values) / len(values)
    if not metric.endswith("_sd"):
        return mean
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0


def claimed(row: dict, metric: str) -> str | None:
    """'reference', 'claim' (some claim of the row judges this metric) or None, read from the
    paper YAML's row: a claim without `metric` covers every metric, a tolerance one only
    those with a paper number."""
    claims = row.get("claims", [row["claim"]] if "claim" in row else [])
    if "reference" in claims:
        return "reference"
    for c in claims:
        if c.get("metric", metric) == metric:
            if {"rel_tol", "abs_tol"} & set(c) and "metric" not in c and row.get(metric) is None:
                continue
            return "claim"
    return None


def is_number(v) -> bool:
    return v is not None and v is not NO_VALUE and isinstance(v, (int, float)) and not (
        isinstance(v, float) and math.isnan(v))


def check_table_cells(table_text: str, metrics_dir: Path, spec: dict, source: str | None = None,
                      paper_scale: bool = False) -> dict[str, str]:
    """Check a report table (markdown, the papers' layout) cell by cell: per metric, the paper
    cell is the YAML number and ours the metrics file's; off the paper's scale each shows, in
    parentheses, its change against the row's reference (its ``ref``, else the nearest
    reference row above it), at the paper's scale (or a FLOPs table) ours shows reproduced -
    paper. The claims cell names each judged metric with a verdict, "reference" for a
    reference row, "—" for none. Every row of the YAML the table shows and every metric the
    metrics file has must be there. ``source``: eval (default), flops (default for ``kind:
    flops``) or speed. Returns label -> row key of the rows whose metrics file exists.
    AssertionError names the first wrong cell."""
    from effdetr.reporting.tables import display
    source = source or ("flops" if spec.get("kind") == "flops" else "eval")
    absolute = paper_scale or spec.get("kind") == "flops"
    lines = table_text.splitlines()
    assert lines and lines[0] == f"# {spec['title']}", f"not the table {spec['title']!r}: {lines[:1]}"
    metrics = spec["metrics"]
    header = "| " + " | ".join(["model"] + [f"{display(m)} {s}" for m in metrics for s in ("paper", "ours")]
                              + ["claims"]) + " |"
    assert header in lines, f"no table header {header!r}"
    body = []
    for line in lines[lines.index(header) + 2:]:
        if not line.startswith("| "):
            break
        parts = line[2:-2].split(" | ")
        assert len(parts) == 2 + 2 * len(metrics) and line.endswith(" |"), f"malformed table line: {line}"
        body.append(parts)
    assert body, "the table has no rows"
    by_label = {}
    for key, row in spec["rows"].items():
        label = row.get("label", key)
        assert label not in by_label, f"two rows labelled {label!r}"
        by_label[label] = key
    order = []
    for parts in body:
        label = parts[0].removesuffix(" (reference)")
        assert label not in order, f"{label}: listed twice"
        order.append(label)
    keys = [by_label.get(label, label) for label in order]
    refs = [k for k in keys if "reference" in (spec["rows"].get(k, {}).get("claims")
                                                or [spec["rows"].get(k, {}).get("claim")])]
    found = {}
    for parts, label, key in zip(body, order, keys):
        row = spec["rows"].get(key, {})
        is_ref = key in refs
        assert parts[0] == label + (" (reference)" if is_ref else ""), f"{label}: model cell {parts[0]!r}"
        if row.get("ref"):
            ref = row["ref"]
        else:
            above = [k for k in keys[:keys.index(key) + 1] if k in refs]
            ref = above[-1] if above else (refs[0] if refs else None)
        ref = None if ref == key else ref
        ref_row = spec["rows"].get(ref, {})
        any_value = False
        for i, m in enumerate(metrics):
            where = f"{label} / {m}"
            paper_cell, ours_cell = parts[1 + 2 * i], parts[2 + 2 * i]
            paper = row.get(m)
            want = row_value(metrics_dir, source, spec, key, m)
            if want is NO_VALUE:
                assert key in spec["rows"], f"{where}: neither a paper row nor an experiment with metrics"
            else:
                any_value = True
            relative = not absolute and ref is not None and not m.endswith(("_sd", "_gain"))
            expect_paper = cell(paper)
            if relative and is_number(paper) and is_number(ref_row.get(m)):
                expect_paper += f" ({change(paper - ref_row[m])})"
            assert paper_cell == expect_paper, f"{where}: paper cell {paper_cell!r}, expected {expect_paper!r}"
            expect = cell(want)
            if is_number(want):
                other = row_value(metrics_dir, source, spec, ref, m) if ref else None
                if relative and is_number(other):
                    expect += f" ({change(want - other)})"
                elif absolute and is_number(paper):
                    expect += f" ({change(want - paper)})"
            assert ours_cell == expect, f"{where}: reproduced cell {ours_cell!r}, the metrics file gives {expect!r}"
        if any_value:
            found[label] = key
        verdict = parts[-1]
        claimed_metrics = [m for m in metrics if claimed(row, m) == "claim"]
        if is_ref:
            assert verdict == "reference", f"{label}: a reference row, claims {verdict!r}"
        elif not claimed_metrics:
            assert verdict == "—", f"{label}: no claim, claims cell {verdict!r}"
        else:
            named = re.findall(r"(?:^|; )([^;:]+): ", verdict)
            shown = {display(m): m for m in claimed_metrics}
            assert set(named) == set(shown), f"{label}: claims cell names {named}, claimed {list(shown)}"
            for piece in re.split(r"; (?=[^;:]+: )", verdict):
                name, text = piece.split(": ", 1)
                assert all(VERDICT.fullmatch(v) for v in re.split(r"; (?=yes|no|not run|inconclusive)", text)), \
                    f"{label}: not a verdict: {text!r}"
    for key, row in spec["rows"].items():  # every paper row of this profile is shown
        label = row.get("label", key)
        if not row.get("profiles") and row_value(metrics_dir, source, spec, key, metrics[0]) is not NO_VALUE:
            assert label in order, f"{label}: has metrics, missing from the table"
    return found
