"""End to end on the tiny profile: Snakemake runs the DAG, tables and MLflow runs appear
(checked through a real `mlflow server` on 127.0.0.1), and a params edit reruns exactly the
stages that read it, under Snakemake and under DVC. The table check itself
(check_table_cells) is tested fast, on hand-made tables."""
import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.conftest import BIN, TINY, planned_stages
from tests.table_check import check_table_cells


def run(*cmd, check=True, timeout=600):
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{cmd} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def smk(*args, **kw):
    return run(BIN / "snakemake", "--snakefile", "workflow/Snakefile", "--cores", "2", *args, **kw)


def planned_jobs(out: str) -> set[str]:
    """The stages (dvc.yaml names: train_detr_dc5, table_act_main, ...) a dry run plans."""
    return set(planned_stages(out)) - {"all"}


def write_eval(metrics_dir: Path, name: str, stats: dict) -> None:
    (metrics_dir / name).mkdir(parents=True, exist_ok=True)
    (metrics_dir / name / "eval.json").write_text(json.dumps(stats))  # as the eval stage writes it
    (metrics_dir / name / "eval.provenance.json").write_text(json.dumps({"provenance": {"git": {}}}))


HAND_SPEC = {"title": "Hand-made table", "metrics": ["AP", "APs", "gflops_encoder", "encoder_tokens"],
             "rows": {"base": {"label": "Base", "AP": 43.3, "claims": ["reference"]},
                      "cut": {"label": "Cut (L=16)", "AP": 37.1, "claims": [{"metric": "AP", "max_drop": 1.4, "vs": "base"},
                                                                            {"metric": "gflops_encoder", "lower": "base"}]}}}
# What the report prints for HAND_SPEC and hand_metrics on SynthCOCO (values checked by hand:
# 0.3125 -> 31.25; Cut's changes against Base: paper 37.1 - 43.3, ours 30.00 - 31.25), without
# the lines under the table.
HEAD = ("| model | AP paper | AP ours | APs paper | APs ours | GFLOPs (encoder) paper | GFLOPs (encoder) ours "
        "| encoder tokens paper | encoder tokens ours | claims |\n|---|" + "---:|" * 8 + "---|\n")
HAND_TABLE = ("# Hand-made table\n\n" + HEAD +
              "| Base (reference) | 43.30 | 31.25 | — | — | — | 0.0123 | — | 64.00 | reference |\n"
              "| Cut (L=16) | 37.10 (-6.20) | 30.00 (-1.25) | — | — | — | 0.008 (-0.0043) | — | 64.00 (±0) | "
              "AP: yes (drop 1.25 vs base, allowed 1.4); GFLOPs (encoder): yes (-0.0043 vs base) |\n"
              "| extra_run | — | 12.50 (-18.75) | — | — | — | — | — | — | — |\n"
              "\n**Protocol.** by hand\n")
# the same at the paper's scale: ours beside reproduced - paper
HAND_TABLE_COCO = ("# Hand-made table\n\n" + HEAD +
                   "| Base (reference) | 43.30 | 31.25 (-12.05) | — | — | — | 0.0123 | — | 64.00 | reference |\n"
                   "| Cut (L=16) | 37.10 | 30.00 (-7.10) | — | — | — | 0.008 | — | 64.00 | "
                   "AP: yes (drop 1.25 vs base, allowed 1.4); GFLOPs (encoder): yes (-0.0043 vs base) |\n"
                   "| extra_run | — | 12.50 | — | — | — | — | — | — | — |\n")


def hand_metrics(tmp_path: Path) -> Path:
    """eval.json as the eval stage writes it: AP as a fraction, NaN for an empty area bucket."""
    m = tmp_path / "metrics"
    write_eval(m, "base", {"AP": 0.3125, "APs": float("nan"), "gmacs_encoder": 0.0123, "encoder_tokens": 64.0})
    write_eval(m, "cut", {"AP": 0.3, "APs": float("nan"), "gmacs_encoder": 0.008, "encoder_tokens": 64.0})
    write_eval(m, "extra_run", {"AP": 0.125})
    return m


def test_table_check_accepts_a_correct_table(tmp_path):
    """The hand-made tables agree cell by cell with the hand-written eval.json files, and the
    report's own renderer prints exactly them."""
    m = hand_metrics(tmp_path)
    found = check_table_cells(HAND_TABLE, m, HAND_SPEC)
    assert found == {"Base": "base", "Cut (L=16)": "cut", "extra_run": "extra_run"}
    assert check_table_cells(HAND_TABLE_COCO, m, HAND_SPEC, paper_scale=True) == found
    from effdetr.reporting.plan import TablePlan
    from effdetr.reporting.tables import markdown_table, table_cells
    from effdetr.reporting.values import experiment_values
    plan = TablePlan("t", {"table": "t", **HAND_SPEC}, "eval", list(found.values()), list(found.values()))
    rep = {k: experiment_values(m, k)[0] for k in plan.run}
    assert markdown_table(plan, table_cells(plan, rep)) in HAND_TABLE
    assert markdown_table(plan, table_cells(plan, rep, paper_scale=True)) in HAND_TABLE_COCO


@pytest.mark.parametrize("old, new, why", [
    ("| 43.30 | 31.25 |", "| 43.30 | — |", "reproduced cell"),  # "—" everywhere passed before
    ("| 30.00 (-1.25) |", "| 30.01 (-1.24) |", "reproduced cell"),
    ("| — | 12.50 (-18.75) |", "| — | 0.125 (-31.1) |", "reproduced cell"),  # a fraction, not percent
    ("| 0.008 (-0.0043) |", "| 0.0123 (±0) |", "reproduced cell"),
    ("| 30.00 (-1.25) |", "| 30.00 (-7.10) |", "reproduced cell"),  # against the paper, not the reference
    ("| 30.00 (-1.25) |", "| 30.00 |", "reproduced cell"),  # the change left out
    ("| 43.30 | 31.25 |", "| 43.3 | 31.25 |", "paper cell"),
    ("| 37.10 (-6.20) |", "| 37.10 (+6.20) |", "paper cell"),
    ("AP: yes (drop 1.25 vs base, allowed 1.4); ", "", "claims cell names"),  # a claimed metric's verdict left out
    ("GFLOPs (encoder): yes (-0.0043 vs base)", "GFLOPs (encoder): maybe", "not a verdict"),
    ("| — | — | — | — | — | — |\n", "| — | — | — | — | — | yes (+0 vs base) |\n", "no claim"),
    ("| Base (reference) |", "| Base |", "model cell"),
    ("| extra_run |", "| extra_runs |", "neither a paper row"),
])
def test_table_check_fails_on_a_wrong_cell(tmp_path, old, new, why):
    """Each edit of the correct table is a report bug the end-to-end test must catch."""
    assert old in HAND_TABLE
    with pytest.raises(AssertionError, match=why):
        check_table_cells(HAND_TABLE.replace(old, new, 1), hand_metrics(tmp_path), HAND_SPEC)


def test_table_check_reads_flops_and_speed_files(tmp_path):
    """flops.json: gflops = gmacs.total, gflops_<part> = gmacs[part], compared with the paper
    absolutely; speed.json: speedup = dense ms / the row's ms."""
    m = tmp_path / "metrics"
    m.mkdir()
    (m / "flops.json").write_text(json.dumps({"models": {"a_r50": {"gmacs": {"total": 81.245, "encoder": 8.9},
                                                                    "params_m": 41.3}}}))
    (m / "speed.json").write_text(json.dumps({"results": {"dense": {"ms": 1.5, "score_mb": 0.5},
                                                          "act": {"ms": 3.0, "score_mb": 0.25}}}))
    flops_spec = {"title": "F", "kind": "flops", "metrics": ["gflops", "gflops_encoder", "params_m"],
                  "rows": {"a_r50": {"label": "A", "gflops": 86, "claim": {"rel_tol": 0.1}},
                           "b_r50": {"label": "B", "gflops": 187, "claim": {"rel_tol": 0.1}}}}
    flops_table = ("# F\n\n| model | GFLOPs paper | GFLOPs ours | GFLOPs (encoder) paper | GFLOPs (encoder) ours | "
                   "Params (M) paper | Params (M) ours | claims |\n|---|" + "---:|" * 6 + "---|\n"
                   "| A | 86 | 81.25 (-4.75) | — | 8.90 | — | 41.30 | GFLOPs: yes (-5.5%, tolerance ±10%) |\n"
                   "| B | 187 | — | — | — | — | — | GFLOPs: not run |\n")
    assert check_table_cells(flops_table, m, flops_spec) == {"A": "a_r50"}
    with pytest.raises(AssertionError, match="reproduced cell"):
        check_table_cells(flops_table.replace("| 81.25 (-4.75) |", "| 8.90 (-77.10) |"), m, flops_spec)
    speed_spec = {"title": "S", "metrics": ["ms", "speedup", "score_mb"],
                  "rows": {"dense": {"claims": ["reference"]},
                           "act": {"label": "ACT", "claims": [{"metric": "ms", "lower": "dense"}]}}}
    speed_table = ("# S\n\n| model | ms paper | ms ours | speed-up paper | speed-up ours | score MB paper | "
                   "score MB ours | claims |\n|---|" + "---:|" * 6 + "---|\n"
                   "| dense (reference) | — | 1.50 | — | 1.00 | — | 0.50 | reference |\n"
                   "| ACT | — | 3.00 (+1.50) | — | 0.50 (-0.50) | — | 0.25 (-0.25) | ms: no (+1.50 vs dense) |\n")
    assert check_table_cells(speed_table, m, speed_spec, "speed") == {"dense": "dense", "ACT": "act"}
    with pytest.raises(AssertionError, match="reproduced cell"):
        check_table_cells(speed_table.replace("| 0.50 (-0.50) |", "| 2.00 (+1.00) |"), m, speed_spec, "speed")


def test_table_check_averages_seed_rows(tmp_path):
    """A row over seeds shows their mean; <metric>_sd their sample sd (AP 30 and 34 -> 32.00,
    sd 2 * sqrt(2) = 2.83), <metric>_gain the row's mean minus its gain_vs row's (36 - 32);
    neither a spread nor a gain gets a change of its own."""
    m = tmp_path / "metrics"
    for name, ap in (("s1", 0.30), ("s2", 0.34), ("d1", 0.35), ("d2", 0.37)):
        write_eval(m, name, {"AP": ap, "gmacs_total": 1.5})
    spec = {"title": "Seeds", "metrics": ["AP", "AP_sd", "AP_gain", "gflops_total"], "rows": {
        "base": {"label": "Student (2 seeds)", "seeds": ["s1", "s2"], "claims": ["reference"]},
        "kd": {"label": "Student + KD (2 seeds)", "seeds": ["d1", "d2"], "gain_vs": "base", "AP_gain": 2.2,
               "claims": [{"metric": "AP", "beyond_spread": "base"}, {"metric": "gflops_total", "equal": "base"}]}}}
    table = ("# Seeds\n\n| model | AP paper | AP ours | AP sd paper | AP sd ours | AP gain paper | AP gain ours | "
             "GFLOPs paper | GFLOPs ours | claims |\n|---|" + "---:|" * 8 + "---|\n"
             "| Student (2 seeds) (reference) | — | 32.00 | — | 2.83 | — | — | — | 1.50 | reference |\n"
             "| Student + KD (2 seeds) | — | 36.00 (+4.00) | — | 1.41 | 2.20 | 4.00 | — | 1.50 (±0) | "
             "AP: no (+4.00 vs base, seed spread 4.24); GFLOPs: yes (+0.00 vs base) |\n")
    assert check_table_cells(table, m, spec) == {"Student (2 seeds)": "base", "Student + KD (2 seeds)": "kd"}
    for old, new in (("| 2.83 |", "| 2.00 |"),  # population sd, not sample
                     ("| 36.00 (+4.00) |", "| 35.00 (+3.00) |"),  # the first seed, not the mean
                     ("| 2.20 | 4.00 |", "| 2.20 | 36.00 |")):  # the mean, not the gain
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


def search_runs(base: str, prefix: str) -> list[dict]:
    """Every run of the experiments named ``<prefix>/...`` (one per paper, and pipeline), each
    with its experiment's name and tags under ``experiment``."""
    def post(path, body):
        req = urllib.request.Request(f"{base}/api/2.0/mlflow/{path}", method="POST", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req) as r:
            return json.load(r)
    exps = post("experiments/search", {"max_results": 1000, "filter": f"name LIKE '{prefix}/%'"}).get("experiments", [])
    runs = []
    for exp in exps:
        for run in post("runs/search", {"experiment_ids": [exp["experiment_id"]], "max_results": 1000}).get("runs", []):
            runs.append({**run, "experiment": {"name": exp["name"],
                                               "tags": {t["key"]: t["value"] for t in exp.get("tags", [])}}})
    return runs


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
    assert "| DETR-DC5 (reference) | 73.40 | " in table and "MLflow run id" in table
    assert "detr_dc5_wide" in table
    flops = (workdir / "reports/tables/flops.csv").read_text().splitlines()
    assert flops[0] == ("model,row,metric,paper,reproduced,reference,paper_change,reproduced_change,"
                        "reproduced_minus_paper,claim")
    assert (workdir / "reports/README.md").exists()
    assert (workdir / "reports/figures/act_main/detr_dc5_training.png").stat().st_size > 1000
    ev = json.loads((workdir / "reports/metrics/detr_dc5/eval.json").read_text())
    assert 0.0 <= ev["AP"] <= 1.0 and ev["gmacs_total"] > 0
    # ACT: the swap evaluates the teacher's weights, counts prototypes per layer, and
    # every ACT table and figure is written.
    act16 = json.loads((workdir / "reports/metrics/act_L16/eval.json").read_text())
    act32 = json.loads((workdir / "reports/metrics/act_L32/eval.json").read_text())
    assert 1 <= act16["prototypes_layer0"] <= act32["prototypes_layer0"] <= act16["encoder_tokens"]
    assert act16["gmacs_encoder"] <= act32["gmacs_encoder"]
    assert "| ACT (L=16) | 45.00 (-28.40) | " in table and "| ACT+MTKD (L=16) | 45.10 (-28.30) | " in table
    for name in ("act_kmeans", "act_speed"):
        assert "MLflow run id" in (workdir / f"reports/tables/{name}.md").read_text()
    assert (workdir / "reports/figures/act_main/prototypes_per_layer.png").stat().st_size > 1000
    # Deformable / Sparse DETR: sparse encoder keeps fewer tokens and costs less; FPS measured;
    # the Sparse DETR tables (main, paper-scale FLOPs) and the AP-vs-GFLOPs figure exist.
    sp = json.loads((workdir / "reports/metrics/sparse_detr_rho0p3/eval.json").read_text())
    dd = json.loads((workdir / "reports/metrics/deformable_detr_topk/eval.json").read_text())
    assert sp["encoder_kept_tokens"] < sp["encoder_tokens"] == dd["encoder_tokens"]
    assert sp["gmacs_encoder"] < dd["gmacs_encoder"] and sp["fps_b1"] > 0
    sparse_table = (workdir / "reports/tables/sparse_main.md").read_text()
    assert "| Sparse DETR (rho=0.3) | 46.00 (±0) | " in sparse_table
    assert "sparse_detr_r50_rho0p1" in (workdir / "reports/metrics/flops.json").read_text()
    assert "[[72, 88]]" in (workdir / "reports/tables/sparse_flops.md").read_text()
    assert (workdir / "reports/figures/sparse_main/sparse_ap_vs_gflops.png").stat().st_size > 1000
    # ... and its points as the data files dvc.yaml's top-level plots read (`dvc plots show`)
    from effdetr.reporting.paper import load_paper_tables
    fig_spec = load_paper_tables()["sparse_main"]
    from effdetr import stages
    top_plots = yaml.safe_load(stages.render_dvc(stages.load_raw(str(workdir / "params.yaml"))))["plots"]
    files = {path for entry in top_plots for plot in entry.values() for path in plot["y"]}
    assert {f for f in files if not f.endswith("_curve.json")} == \
        {f"reports/figures/sparse_main/sparse_ap_vs_gflops_{s}.json" for s in ("paper", "reproduced")}
    from dvc.render.converter.vega import get_datapoints
    curves = [f for f in files if f.endswith("_curve.json")]
    assert "reports/figures/sparse_main/sparse_detr_rho0p3_curve.json" in curves
    for f in curves:  # written by the table stages, drawable by DVC's own converter
        assert get_datapoints(json.loads((workdir / f).read_text())), f
    points = {s: json.loads((workdir / f"reports/figures/sparse_main/sparse_ap_vs_gflops_{s}.json").read_text())
              for s in ("paper", "reproduced")}
    rho03 = fig_spec["rows"]["sparse_detr_rho0p3"]
    assert {"model": rho03["label"], "gflops_total": rho03["gflops_total"], "AP": rho03["AP"]} in points["paper"]
    assert {"model": rho03["label"], "gflops_total": pytest.approx(sp["gmacs_total"]),
            "AP": pytest.approx(100 * sp["AP"])} \
        in points["reproduced"]
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
    stages_logged = sorted(next(t["value"] for t in r["data"]["tags"] if t["key"] == "stage") for r in runs
                           if not any(t["key"] == "effdetr.parent" for t in r["data"]["tags"]))
    assert stages_logged == sorted(["data", "pretrain"] + ["train"] * 5 + ["eval"] * 8 + ["speed", "flops"]
                                   + ["report"] * len(TINY_TABLES))  # one per table
    train_run = next(r for r in runs if r["info"]["run_name"] == "train-detr_dc5")
    keys = {m["key"] for m in train_run["data"]["metrics"]}
    assert "train_loss" in keys
    tags = {t["key"]: t["value"] for t in train_run["data"]["tags"]}
    assert {"paper", "table", "git_sha", "git_dirty", "params_hash"} <= set(tags)
    # MLflow's own columns: source, user, run name; one experiment per paper, opened by the UI
    # on its model-training view; the tables' metric names on eval runs
    assert tags["mlflow.source.name"] == "effdetr train" and tags["mlflow.runName"] == "train-detr_dc5"
    assert tags["mlflow.user"] and tags["mlflow.source.type"] == "LOCAL"
    assert {r["experiment"]["name"] for r in runs} == {"effdetr-test/act", "effdetr-test/sparse_detr",
                                                       "effdetr-test/detr", "effdetr-test/lite_detr",
                                                       "effdetr-test/pipeline"}
    assert train_run["experiment"]["name"] == "effdetr-test/act"
    # the DAG run is a parent run in each experiment, closed when Snakemake finished; every
    # stage run nests under its experiment's
    run_tags = lambda r: {t["key"]: t["value"] for t in r["data"]["tags"]}  # noqa: E731
    parents = {r["experiment"]["name"]: r for r in runs if run_tags(r).get("effdetr.parent") == "true"}
    assert set(parents) == {r["experiment"]["name"] for r in runs}
    assert {p["info"]["status"] for p in parents.values()} == {"FINISHED"}
    assert len({run_tags(p)["effdetr.invocation"] for p in parents.values()}) == 1
    for r in runs:
        if r["info"]["run_id"] not in {p["info"]["run_id"] for p in parents.values()}:
            assert run_tags(r)["mlflow.parentRunId"] == parents[r["experiment"]["name"]]["info"]["run_id"]
    assert all(r["experiment"]["tags"]["mlflow.experimentKind"] == "custom_model_development" for r in runs)
    eval_run = next(r for r in runs if r["info"]["run_name"] == "eval-sparse_detr_rho0p3")
    metrics = {m["key"]: m["value"] for m in eval_run["data"]["metrics"]}
    assert metrics["gflops_total"] == metrics["gmacs_total"] > 0 and 0 <= metrics["AP"] <= 1

    # Up to date: nothing planned (how long a dry run takes is `effdetr bench dag`'s figure).
    assert planned_jobs(smk("-n").stdout) == set()
    # Snakemake's own records: a benchmark per job, summarised in the index; the HTML report
    # holds every table and figure
    assert (workdir / "logs/benchmarks/train_detr_dc5.tsv").exists()
    index = (workdir / "reports/README.md").read_text()
    assert "## Runtime and memory per job" in index and "| train | 5 |" in index
    smk("--report", "report.html")
    html = (workdir / "report.html").read_text(errors="replace")
    for name in list(TINY_TABLES) + ["sparse_ap_vs_gflops.png", "prototypes_per_layer.png"]:
        assert name in html, name

    # DVC records the state, then a one-experiment edit touches only that experiment's stages.
    run("git", "init", "-q")
    run(BIN / "dvc", "init", "-q")
    run(BIN / "effdetr", "dag", "dvc", "--out", "dvc.yaml")
    run(BIN / "dvc", "commit", "-f", "-q")
    assert "up to date" in run(BIN / "dvc", "status").stdout.lower()

    params = yaml.safe_load((workdir / "params.yaml").read_text())
    params["experiments"]["detr_dc5_wide"]["overrides"]["model"]["hidden_dim"] = 40
    (workdir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    edited = {"train_detr_dc5_wide", "eval_detr_dc5_wide", "table_act_main", "report"}
    assert planned_jobs(smk("-n").stdout) == edited  # not the other tables
    status = run(BIN / "dvc", "status", "--json").stdout
    assert set(json.loads(status)) == edited - {"report"}  # DVC names stages whose deps changed now

    before = (workdir / "data/checkpoints/detr_dc5.pt").stat().st_mtime_ns
    smk("all")
    assert (workdir / "data/checkpoints/detr_dc5.pt").stat().st_mtime_ns == before
    assert planned_jobs(smk("-n").stdout) == set()

    # One command keeps the two engines' records in step after a run by either one.
    assert "recorded in dvc.lock" in run(BIN / "effdetr", "dag", "sync").stdout  # after Snakemake
    assert "up to date" in run(BIN / "dvc", "status").stdout.lower()
    params["experiments"]["detr_dc5_wide"]["overrides"]["model"]["hidden_dim"] = 48
    (workdir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(BIN / "dvc", "repro", "-q")  # now DVC runs the edit
    assert planned_jobs(smk("-n").stdout) == edited  # Snakemake did not see that run
    assert "recorded in Snakemake's metadata" in run(BIN / "effdetr", "dag", "sync").stdout
    assert planned_jobs(smk("-n").stdout) == set() and "up to date" in run(BIN / "dvc", "status").stdout.lower()
    assert "nothing to record" in run(BIN / "effdetr", "dag", "sync").stdout


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
    exp = client.get_experiment_by_name("effdetr-test/pipeline")  # the data stage's
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1 and runs[0].data.metrics["train_images"] == 48
    assert "re-imported 0 runs" in run(BIN / "effdetr", "mlflow", "sync").stdout


def test_one_table_or_one_paper_plans_only_what_it_needs(workdir):
    """`snakemake -n reports/tables/sparse_main.md` plans the Sparse DETR table's own trainings
    and evaluations (and the data and backbone they start from), nothing of ACT; `paper_act`
    plans ACT's tables and the DETR-DC5 teacher they read, nothing of Sparse DETR."""
    shutil.copy(TINY, workdir / "params.yaml")
    sparse = planned_jobs(smk("-n", "reports/tables/sparse_main.md").stdout)
    assert sparse == {"data", "pretrain", "train_deformable_detr_topk", "eval_deformable_detr_topk",
                      "train_sparse_detr_rho0p3", "eval_sparse_detr_rho0p3", "table_sparse_main"}
    act = planned_jobs(smk("-n", "paper_act").stdout)
    assert {"table_act_main", "table_act_kmeans", "table_act_speed", "train_detr_dc5", "eval_act_L16",
            "speed"} <= act
    assert not {j for j in act if "sparse" in j or "deformable" in j or j == "report"}, act
    assert planned_jobs(smk("-n", "paper_sparse_detr").stdout) == sparse | {"table_sparse_flops", "flops",
                                                                            "paper_sparse_detr"}
