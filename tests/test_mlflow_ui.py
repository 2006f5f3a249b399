"""The MLflow UI as a user opens it, in a real browser: headless Chromium (Debian's package,
which `make test` installs) loads the runs page of a real `mlflow server` on a store that
effdetr's own tracking wrote, on its model-training view, and finds the runs; a run's page
shows its metric values. A screenshot is written beside (``--screenshot``)."""
import json
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.test_pipeline import start_mlflow_server, wait_healthy

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# the UI's model-training view (MLflow 3 opens the GenAI one unless told)
VIEW = "workflowType=machine_learning"


def browse(url: str, *extra: str) -> str:
    """The page's DOM after its scripts ran (a virtual-time budget, not a wall-clock wait)."""
    r = subprocess.run([CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                        "--virtual-time-budget=20000", "--window-size=1600,1000", *extra, url],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (`make test` installs Debian's package)")
def test_runs_page_lists_the_runs_and_a_run_page_shows_its_metrics(tmp_path):
    store = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    script = ("import sys; from effdetr.tracking import Run\n"
              "for name, ap in (('eval-act_L32', 0.4213), ('eval-detr_dc5', 0.4330)):\n"
              "    with Run('effdetr-ui/act', name, {'stage': 'eval', 'paper': 'act'}, {'model': {'hidden_dim': 8}}) as r:\n"
              "        r.log_metrics({'AP': ap, 'gflops_total': 1.5})\n")
    env = {**os.environ, "MLFLOW_TRACKING_URI": store,
           "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    r = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    proc, base = start_mlflow_server(store, tmp_path / "server.log")
    try:
        wait_healthy(base, proc, tmp_path / "server.log")
        req = urllib.request.Request(f"{base}/api/2.0/mlflow/experiments/get-by-name?experiment_name=effdetr-ui/act")
        with urllib.request.urlopen(req) as resp:
            exp_id = json.load(resp)["experiment"]["experiment_id"]
        runs_page = browse(f"{base}/#/experiments/{exp_id}/runs?{VIEW}", "--dump-dom")
        assert "eval-act_L32" in runs_page and "eval-detr_dc5" in runs_page
        assert "Model training" in runs_page
        body = json.dumps({"experiment_ids": [exp_id], "filter": "attributes.run_name = 'eval-act_L32'"}).encode()
        req = urllib.request.Request(f"{base}/api/2.0/mlflow/runs/search", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req) as resp:
            run_id = json.load(resp)["runs"][0]["info"]["run_id"]
        run_page = browse(f"{base}/#/experiments/{exp_id}/runs/{run_id}?{VIEW}", "--dump-dom")
        assert "0.4213" in run_page and "gflops_total" in run_page
        shot = tmp_path / "runs.png"
        browse(f"{base}/#/experiments/{exp_id}/runs?{VIEW}", f"--screenshot={shot}")
        assert shot.stat().st_size > 10_000
    finally:
        os.killpg(proc.pid, 9)
