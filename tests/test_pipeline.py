"""End to end on the tiny profile: Snakemake runs the DAG, tables and MLflow runs appear
(checked through a real `mlflow server` on 127.0.0.1), and a params edit reruns exactly the
stages that read it, under Snakemake and under DVC."""
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request

import pytest
import yaml

from tests.conftest import BIN, TINY

pytestmark = pytest.mark.slow


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


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


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
        port, log = free_port(), workdir / "mlflow_server.log"
        with open(log, "w") as out:
            proc = subprocess.Popen([str(BIN / "mlflow"), "server", "--backend-store-uri",
                                     os.environ["MLFLOW_TRACKING_URI"], "--host", "127.0.0.1",
                                     "--port", str(port), "--workers", "1"],
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(proc)
        base = f"http://127.0.0.1:{port}"
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
