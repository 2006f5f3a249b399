"""End to end on the tiny profile: Snakemake runs the DAG, tables and MLflow runs appear
(checked through a real `mlflow server` on 127.0.0.1), and a params edit reruns exactly the
stages that read it, under Snakemake and under DVC. The table check itself
(check_table_cells) is tested fast, on hand-made tables."""
import json
import math
import os
import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.conftest import BIN, TINY


def run(*cmd, check=True, timeout=600):
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{cmd} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def smk(*args, **kw):
    return run(BIN / "snakemake", "--snakefile", "workflow/Snakefile", "--cores", "2", *args, **kw)


def planned_jobs(out: str) -> set[str]:
    """Rule names from a dry run's 'Job stats' table."""
    jobs, in_table = set(), False
    for line in out.splitlines():
        if line.startswith("job ") or line.startswith("job\t"):
            in_table = True
            continue
        if in_table:
            parts = line.split()
            if not parts or parts[0] == "total":
                break
            if not parts[0].startswith("-"):
                jobs.add(parts[0])
    return jobs - {"all"}


# -- the tables: every reproduced cell is its metrics file's number, every verdict a verdict --
PERCENT = {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"}
VERDICT = re.compile(r"(yes|no) \(.+\)|inconclusive: .+, within the seed spread [-+0-9.e]+|not run \(\w+\)")
NO_VALUE = object()  # the row's metrics file does not exist


def cell(v) -> str:
    """A number as the tables print it: 2 decimals from 1 up, 3 significant digits below 1,
    integers as they are, "—" for none (or NaN: a COCO area bucket without ground truth)."""
    if v is None or v is NO_VALUE or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if isinstance(v, float):
        return f"{v:.2f}" if abs(v) >= 1 else f"{v:.3g}"
    return str(v)


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
    stats = json.loads(path.read_text())["stats"]
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


def check_table_cells(table_text: str, metrics_dir: Path, spec: dict, source: str | None = None) -> dict[str, str]:
    """Check a report table (markdown) cell by cell against the metrics files and the paper
    spec (``reporting/paper`` YAML table): paper = the YAML number, reproduced = the metrics
    file's number, delta = their difference, each as the table prints it; the verdict is a
    verdict (yes / no / inconclusive / not run / reference row, "; "-joined) where the row
    claims something on that metric and "—" where it does not; every metric the metrics
    file has for a listed row has its line. Seed rows: the mean over the seeds' files. ``source``: eval (default), flops (default for
    ``kind: flops`` tables) or speed. Returns label -> row key of the rows whose metrics
    file exists. AssertionError names the first wrong cell."""
    source = source or ("flops" if spec.get("kind") == "flops" else "eval")
    lines = table_text.splitlines()
    assert lines and lines[0] == f"# {spec['title']}", f"not the table {spec['title']!r}: {lines[:1]}"
    header = "| model | metric | paper | reproduced | delta | claim holds at this scale |"
    assert header in lines, "no table header"
    body = []
    for line in lines[lines.index(header) + 2:]:
        if not line.startswith("| "):
            break
        parts = line[2:-2].split(" | ")
        assert len(parts) == 6 and line.endswith(" |"), f"malformed table line: {line}"
        body.append(parts)
    assert body, "the table has no rows"
    by_label = {}
    for key, row in spec["rows"].items():
        label = row.get("label", key)
        assert label not in by_label, f"two rows labelled {label!r}"
        by_label[label] = key
    seen, found = set(), {}
    for label, metric, paper, repro, delta, verdict in body:
        where = f"{label} / {metric}"
        assert (label, metric) not in seen, f"{where}: listed twice"
        seen.add((label, metric))
        key = by_label.get(label, label)  # an experiment without a paper row is labelled by its name
        row = spec["rows"].get(key, {})
        assert metric in spec["metrics"], f"{where}: not a metric of the table"
        want = row_value(metrics_dir, source, spec, key, metric)
        if want is NO_VALUE:
            assert key in spec["rows"], f"{where}: neither a paper row nor an experiment with metrics"
        else:
            found[label] = key
        assert paper == cell(row.get(metric)), f"{where}: paper cell {paper!r}, the YAML says {cell(row.get(metric))!r}"
        assert repro == cell(want), f"{where}: reproduced cell {repro!r}, the metrics file says {cell(want)!r}"
        both = row.get(metric) is not None and cell(want) != "—"
        assert delta == (cell(want - row[metric]) if both else "—"), f"{where}: delta cell {delta!r}"
        kind = claimed(row, metric)
        if kind == "reference":
            assert verdict == "reference row", f"{where}: a reference row, verdict {verdict!r}"
        elif kind is None:
            assert verdict == "—", f"{where}: no claim on this metric, verdict {verdict!r}"
        elif verdict == "not run":
            assert repro == "—", f"{where}: verdict 'not run' but a reproduced number {repro}"
        else:
            assert all(VERDICT.fullmatch(v) for v in verdict.split("; ")), f"{where}: not a verdict: {verdict!r}"
    for label, key in found.items():  # nothing the metrics file has is left out
        for metric in spec["metrics"]:
            if cell(row_value(metrics_dir, source, spec, key, metric)) != "—":
                assert (label, metric) in seen, f"{label} / {metric}: in the metrics file, missing from the table"
    return found


def write_eval(metrics_dir: Path, name: str, stats: dict) -> None:
    (metrics_dir / name).mkdir(parents=True, exist_ok=True)
    (metrics_dir / name / "eval.json").write_text(json.dumps({"stats": stats, "provenance": {"git": {}}}))


HAND_SPEC = {"title": "Hand-made table", "metrics": ["AP", "APs", "gflops_encoder", "encoder_tokens"],
             "rows": {"base": {"label": "Base", "AP": 43.3, "claims": ["reference"]},
                      "cut": {"label": "Cut (L=16)", "AP": 37.1, "claims": [{"metric": "AP", "max_drop": 1.4, "vs": "base"},
                                                                            {"metric": "gflops_encoder", "lower": "base"}]}}}
# What render_markdown prints for HAND_SPEC and hand_metrics (compared once with its output),
# without the lines under the table.
HAND_TABLE = """# Hand-made table

| model | metric | paper | reproduced | delta | claim holds at this scale |
|---|---|---|---|---|---|
| Base | AP | 43.30 | 31.25 | -12.05 | reference row |
| Base | APs | — | — | — | reference row |
| Base | gflops_encoder | — | 0.0123 | — | reference row |
| Base | encoder_tokens | — | 64.00 | — | reference row |
| Cut (L=16) | AP | 37.10 | 30.00 | -7.10 | yes (drop 1.25 vs base, allowed 1.4) |
| Cut (L=16) | APs | — | — | — | — |
| Cut (L=16) | gflops_encoder | — | 0.008 | — | yes (-0.0043 vs base) |
| Cut (L=16) | encoder_tokens | — | 64.00 | — | — |
| extra_run | AP | — | 12.50 | — | — |

**Protocol.** by hand
"""


def hand_metrics(tmp_path: Path) -> Path:
    """eval.json as the eval stage writes it: AP as a fraction, NaN for an empty area bucket."""
    m = tmp_path / "metrics"
    write_eval(m, "base", {"AP": 0.3125, "APs": float("nan"), "gmacs_encoder": 0.0123, "encoder_tokens": 64.0})
    write_eval(m, "cut", {"AP": 0.3, "APs": float("nan"), "gmacs_encoder": 0.008, "encoder_tokens": 64.0})
    write_eval(m, "extra_run", {"AP": 0.125})
    return m


def test_table_check_accepts_a_correct_table(tmp_path):
    """The hand-made table agrees cell by cell with the hand-written eval.json files."""
    found = check_table_cells(HAND_TABLE, hand_metrics(tmp_path), HAND_SPEC)
    assert found == {"Base": "base", "Cut (L=16)": "cut", "extra_run": "extra_run"}


@pytest.mark.parametrize("old, new, why", [
    ("| Base | AP | 43.30 | 31.25 |", "| Base | AP | 43.30 | — |", "reproduced cell"),  # "—" everywhere passed before
    ("| Cut (L=16) | AP | 37.10 | 30.00 | -7.10 |", "| Cut (L=16) | AP | 37.10 | 30.01 | -7.09 |", "reproduced cell"),
    ("| extra_run | AP | — | 12.50 |", "| extra_run | AP | — | 0.125 |", "reproduced cell"),  # a fraction, not percent
    ("| Cut (L=16) | gflops_encoder | — | 0.008 |", "| Cut (L=16) | gflops_encoder | — | 0.0123 |", "reproduced cell"),
    ("| Base | AP | 43.30 |", "| Base | AP | 43.3 |", "paper cell"),
    ("| 37.10 | 30.00 | -7.10 |", "| 37.10 | 30.00 | 7.10 |", "delta cell"),
    ("| yes (drop 1.25 vs base, allowed 1.4) |", "| — |", "verdict"),  # a claimed metric left empty
    ("| yes (-0.0043 vs base) |", "| maybe |", "not a verdict"),
    ("| encoder_tokens | — | 64.00 | — | — |", "| encoder_tokens | — | 64.00 | — | yes (+0 vs base) |", "no claim"),
    ("| Base | encoder_tokens | — | 64.00 | — | reference row |\n", "", "missing from the table"),
    ("| extra_run |", "| extra_runs |", "neither a paper row"),
])
def test_table_check_fails_on_a_wrong_cell(tmp_path, old, new, why):
    """Each edit of the correct table is a report bug the end-to-end test must catch."""
    assert old in HAND_TABLE
    with pytest.raises(AssertionError, match=why):
        check_table_cells(HAND_TABLE.replace(old, new, 1), hand_metrics(tmp_path), HAND_SPEC)


def test_table_check_reads_flops_and_speed_files(tmp_path):
    """flops.json: gflops = gmacs.total, gflops_<part> = gmacs[part]; speed.json: speedup =
    dense ms / the row's ms."""
    m = tmp_path / "metrics"
    m.mkdir()
    (m / "flops.json").write_text(json.dumps({"models": {"a_r50": {"gmacs": {"total": 81.245, "encoder": 8.9},
                                                                    "params_m": 41.3}}}))
    (m / "speed.json").write_text(json.dumps({"results": {"dense": {"ms": 1.5, "score_mb": 0.5},
                                                          "act": {"ms": 3.0, "score_mb": 0.25}}}))
    flops_spec = {"title": "F", "kind": "flops", "metrics": ["gflops", "gflops_encoder", "params_m"],
                  "rows": {"a_r50": {"label": "A", "gflops": 86, "claim": {"rel_tol": 0.1}},
                           "b_r50": {"label": "B", "gflops": 187, "claim": {"rel_tol": 0.1}}}}
    flops_table = ("# F\n\n| model | metric | paper | reproduced | delta | claim holds at this scale |\n"
                   "|---|---|---|---|---|---|\n"
                   "| A | gflops | 86 | 81.25 | -4.75 | yes (-5.5%, tolerance ±10%) |\n"
                   "| A | gflops_encoder | — | 8.90 | — | — |\n"
                   "| A | params_m | — | 41.30 | — | — |\n"
                   "| B | gflops | 187 | — | — | not run |\n")
    assert check_table_cells(flops_table, m, flops_spec) == {"A": "a_r50"}
    with pytest.raises(AssertionError, match="reproduced cell"):
        check_table_cells(flops_table.replace("| 81.25 |", "| 8.90 |"), m, flops_spec)
    speed_spec = {"title": "S", "metrics": ["ms", "speedup", "score_mb"],
                  "rows": {"dense": {"claims": ["reference"]},
                           "act": {"label": "ACT", "claims": [{"metric": "ms", "lower": "dense"}]}}}
    speed_table = ("# S\n\n| model | metric | paper | reproduced | delta | claim holds at this scale |\n"
                   "|---|---|---|---|---|---|\n"
                   "| dense | ms | — | 1.50 | — | reference row |\n| dense | speedup | — | 1.00 | — | reference row |\n"
                   "| dense | score_mb | — | 0.5 | — | reference row |\n| ACT | ms | — | 3.00 | — | no (+1.50 vs dense) |\n"
                   "| ACT | speedup | — | 0.5 | — | — |\n| ACT | score_mb | — | 0.25 | — | — |\n")
    assert check_table_cells(speed_table, m, speed_spec, "speed") == {"dense": "dense", "ACT": "act"}
    with pytest.raises(AssertionError, match="reproduced cell"):
        check_table_cells(speed_table.replace("| ACT | speedup | — | 0.5 |", "| ACT | speedup | — | 2.00 |"),
                          m, speed_spec, "speed")


def test_table_check_averages_seed_rows(tmp_path):
    """A row over seeds shows their mean; <metric>_sd their sample sd (AP 30 and 34 -> 32.00,
    sd 2 * sqrt(2) = 2.83), <metric>_gain the row's mean minus its gain_vs row's (36 - 32)."""
    m = tmp_path / "metrics"
    for name, ap in (("s1", 0.30), ("s2", 0.34), ("d1", 0.35), ("d2", 0.37)):
        write_eval(m, name, {"AP": ap, "gmacs_total": 1.5})
    spec = {"title": "Seeds", "metrics": ["AP", "AP_sd", "AP_gain", "gflops_total"], "rows": {
        "base": {"label": "Student (2 seeds)", "seeds": ["s1", "s2"], "claims": ["reference"]},
        "kd": {"label": "Student + KD (2 seeds)", "seeds": ["d1", "d2"], "gain_vs": "base", "AP_gain": 2.2,
               "claims": [{"metric": "AP", "beyond_spread": "base"}, {"metric": "gflops_total", "equal": "base"}]}}}
    table = """# Seeds

| model | metric | paper | reproduced | delta | claim holds at this scale |
|---|---|---|---|---|---|
| Student (2 seeds) | AP | — | 32.00 | — | reference row |
| Student (2 seeds) | AP_sd | — | 2.83 | — | reference row |
| Student (2 seeds) | gflops_total | — | 1.50 | — | reference row |
| Student + KD (2 seeds) | AP | — | 36.00 | — | no (+4.00 vs base, seed spread 4.24) |
| Student + KD (2 seeds) | AP_sd | — | 1.41 | — | — |
| Student + KD (2 seeds) | AP_gain | 2.20 | 4.00 | 1.80 | — |
| Student + KD (2 seeds) | gflops_total | — | 1.50 | — | yes (+0.00 vs base) |
"""
    assert check_table_cells(table, m, spec) == {"Student (2 seeds)": "base", "Student + KD (2 seeds)": "kd"}
    for old, new in (("| AP_sd | — | 2.83 |", "| AP_sd | — | 2.00 |"),  # population sd, not sample
                     ("| AP | — | 36.00 |", "| AP | — | 35.00 |"),  # the first seed, not the mean
                     ("| 2.20 | 4.00 | 1.80 |", "| 2.20 | 36.00 | 33.80 |")):  # the mean, not the gain
        with pytest.raises(AssertionError, match="reproduced cell"):
            check_table_cells(table.replace(old, new), m, spec)


def start_mlflow_server(store_uri: str, log: Path, timeout: float = 120) -> tuple[subprocess.Popen, str]:
    """`mlflow server --port 0`: the server binds a free port itself and uvicorn logs it
    ("Uvicorn running on http://127.0.0.1:PORT"); read back from its log. No port is picked
    here and released for the server to take later, so no other process can take it first."""
    with open(log, "w") as out:
        proc = subprocess.Popen([str(BIN / "mlflow"), "server", "--backend-store-uri", store_uri,
                                 "--host", "127.0.0.1", "--port", "0", "--workers", "1"],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    t0 = time.time()
    while time.time() - t0 < timeout and proc.poll() is None:
        found = re.search(r"Uvicorn running on (http://127\.0\.0\.1:(\d+))", log.read_text())
        if found and int(found.group(2)) > 0:
            return proc, found.group(1)
        time.sleep(0.2)
    state = "still starting" if proc.poll() is None else f"exited with {proc.returncode}"
    if proc.poll() is None:
        os.killpg(proc.pid, 9)
    raise AssertionError(f"mlflow server logged no port after {time.time() - t0:.0f}s ({state}); log:\n"
                         f"{log.read_text()[-2000:]}")


def search_runs(base: str, experiment: str) -> list[dict]:
    with urllib.request.urlopen(f"{base}/api/2.0/mlflow/experiments/get-by-name?experiment_name={experiment}") as r:
        exp_id = json.load(r)["experiment"]["experiment_id"]
    req = urllib.request.Request(f"{base}/api/2.0/mlflow/runs/search", method="POST",
                                 data=json.dumps({"experiment_ids": [exp_id], "max_results": 1000}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req) as r:
        return json.load(r).get("runs", [])


@pytest.fixture
def mlflow_server(workdir):
    """Call it to start `mlflow server` on the test's store and get its URL once healthy.

    Started after the DAG, not beside it: a server that finds no store creates the schema
    itself, racing the DAG's own initialisation of the same sqlite file. Its output goes to
    mlflow_server.log, quoted when it does not come up."""
    procs = []

    def start() -> str:
        log = workdir / "mlflow_server.log"
        proc, base = start_mlflow_server(os.environ["MLFLOW_TRACKING_URI"], log)
        procs.append(proc)
        wait_healthy(base, proc, log)
        return base

    try:
        yield start
    finally:
        for proc in procs:
            os.killpg(proc.pid, 9)


def wait_healthy(base, proc, log, timeout=60):
    t0 = time.time()
    while time.time() - t0 < timeout and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    state = "still starting" if proc.poll() is None else f"exited with {proc.returncode}"
    tail = log.read_text()[-2000:]
    raise AssertionError(f"mlflow server not healthy after {time.time() - t0:.0f}s ({state}); log:\n{tail}")


# The tiny DAG's tables: which rows have metrics files (the others carry paper numbers only).
TINY_TABLES = {
    "act_main": ("eval", {"detr_dc5", "detr_dc5_wide", "act_L32", "act_L16", "act_mtkd_L16"}),
    "act_kmeans": ("eval", {"act_L32", "act_L16", "act_kmeans_L16"}),
    "sparse_main": ("eval", {"deformable_detr_topk", "sparse_detr_rho0p3"}),
    "act_speed": ("speed", {"dense", "act_L32", "act_L16"}),
    "flops": ("flops", {"detr_r50"}),
    "sparse_flops": ("flops", {"sparse_detr_r50_rho0p1"}),
    "lite_flops": ("flops", {"lite_h3l1_2x3_r50"}),
}


@pytest.mark.slow
def test_tiny_dag_end_to_end(workdir, mlflow_server):
    shutil.copy(TINY, workdir / "params.yaml")
    t0 = time.time()
    smk("all")
    print(f"[tiny DAG] {time.time() - t0:.0f} s")  # a figure, not a check: the machines are shared

    table = (workdir / "reports/tables/act_main.md").read_text()
    assert "| DETR-DC5 | AP | 43.30 |" in table and "MLflow run" in table
    assert "detr_dc5_wide" in table
    flops = (workdir / "reports/tables/flops.csv").read_text().splitlines()
    assert flops[0].startswith("model,metric,paper,reproduced,delta")
    assert (workdir / "reports/README.md").exists()
    assert (workdir / "reports/figures/detr_dc5_training.png").stat().st_size > 1000
    ev = json.loads((workdir / "reports/metrics/detr_dc5/eval.json").read_text())
    assert 0.0 <= ev["stats"]["AP"] <= 1.0 and ev["stats"]["gmacs_total"] > 0
    # ACT: the swap evaluates the teacher's weights, counts prototypes per layer, and
    # every ACT table and figure is written.
    act16 = json.loads((workdir / "reports/metrics/act_L16/eval.json").read_text())["stats"]
    act32 = json.loads((workdir / "reports/metrics/act_L32/eval.json").read_text())["stats"]
    assert 1 <= act16["prototypes_layer0"] <= act32["prototypes_layer0"] <= act16["encoder_tokens"]
    assert act16["gmacs_encoder"] <= act32["gmacs_encoder"]
    assert "| ACT (L=16) | AP | 37.10 |" in table and "| ACT+MTKD (L=16) | AP |" in table
    for name in ("act_kmeans", "act_speed"):
        assert "MLflow run" in (workdir / f"reports/tables/{name}.md").read_text()
    assert (workdir / "reports/figures/prototypes_per_layer.png").stat().st_size > 1000
    # Deformable / Sparse DETR: sparse encoder keeps fewer tokens and costs less; FPS measured;
    # the Sparse DETR tables (main, paper-scale FLOPs) and the AP-vs-GFLOPs figure exist.
    sp = json.loads((workdir / "reports/metrics/sparse_detr_rho0p3/eval.json").read_text())["stats"]
    dd = json.loads((workdir / "reports/metrics/deformable_detr_topk/eval.json").read_text())["stats"]
    assert sp["encoder_kept_tokens"] < sp["encoder_tokens"] == dd["encoder_tokens"]
    assert sp["gmacs_encoder"] < dd["gmacs_encoder"] and sp["fps_b1"] > 0
    sparse_table = (workdir / "reports/tables/sparse_main.md").read_text()
    assert "| Sparse DETR (rho=0.3) | AP | 46.00 |" in sparse_table
    assert "sparse_detr_r50_rho0p1" in (workdir / "reports/metrics/flops.json").read_text()
    assert "[[72, 88]]" in (workdir / "reports/tables/sparse_flops.md").read_text()
    assert (workdir / "reports/figures/sparse_ap_vs_gflops.png").stat().st_size > 1000
    # Every table, cell by cell: reproduced = its metrics file, verdicts are verdicts.
    from effdetr.reporting.paper import load_paper_tables
    specs = load_paper_tables()
    assert {p.stem for p in (workdir / "reports/tables").glob("*.md")} == set(TINY_TABLES)
    for tid, (source, run_rows) in TINY_TABLES.items():
        text = (workdir / f"reports/tables/{tid}.md").read_text()
        found = check_table_cells(text, workdir / "reports/metrics", specs[tid], source)
        assert set(found.values()) == run_rows, tid

    # Every stage left an MLflow run, visible through a real server.
    server = mlflow_server()
    runs = search_runs(server, "effdetr-test")
    stages_logged = sorted(next(t["value"] for t in r["data"]["tags"] if t["key"] == "stage") for r in runs)
    assert stages_logged == sorted(["data", "pretrain"] + ["train"] * 5 + ["eval"] * 8 + ["speed", "flops", "report"])
    train_run = next(r for r in runs if r["info"]["run_name"] == "train-detr_dc5")
    keys = {m["key"] for m in train_run["data"]["metrics"]}
    assert "train_loss" in keys
    tags = {t["key"]: t["value"] for t in train_run["data"]["tags"]}
    assert {"paper", "table", "git_sha", "git_dirty", "params_hash"} <= set(tags)

    # Up to date: nothing planned (how long a dry run takes is `effdetr bench dag`'s figure).
    assert planned_jobs(smk("-n").stdout) == set()

    # DVC records the state, then a one-experiment edit touches only that experiment's stages.
    run("git", "init", "-q")
    run(BIN / "dvc", "init", "-q")
    run(BIN / "effdetr", "dag", "dvc", "--out", "dvc.yaml")
    run(BIN / "dvc", "commit", "-f", "-q")
    assert "up to date" in run(BIN / "dvc", "status").stdout.lower()

    params = yaml.safe_load((workdir / "params.yaml").read_text())
    params["experiments"]["detr_dc5_wide"]["overrides"]["model"]["hidden_dim"] = 40
    (workdir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert planned_jobs(smk("-n").stdout) == {"train_detr_dc5_wide", "eval_detr_dc5_wide", "report"}
    status = run(BIN / "dvc", "status", "--json").stdout
    assert set(json.loads(status)) == {"train_detr_dc5_wide", "eval_detr_dc5_wide", "report"}

    before = (workdir / "data/checkpoints/detr_dc5.pt").stat().st_mtime_ns
    smk("all")
    assert (workdir / "data/checkpoints/detr_dc5.pt").stat().st_mtime_ns == before
    assert planned_jobs(smk("-n").stdout) == set()


@pytest.mark.slow
def test_mlflow_sync_reimports_lost_runs(workdir):
    shutil.copy(TINY, workdir / "params.yaml")
    run(BIN / "effdetr", "data", "synth", "--out", "data/synthcoco")
    db = workdir / "mlruns" / "mlflow.db"
    assert db.exists()
    db.unlink()
    out = run(BIN / "effdetr", "mlflow", "sync").stdout
    assert "re-imported 1 runs" in out
    from mlflow.tracking import MlflowClient
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("effdetr-test")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1 and runs[0].data.metrics["train_images"] == 48
    assert "re-imported 0 runs" in run(BIN / "effdetr", "mlflow", "sync").stdout
