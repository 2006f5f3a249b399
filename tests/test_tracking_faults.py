"""Tracking under faults: concurrent first use of a sqlite store, a half-migrated store,
runs a kill left partial, and a full disk under mlruns/ (issue 16)."""
import builtins
import errno
import io
import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from effdetr import tracking
from effdetr.tracking import Run
from tests.conftest import REPO, TINY

CHILD_ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(REPO / "src")]))}

# Imports mlflow, says it is ready, then waits for "go" so every child hits the fresh store at once.
RACER = """
import sys, time
from pathlib import Path
import mlflow.tracking, mlflow.store.tracking.sqlalchemy_store
from effdetr.tracking import Run
Path(f"ready.{sys.argv[1]}").touch()
while not Path("go").exists():
    time.sleep(0.01)
with Run("faults", f"racer-{sys.argv[1]}", {}, {"i": sys.argv[1]}) as run:
    run.log_metrics({"m": 1.0})
"""

# Logs params to the store, then a metric and an artifact to the sidecar only (as if killed between
# the sidecar write and the store write), then dies by SIGKILL with the run still RUNNING.
KILLED = """
import os, signal
from pathlib import Path
from effdetr.tracking import Run
with Run("faults", "killed", {}, {"lr": 0.1}) as run:
    run.client = None
    run.log_metrics({"ap": 0.5})
    Path("out.txt").write_text("science")
    run.log_artifact("out.txt")
    os.kill(os.getpid(), signal.SIGKILL)
"""


def db_path() -> Path:
    return Path(os.environ["MLFLOW_TRACKING_URI"].removeprefix("sqlite:///"))


def store_runs(db: Path | None = None) -> dict[str, dict]:
    """run name -> status and metrics, read with sqlite3 so no mlflow engine is cached on the file."""
    with sqlite3.connect(db or db_path()) as con:
        runs = {name: {"status": status, "metrics": {}} for name, status in con.execute("SELECT name, status FROM runs")}
        for name, key, value in con.execute("SELECT r.name, m.key, m.value FROM metrics m JOIN runs r ON r.run_uuid = m.run_uuid"):
            runs[name]["metrics"][key] = value
    return runs


def tables(db: Path) -> set[str]:
    with sqlite3.connect(db) as con:
        return {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}


def effdetr(*args):
    return subprocess.run([sys.executable, "-m", "effdetr.cli", *args, "--params", str(TINY)],
                          capture_output=True, text=True, env=CHILD_ENV, timeout=300)


def spawn_racers(n: int) -> list[subprocess.CompletedProcess]:
    procs = [subprocess.Popen([sys.executable, "-c", RACER, str(i)], env=CHILD_ENV, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(n)]
    while len(list(Path().glob("ready.*"))) < n and all(p.poll() is None for p in procs):
        time.sleep(0.05)
    Path("go").touch()
    return [subprocess.CompletedProcess(p.args, p.wait(timeout=300), *p.communicate()) for p in procs]


def full_disk(monkeypatch, under: Path) -> None:
    """Make every write below `under` fail with ENOSPC, as on a full filesystem; elsewhere writes work."""
    under = os.path.realpath(under)

    def guard(fn, writes=lambda *a, **k: True):
        def wrapped(path, *args, **kwargs):
            if (not isinstance(path, int) and writes(*args, **kwargs)
                    and os.path.realpath(os.fspath(path)).startswith(under)):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(path))
            return fn(path, *args, **kwargs)
        return wrapped

    def writing_mode(mode="r", *a, **k):
        return any(c in mode for c in "wax+")

    def writing_flags(flags, *a, **k):
        return bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))

    monkeypatch.setattr(builtins, "open", guard(builtins.open, writing_mode))
    monkeypatch.setattr(io, "open", guard(io.open, writing_mode))
    monkeypatch.setattr(os, "open", guard(os.open, writing_flags))
    for name in ("mkdir", "replace", "rename"):
        monkeypatch.setattr(os, name, guard(getattr(os, name)))


# -- case 5: concurrent first use, half-migrated stores ------------------------------------
def test_concurrent_first_use_of_a_fresh_store_keeps_every_run(workdir):
    results = spawn_racers(6)
    for r in results:
        assert r.returncode == 0, r.stderr[-3000:]
        assert "[tracking]" not in r.stderr, r.stderr[-3000:]
    runs = store_runs()
    assert sorted(runs) == [f"racer-{i}" for i in range(6)]
    assert all(r["status"] == "FINISHED" and r["metrics"] == {"m": 1.0} for r in runs.values())
    assert not {t for t in tables(db_path()) if t.startswith("_alembic_tmp_")}


@pytest.mark.parametrize("damage", ["leftover_alembic_tmp_table", "truncated"])
def test_rebuild_moves_a_broken_store_aside_and_reimports_every_sidecar(workdir, capsys, damage):
    for name in ("before-1", "before-2"):
        with Run("faults", name, {}, {"name": name}) as run:
            run.log_metrics({"m": 2.0})
    db = db_path()
    if damage == "truncated":
        with open(db, "r+b") as f:
            f.truncate(db.stat().st_size // 3)
    else:
        with sqlite3.connect(db) as con:
            con.execute("CREATE TABLE _alembic_tmp_runs (run_uuid VARCHAR(32))")
    damaged = db.read_bytes()

    with Run("faults", "while-broken", {}, {}) as run:  # the science goes on, the store is reported
        run.log_metrics({"m": 3.0})
    err = capsys.readouterr().err
    assert "is broken" in err and "effdetr mlflow rebuild" in err
    sync = effdetr("mlflow", "sync")
    assert sync.returncode == 2 and "is broken" in sync.stderr and "effdetr mlflow rebuild" in sync.stderr
    init = effdetr("mlflow", "init")  # Snakemake's onstart: reported, but the DAG is not stopped
    assert init.returncode == 0 and "is broken" in init.stderr, init.stderr[-3000:]

    rebuilt = effdetr("mlflow", "rebuild")
    assert rebuilt.returncode == 0, rebuilt.stderr[-3000:]
    assert "re-imported 3 runs" in rebuilt.stdout
    aside = list(db.parent.glob("mlflow.db.broken-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == damaged  # moved, never deleted
    runs = store_runs()
    assert {name: r["metrics"] for name, r in runs.items()} == {"before-1": {"m": 2.0}, "before-2": {"m": 2.0},
                                                                "while-broken": {"m": 3.0}}
    assert "re-imported 0 runs" in effdetr("mlflow", "sync").stdout


# -- case 6: partial runs -------------------------------------------------------------------
def test_sidecar_is_written_before_the_store(workdir, monkeypatch):
    from mlflow.tracking import MlflowClient
    seen = {}
    create_run, log_batch = MlflowClient.create_run, MlflowClient.log_batch

    def spy_create(self, *args, **kwargs):
        seen["at_create"] = json.loads(next(Path("mlruns/sidecars").glob("*.json")).read_text())
        return create_run(self, *args, **kwargs)

    def spy_batch(self, run_id, metrics=(), **kwargs):
        if metrics:
            seen["at_metrics"] = json.loads(next(Path("mlruns/sidecars").glob("*.json")).read_text())
        return log_batch(self, run_id, metrics=metrics, **kwargs)

    monkeypatch.setattr(MlflowClient, "create_run", spy_create)
    monkeypatch.setattr(MlflowClient, "log_batch", spy_batch)
    with Run("faults", "order", {}, {"lr": 0.1}) as run:
        run.log_metrics({"ap": 0.5})
    assert seen["at_create"]["status"] == "RUNNING" and seen["at_create"]["pid"] == os.getpid()
    assert [m["key"] for m in seen["at_metrics"]["metrics"]] == ["ap"]


def test_sync_completes_killed_and_unfinished_runs_but_leaves_live_ones(workdir):
    killed = subprocess.run([sys.executable, "-c", KILLED], env=CHILD_ENV, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-3000:]
    with Run("faults", "store-lost-metrics", {}, {"lr": 0.2}) as run:  # the store failed mid-run
        run.client = None
        run.log_metrics({"ap": 0.7})
    live = Run("faults", "live", {}, {"lr": 0.3}).__enter__()
    live.client = None
    live.log_metrics({"ap": 0.9})
    assert {n: (r["status"], r["metrics"]) for n, r in store_runs().items()} == {
        "killed": ("RUNNING", {}), "store-lost-metrics": ("RUNNING", {}), "live": ("RUNNING", {})}

    result = tracking.sync()
    assert {n: (r["status"], r["metrics"]) for n, r in store_runs().items()} == {
        "killed": ("KILLED", {"ap": 0.5}), "store-lost-metrics": ("FINISHED", {"ap": 0.7}), "live": ("RUNNING", {})}
    imported, completed = result
    assert imported == [] and len(completed) == 2 and live.uid not in completed
    from mlflow.tracking import MlflowClient
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    run = client.search_runs([client.get_experiment_by_name("faults").experiment_id], "attributes.run_name = 'killed'")[0]
    assert run.data.params == {"lr": "0.1"} and [a.path for a in client.list_artifacts(run.info.run_id)] == ["out.txt"]
    assert tracking.sync() == ([], [])
    live.__exit__(None, None, None)


# -- case 7: a tracking failure never stops the science ------------------------------------
def test_full_disk_under_mlruns_warns_once_and_the_output_is_written(workdir, monkeypatch, capsys):
    full_disk(monkeypatch, workdir / "mlruns")

    def stage(out: Path) -> None:
        with Run("faults", "full-disk", {}, {"lr": 0.1}) as run:
            run.log_metrics({"ap": 0.5})
            out.write_text("science")
            run.log_artifact(out)
            run.log_metrics({"ap": 0.6}, step=1)

    stage(workdir / "eval.json")
    assert (workdir / "eval.json").read_text() == "science"
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("[tracking]")]
    assert len(warnings) == 2, err  # one for the store, one for the sidecar, not one per call
    assert all("No space left on device" in w and "mlruns" in w for w in warnings)
    with pytest.raises(ZeroDivisionError):  # the science's own exception is not swallowed
        with Run("faults", "full-disk-failing", {}, {}):
            1 / 0


def test_store_failure_mid_run_is_recorded_in_the_sidecar(workdir, monkeypatch, capsys):
    from mlflow.tracking import MlflowClient

    def enospc(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(workdir / "mlruns" / "mlflow.db"))

    with pytest.raises(ValueError, match="science"):
        with Run("faults", "store-full", {}, {}) as run:
            for name in ("log_batch", "log_artifact", "set_terminated"):
                monkeypatch.setattr(MlflowClient, name, enospc)
            run.log_metrics({"ap": 0.5})
            (workdir / "eval.json").write_text("science")
            run.log_artifact(workdir / "eval.json")
            raise ValueError("science")
    err = capsys.readouterr().err
    assert err.count("[tracking]") == 1 and "No space left on device" in err and "mlflow.db" in err
    record = json.loads(run.sidecar_path.read_text())
    assert record["status"] == "FAILED" and [m["key"] for m in record["metrics"]] == ["ap"]
    assert len(record["tracking_errors"]) == 1 and "No space left on device" in record["tracking_errors"][0]


def test_cli_stage_writes_its_outputs_on_a_full_disk(workdir, monkeypatch, capsys):
    from effdetr import cli
    full_disk(monkeypatch, workdir / "mlruns")
    assert cli.main(["data", "synth", "--out", "data/synthcoco", "--params", str(TINY)]) == 0
    assert json.loads((workdir / "data/synthcoco/manifest.json").read_text())["summary"]
    assert "[tracking]" in capsys.readouterr().err


def test_a_store_of_another_schema_revision_is_upgraded_not_moved_aside(workdir):
    with Run("faults", "kept", {}, {}) as run:
        run.log_metrics({"m": 1.0})
    db = db_path()
    with sqlite3.connect(db) as con:
        con.execute("UPDATE alembic_version SET version_num = '0a8213491aaa'")  # an older revision
    before = db.read_bytes()
    init = effdetr("mlflow", "init")
    assert init.returncode == 0 and "mlflow db upgrade" in init.stderr, init.stderr[-3000:]
    rebuilt = effdetr("mlflow", "rebuild")
    assert rebuilt.returncode == 2 and "mlflow db upgrade" in rebuilt.stderr, rebuilt.stderr[-3000:]
    assert not list(db.parent.glob("mlflow.db.broken-*")) and db.read_bytes() == before


def test_sync_leaves_another_hosts_live_run_alone(workdir):
    """Another host's pid cannot be checked from here: its RUNNING run is only closed as KILLED
    once its sidecar has been silent for a day (a live run rewrites it every epoch)."""
    with Run("faults", "elsewhere", {}, {"lr": 0.1}):
        pass
    side = next(Path("mlruns/sidecars").glob("*.json"))
    rec = json.loads(side.read_text())
    rec.update(status="RUNNING", host="another-node", pid=1)
    side.write_text(json.dumps(rec))
    with sqlite3.connect(db_path()) as con:
        con.execute("UPDATE runs SET status = 'RUNNING', end_time = NULL")
    tracking.sync()
    assert store_runs()["elsewhere"]["status"] == "RUNNING"
    old = time.time() - tracking.OTHER_HOST_STALE_S - 60
    os.utime(side, (old, old))
    tracking.sync()
    assert store_runs()["elsewhere"]["status"] == "KILLED"
