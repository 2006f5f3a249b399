"""Tracking risks not covered by test_tracking_faults.py: an MLflow server that is down, and
MLflow's 100-params-per-request limit (a training run logs its whole flattened config).

Sync of RUNNING sidecars (a killed writer's run closed as KILLED, a live one left alone, another
host's after a day of silence) is tested in test_tracking_faults.py:
test_sync_completes_killed_and_unfinished_runs_but_leaves_live_ones and
test_sync_leaves_another_hosts_live_run_alone.
"""
import json
import shutil
import socket
import sqlite3
from pathlib import Path

import pytest

from effdetr import tracking
from effdetr.tracking import Run
from tests.conftest import TINY


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory) -> Path:
    """An sqlite store with mlflow's schema, made once: creating the schema takes seconds."""
    db = tmp_path_factory.mktemp("store") / "mlflow.db"
    tracking._ensure_schema(db, f"sqlite:///{db}")  # as a first Run does, without touching the global URI
    return db


@pytest.fixture
def store(workdir, empty_store) -> Path:
    """The workdir's store (at the URI the workdir fixture sets), a copy of the empty one."""
    db = workdir / "mlruns/mlflow.db"
    db.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(empty_store, db)
    return db


@pytest.fixture
def mlflow_down(workdir, monkeypatch):
    """MLFLOW_TRACKING_URI at an http port that refuses connections: a socket is bound there
    (so no other process can take the port) but never listens. Sleeps are recorded, not slept:
    tracking's own retries and mlflow's HTTP back-off would take minutes."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    uri = f"http://127.0.0.1:{sock.getsockname()[1]}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    slept = []
    monkeypatch.setattr(tracking.time, "sleep", slept.append)  # the time module: urllib3's back-off too
    yield uri, slept
    sock.close()


def sidecars() -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(Path("mlruns/sidecars").glob("*.json"))]


def test_mlflow_down_the_command_succeeds_on_the_sidecar_alone(workdir, mlflow_down, store, capsys, monkeypatch):
    """`effdetr data synth` with the server down: exit 0 and its outputs written; one
    [tracking] warning naming the server; the sidecar holds the whole run (FINISHED, its
    metrics, no MLflow run id), and `sync` puts it in a store once one is reachable."""
    from effdetr import cli
    uri, _ = mlflow_down
    assert cli.main(["data", "synth", "--out", "data/synthcoco", "--params", str(TINY)]) == 0
    assert json.loads((workdir / "data/synthcoco/manifest.json").read_text())["summary"]
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[tracking]")]
    assert len(warnings) == 1 and uri in warnings[0] and "sidecar" in warnings[0], warnings
    [rec] = sidecars()
    assert rec["status"] == "FINISHED" and rec["mlflow_run_id"] is None and rec["run_name"] == "data-synth"
    assert {m["key"]: m["value"] for m in rec["metrics"]}["train_images"] == 48
    assert len(rec["tracking_errors"]) == 1 and uri in rec["tracking_errors"][0]

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")  # a store is reachable again
    imported, completed = tracking.sync()
    assert imported == [rec["uid"]] and completed == []
    with sqlite3.connect(store) as con:
        [(status,)] = con.execute("SELECT status FROM runs WHERE name = 'data-synth'").fetchall()
        metrics = dict(con.execute("SELECT key, value FROM metrics"))
    assert status == "FINISHED" and metrics["train_images"] == 48


def test_mlflow_down_costs_a_command_little_waiting(workdir, mlflow_down):
    """'Tracking never stops the science': a refused connection is no sqlite lock race, so
    the run should go to its sidecar after seconds of back-off, not minutes. (Counted as the
    sleeps requested, so nothing waits and no clock is read.)"""
    _, slept = mlflow_down
    with Run("down", "waits", {}, {"lr": 0.1}) as run:
        run.log_metrics({"ap": 0.5})
    assert run.record["tracking_errors"]  # it did fall back to the sidecar
    assert sum(slept) <= 60, f"{sum(slept):.0f} s of back-off before the command could go on"


PARAMS = {f"p{i:03d}": i for i in range(250)}  # 250 > MLflow's 100 params per log_batch


def store_params(db: Path, run_name: str) -> dict[str, str]:
    with sqlite3.connect(db) as con:
        return dict(con.execute("SELECT p.key, p.value FROM params p JOIN runs r ON r.run_uuid = p.run_uuid "
                                "WHERE r.name = ?", (run_name,)))


@pytest.fixture
def batch_sizes(monkeypatch) -> list[int]:
    """Params per MlflowClient.log_batch call. mlflow 3.17's client splits a batch itself, so
    the store alone cannot show effdetr's own chunking; the REST API (and older clients)
    reject more than 100 params per request."""
    from mlflow.tracking import MlflowClient
    sizes, log_batch = [], MlflowClient.log_batch

    def spy(self, run_id, metrics=(), params=(), tags=(), **kwargs):
        sizes.append(len(params))
        return log_batch(self, run_id, metrics=metrics, params=params, tags=tags, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", spy)
    return sizes


def test_a_run_with_250_params_has_all_of_them_in_the_store(store, batch_sizes, capsys):
    """Run.__enter__ sends the params in requests of at most 100: all 250 reach the store and
    the run goes on in the store (no [tracking] warning)."""
    with Run("chunks", "many-params", {}, PARAMS) as run:
        run.log_metrics({"ap": 0.5})
    assert "[tracking]" not in capsys.readouterr().err
    assert max(batch_sizes) == 100 and sum(batch_sizes) == 250, batch_sizes
    assert store_params(store, "many-params") == {k: str(v) for k, v in PARAMS.items()}
    assert run.record["tracking_errors"] == []


def test_sync_imports_all_250_params_of_a_sidecar_run(mlflow_down, store, batch_sizes, monkeypatch):
    """A run that reached only its sidecar (the server was down) is imported by sync with every
    one of its 250 params, in requests of at most 100."""
    with Run("chunks", "sidecar-only", {}, PARAMS) as run:
        pass
    assert run.record["mlflow_run_id"] is None and batch_sizes == []
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")  # a store is reachable again
    imported, _ = tracking.sync()
    assert imported == [run.uid]
    assert max(batch_sizes) == 100 and sum(batch_sizes) == 250, batch_sizes
    assert store_params(store, "sidecar-only") == {k: str(v) for k, v in PARAMS.items()}


def test_a_dag_runs_stage_runs_nest_under_one_parent_per_experiment(store, monkeypatch):
    """One `snakemake` run (EFFDETR_INVOCATION): the stage runs of each experiment share one
    parent run, which `effdetr mlflow finish` closes; the sidecars re-import nested again."""
    from mlflow.tracking import MlflowClient
    monkeypatch.setenv(tracking.INVOCATION_ENV, "inv-1")
    for exp, name in (("e/act", "train-a"), ("e/act", "eval-a"), ("e/sparse_detr", "train-b")):
        with Run(exp, name, {"stage": name.split("-")[0]}, {}) as r:
            r.log_metrics({"AP": 0.5})
    client = MlflowClient(tracking.tracking_uri())

    def family(exp_name):
        exp = client.get_experiment_by_name(exp_name)
        runs = client.search_runs([exp.experiment_id])
        parents = [r for r in runs if r.data.tags.get("effdetr.parent") == "true"]
        children = [r for r in runs if r not in parents]
        return parents, children
    for exp_name, n in (("e/act", 2), ("e/sparse_detr", 1)):
        parents, children = family(exp_name)
        assert len(parents) == 1 and parents[0].info.run_name == "dag inv-1" and len(children) == n
        assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
        assert parents[0].info.status == "RUNNING"
    assert len(tracking.finish_invocation("inv-1", "FINISHED")) == 2
    assert all(family(e)[0][0].info.status == "FINISHED" for e in ("e/act", "e/sparse_detr"))
    # a fresh store filled from the sidecars: the children nest under a (new) parent again
    store.unlink()  # re-imported by a process of its own (this one holds a connection to the old file)
    import os
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-c", "from effdetr import tracking; print(len(tracking.sync()[0]))"],
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")})
    assert r.returncode == 0 and r.stdout.split()[-1] == "3", r.stderr[-2000:]
    client = MlflowClient(tracking.tracking_uri())
    parents, children = family("e/act")
    assert len(parents) == 1 and {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}


def test_without_a_dag_run_a_stage_run_has_no_parent(store, monkeypatch):
    from mlflow.tracking import MlflowClient
    monkeypatch.delenv(tracking.INVOCATION_ENV, raising=False)
    with Run("solo", "eval-x", {}, {}):
        pass
    client = MlflowClient(tracking.tracking_uri())
    runs = client.search_runs([client.get_experiment_by_name("solo").experiment_id])
    assert len(runs) == 1 and "mlflow.parentRunId" not in runs[0].data.tags
