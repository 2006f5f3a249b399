"""MLflow tracking (the only module that imports mlflow) with a JSON sidecar per run.

Every CLI invocation is one MLflow run tagged with paper, table, stage, experiment, git
sha + dirty flag and params hash. Everything logged goes to a sidecar JSON first
(``mlruns/sidecars/<uid>.json``), then to the store, so ``effdetr mlflow sync`` can
re-import any run the store lost and complete any run a kill left partial. Tracking never
stops the science: a failing store or sidecar is warned about once and the command goes on.

A sqlite store gets its schema created once, under a file lock beside the database, by
whichever process opens it first; a half-migrated store is reported, and
``effdetr mlflow rebuild`` moves it aside and rebuilds it from the sidecars.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sqlite3
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from .utils.process import pid_alive

DEFAULT_URI = "sqlite:///mlruns/mlflow.db"
SIDECAR_DIR = Path("mlruns/sidecars")
ARTIFACT_DIR = Path("mlruns/artifacts")


class StoreBroken(RuntimeError):
    """The sqlite store is half-migrated or unreadable: retrying cannot help, rebuilding does."""


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_URI)


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (relative or absolute); None for other stores."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri.removeprefix("sqlite:///").split("?")[0]
    return None if path in ("", ":memory:") else Path(path)


@contextlib.contextmanager
def _store_lock(db: Path):
    """Exclusive flock on ``<db>.lock``: mlflow's schema creation breaks under concurrent first use."""
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _schema_head() -> str:
    from mlflow.store.db.utils import _get_latest_schema_revision
    return _get_latest_schema_revision()


def _store_state(db: Path, thorough: bool = False) -> tuple[str, str]:
    """("empty" | "ok" | "broken", why), read with sqlite3 alone so mlflow never migrates a broken store.

    Only trustworthy under the lock: outside it, a store being created looks half-migrated.
    ``thorough`` also reads every page (PRAGMA quick_check), too slow for each open."""
    if not db.exists():
        return "empty", ""
    try:
        with contextlib.closing(sqlite3.connect(db, timeout=30)) as con:
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            versions = (sorted(r[0] for r in con.execute("SELECT version_num FROM alembic_version"))
                        if "alembic_version" in tables else [])
            check = [r[0] for r in con.execute("PRAGMA quick_check")] if thorough else ["ok"]
    except sqlite3.OperationalError:
        raise  # locked or unopenable: transient, the caller retries
    except sqlite3.DatabaseError as e:
        return "broken", f"it is not a readable sqlite database ({e})"
    if check != ["ok"]:
        return "broken", f"sqlite finds it corrupt ({'; '.join(check[:3])})"
    leftover = sorted(t for t in tables if t.startswith("_alembic_tmp_"))
    if leftover:
        return "broken", f"an interrupted schema migration left table(s) {', '.join(leftover)}"
    if not tables:
        return "empty", ""
    if "alembic_version" not in tables:
        return "broken", "it has tables but no alembic_version (schema creation was interrupted)"
    head = _schema_head()
    if versions != [head]:  # complete, but another mlflow version's schema: upgrade, never move it aside
        return "outdated", f"its schema is at revision {versions or 'none'}, this mlflow expects {head}"
    return "ok", ""


def _broken(db: Path, why: str) -> StoreBroken:
    return StoreBroken(f"tracking store {db} is broken: {why}. Run `effdetr mlflow rebuild` to move it "
                       f"aside and rebuild it from the sidecars in {SIDECAR_DIR}")


def _ensure_schema(db: Path, uri: str) -> None:
    """Create the schema once, under the lock; a store that is already complete is only checked."""
    if _store_state(db)[0] == "ok":
        return
    from mlflow.tracking import MlflowClient
    with _store_lock(db):
        state, why = _store_state(db)
        if state == "empty":
            try:
                MlflowClient(uri)  # opening an empty store makes mlflow create and migrate its schema
            except Exception as e:  # noqa: BLE001
                state, why = _store_state(db)
                if state != "broken":
                    raise
                raise _broken(db, f"{why}, after creating its schema failed ({e})") from e
            state, why = _store_state(db)
        if state == "broken":
            raise _broken(db, why)
        if state == "outdated":
            raise StoreBroken(f"tracking store {db}: {why}. Upgrade it in place with `mlflow db upgrade "
                              f"{uri}` (a store written by a newer mlflow needs that version)")


def _client():
    import mlflow
    from mlflow.tracking import MlflowClient
    uri = tracking_uri()
    db = _sqlite_path(uri)
    if db is not None:
        _ensure_schema(db, uri)
    elif uri.startswith(("http://", "https://")):
        # mlflow's own default (7 retries, doubling back-off, 120 s timeout) would hold each
        # request to a server that is down for minutes; a user's explicit settings win
        for var, value in HTTP_DEFAULTS.items():
            os.environ.setdefault(var, value)
    mlflow.set_tracking_uri(uri)
    return MlflowClient(uri)


HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


def _unreachable(e: Exception) -> bool:
    """A server that refuses or drops connections (mlflow already retried the request)."""
    text = str(e)
    return isinstance(e, ConnectionError) or "Max retries exceeded" in text or "Connection refused" in text


def _transient(e: BaseException) -> bool:
    """A store race (a sqlite lock held by a parallel job) is worth waiting for; a broken
    store, a full disk or an unreachable server is not."""
    return isinstance(e, Exception) and not isinstance(e, (StoreBroken, OSError)) and not _unreachable(e)


def _retry(fn, *args, attempts: int = 6, **kwargs):
    """``fn`` with up to ``attempts`` tries, 0.5 s apart and doubling, on transient errors only
    (tenacity; the last error is raised as it is)."""
    import tenacity
    return tenacity.Retrying(retry=tenacity.retry_if_exception(_transient), stop=tenacity.stop_after_attempt(attempts),
                             wait=tenacity.wait_exponential(multiplier=0.5, max=16), reraise=True)(fn, *args, **kwargs)


def _connect():
    """A client on the store; StoreBroken when a sqlite store still cannot be opened after retries."""
    try:
        return _retry(_client)
    except (StoreBroken, OSError):
        raise
    except Exception as e:  # noqa: BLE001
        db = _sqlite_path(tracking_uri())
        if db is None:
            raise
        raise _broken(db, f"mlflow cannot open it ({type(e).__name__}: {e})") from e


# MLflow 3's UI opens an experiment with this tag on its model-training view, not the GenAI one
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def experiment_id(client, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.tags.get("mlflow.experimentKind") != EXPERIMENT_KIND["mlflow.experimentKind"]:
            client.set_experiment_tag(exp.experiment_id, *next(iter(EXPERIMENT_KIND.items())))
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=ARTIFACT_DIR.resolve().as_uri(),
                                        tags=EXPERIMENT_KIND)
    except Exception:  # noqa: BLE001 - another process created it first
        return client.get_experiment_by_name(name).experiment_id


INVOCATION_ENV = "EFFDETR_INVOCATION"  # set by the Snakefile: one id per `snakemake` run


def invocation_parent(client, exp_id: str, invocation: str) -> str:
    """The run id of the DAG invocation's parent run in this experiment, created by the first
    stage of the invocation that logs there (under the store's lock: parallel jobs find one
    parent, not one each). Its stage runs are nested under it."""
    def find():
        found = client.search_runs([exp_id], filter_string=f"tags.`effdetr.invocation` = '{invocation}' and "
                                                           "tags.`effdetr.parent` = 'true'")
        return found[0].info.run_id if found else None
    run_id = _retry(find)
    if run_id:
        return run_id
    db = _sqlite_path(tracking_uri())
    with _store_lock(db) if db is not None else contextlib.nullcontext():
        run_id = _retry(find)
        if run_id is None:
            run_id = _retry(client.create_run, exp_id, run_name=f"dag {invocation}",
                            tags={"effdetr.invocation": invocation, "effdetr.parent": "true",
                                  "mlflow.source.name": "snakemake"}).info.run_id
    return run_id


def finish_invocation(invocation: str, status: str) -> list[str]:
    """Close every parent run of ``invocation`` (Snakemake's onsuccess / onerror)."""
    client = _connect()
    closed = []
    for exp in client.search_experiments():
        for run in client.search_runs([exp.experiment_id], filter_string=f"tags.`effdetr.invocation` = "
                                      f"'{invocation}' and tags.`effdetr.parent` = 'true'"):
            if run.info.status == "RUNNING":
                _retry(client.set_terminated, run.info.run_id, status)
                closed.append(run.info.run_id)
    return closed


def _link_parent(client, exp_id: str, tags: dict) -> dict:
    """The tags of a stage run, nested under its invocation's parent when it has one."""
    invocation = tags.get("effdetr.invocation")
    tags = {k: v for k, v in tags.items() if k != "mlflow.parentRunId"}  # a store's id, not the sidecar's
    if invocation:
        tags["mlflow.parentRunId"] = invocation_parent(client, exp_id, invocation)
    return tags


def init_store(experiment: str) -> str:
    """Create the schema and the experiment once, before parallel jobs start."""
    return _retry(experiment_id, _connect(), experiment)


def flatten(d: Any, prefix: str = "") -> dict[str, str]:
    out = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}." if prefix or k else k))
        return out
    out[prefix.rstrip(".")] = json.dumps(d) if isinstance(d, (list, tuple)) else str(d)
    return out


class Run:
    """One tracked invocation; use as a context manager. Logs go to the sidecar, then to MLflow.

    No method raises because of tracking: a store failure is warned about once and the run
    goes on in the sidecar alone (``sync`` completes it in the store later).

    Under torchrun only rank 0 tracks: on the other ranks (``RANK`` > 0) every method is a
    no-op, so a DDP command leaves one MLflow run and one sidecar."""

    def __init__(self, experiment: str, run_name: str, tags: dict[str, str], params: dict):
        self.uid = uuid.uuid4().hex
        invocation = {"effdetr.invocation": os.environ[INVOCATION_ENV]} if os.environ.get(INVOCATION_ENV) else {}
        self.record = {"uid": self.uid, "experiment": experiment, "run_name": run_name,
                       "tags": {**{k: str(v) for k, v in tags.items()}, "effdetr.uid": self.uid, **invocation},
                       "params": flatten(params), "metrics": [], "artifacts": [],
                       "status": "RUNNING", "mlflow_run_id": None, "start_time": int(time.time() * 1000),
                       "pid": os.getpid(), "host": socket.gethostname(), "tracking_errors": []}
        self.client = None
        self.run_id = None
        self._failed: set[str] = set()
        self.active = os.environ.get("RANK", "0") in ("", "0")

    # -- context management ---------------------------------------------------------------
    def __enter__(self) -> "Run":
        if not self.active:
            return self
        self._flush()
        try:
            self.client = _connect()
            exp_id = _retry(experiment_id, self.client, self.record["experiment"])
            run = _retry(self.client.create_run, exp_id, run_name=self.record["run_name"],
                         tags=_link_parent(self.client, exp_id, self.record["tags"]),
                         start_time=self.record["start_time"])
            self.run_id = run.info.run_id
            self.record["mlflow_run_id"] = self.run_id
            self._batch(params=self.record["params"])
        except Exception as e:  # noqa: BLE001 - tracking must never stop the science
            self._store_failed(e)
        self._flush()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if not self.active:
            return False
        self.record["status"] = "FINISHED" if exc_type is None else "FAILED"
        self.record["end_time"] = int(time.time() * 1000)
        self._flush()
        if self.client is not None:
            try:
                _retry(self.client.set_terminated, self.run_id, self.record["status"], self.record["end_time"])
            except Exception as e:  # noqa: BLE001
                self._store_failed(e)
        return False  # the science's own exception propagates

    @property
    def sidecar_path(self) -> Path:
        return SIDECAR_DIR / f"{self.uid}.json"

    def _warn_once(self, target: str, message: str) -> bool:
        """Print one ``[tracking]`` warning per target (store, sidecar) and note it in the record."""
        if target in self._failed:
            return False
        self._failed.add(target)
        self.record["tracking_errors"].append(message)
        with contextlib.suppress(Exception):
            print(f"[tracking] {message}", file=sys.stderr, flush=True)
        return True

    def _store_failed(self, e: Exception) -> None:
        """Stop using the store for this run; the sidecar keeps everything for ``effdetr mlflow sync``."""
        self.client = None
        if self._warn_once("store", f"MLflow store {tracking_uri()} failed ({type(e).__name__}: {e}); "
                                    f"the run goes on in the sidecar {self.sidecar_path} only, "
                                    "`effdetr mlflow sync` puts it in the store later"):
            self._flush()

    def _flush(self) -> None:
        tmp = self.sidecar_path.with_suffix(".tmp")
        try:
            SIDECAR_DIR.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(self.record, indent=1))
            tmp.replace(self.sidecar_path)
        except Exception as e:  # noqa: BLE001 - a full disk must not stop the science
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            self._warn_once("sidecar", f"sidecar {self.sidecar_path} could not be written "
                                       f"({type(e).__name__}: {e}); this run's tracking record is incomplete")

    def _batch(self, metrics=(), params=None) -> None:
        from mlflow.entities import Metric, Param
        ps = [Param(k, v[:6000]) for k, v in (params or {}).items()]
        ms = [Metric(m["key"], m["value"], m["timestamp"], m["step"]) for m in metrics]
        for i in range(0, max(len(ps), 1), 100):
            _retry(self.client.log_batch, self.run_id, metrics=ms if i == 0 else [], params=ps[i:i + 100])

    # -- logging ---------------------------------------------------------------------------
    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        if not self.active:
            return
        now = int(time.time() * 1000)
        entries = [{"key": k.replace("@", "_"), "value": float(v), "step": int(step), "timestamp": now}
                   for k, v in metrics.items() if v is not None]
        self.record["metrics"].extend(entries)
        self._flush()
        if self.client is not None:
            try:
                self._batch(metrics=entries)
            except Exception as e:  # noqa: BLE001
                self._store_failed(e)

    def log_artifact(self, path: str | Path) -> None:
        if not self.active:
            return
        path = Path(path)
        self.record["artifacts"].append(str(path))
        self._flush()
        if self.client is not None and path.exists():
            try:
                _retry(self.client.log_artifact, self.run_id, str(path))
            except Exception as e:  # noqa: BLE001
                self._store_failed(e)


OTHER_HOST_STALE_S = 24 * 3600  # a live run rewrites its sidecar at least every epoch


def _writer_gone(rec: dict, sidecar: Path) -> bool:
    """Whether the process that wrote a RUNNING sidecar can no longer finish it: dead on this
    host, or (its pid is not visible from here) another host's run silent for a day."""
    pid, host = rec.get("pid"), rec.get("host")
    if pid is None:
        return True  # sidecars from before pids were recorded
    if host != socket.gethostname():
        return time.time() - sidecar.stat().st_mtime > OTHER_HOST_STALE_S
    return not pid_alive(pid)


def _fill(client, run_id: str, rec: dict, status: str, existing=None) -> bool:
    """Log what the store's run lacks from its sidecar and close it; False when nothing was missing."""
    from mlflow.entities import Metric, Param, RunTag
    if existing and existing.info.status != "RUNNING" and set(rec["params"]) <= set(existing.data.params) \
            and {m["key"] for m in rec["metrics"]} <= set(existing.data.metrics):
        return False  # closed by its writer, which only does so after every log reached the store
    have_params = set(existing.data.params) if existing else set()
    have_metrics, have_artifacts = set(), set()
    if existing:
        for key in {m["key"] for m in rec["metrics"]}:
            have_metrics |= {(m.key, m.step, m.timestamp) for m in client.get_metric_history(run_id, key)}
        have_artifacts = {Path(f.path).name for f in client.list_artifacts(run_id)}
    params = [Param(k, v[:6000]) for k, v in rec["params"].items() if k not in have_params]
    metrics = [Metric(m["key"], m["value"], m["timestamp"], m["step"]) for m in rec["metrics"]
               if (m["key"], m["step"], m["timestamp"]) not in have_metrics]
    artifacts = [a for a in dict.fromkeys(rec["artifacts"]) if Path(a).name not in have_artifacts and Path(a).is_file()]
    terminate = existing is None or existing.info.status == "RUNNING"
    if not (params or metrics or artifacts or terminate):
        return False
    for i in range(0, max(len(params), len(metrics), 1), 100):
        client.log_batch(run_id, metrics=metrics[i:i + 100], params=params[i:i + 100],
                         tags=[RunTag("effdetr.synced", "true")] if i == 0 else [])
    for art in artifacts:
        client.log_artifact(run_id, art)
    if terminate:
        client.set_terminated(run_id, status, rec.get("end_time"))
    return True


def sync(sidecar_dir: Path = SIDECAR_DIR) -> tuple[list[str], list[str]]:
    """Re-import sidecar runs the store lacks and complete the ones it holds partially.

    Returns (imported uids, completed uids). A run whose writer is still alive is left to it;
    one whose writer died while RUNNING is closed as KILLED."""
    client = _connect()
    imported, completed = [], []
    for path in sorted(Path(sidecar_dir).glob("*.json")):
        rec = json.loads(path.read_text())
        if rec["status"] == "RUNNING" and not _writer_gone(rec, path):
            continue
        status = "KILLED" if rec["status"] == "RUNNING" else rec["status"]
        exp_id = _retry(experiment_id, client, rec["experiment"])
        found = client.search_runs([exp_id], filter_string=f"tags.`effdetr.uid` = '{rec['uid']}'")
        if found:
            run_id = found[0].info.run_id
            if not _fill(client, run_id, rec, status, found[0]):
                continue
            completed.append(rec["uid"])
        else:
            run_id = client.create_run(exp_id, run_name=rec["run_name"], tags=_link_parent(client, exp_id, rec["tags"]),
                                       start_time=rec["start_time"]).info.run_id
            _fill(client, run_id, rec, status)
            imported.append(rec["uid"])
        rec["status"], rec["mlflow_run_id"] = status, run_id
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(rec, indent=1))
        tmp.replace(path)
    return imported, completed


def _mlflow_opens(uri: str) -> bool:
    """Probe in a child process, so this one never caches a connection to a file about to move.

    A store that is merely busy (locked by live writers) counts as opening: it must not be moved."""
    import subprocess
    probe = "import sys; from mlflow.tracking import MlflowClient; MlflowClient(sys.argv[1])"
    r = subprocess.run([sys.executable, "-c", probe, uri], capture_output=True, text=True)
    return r.returncode == 0 or "database is locked" in r.stderr


def rebuild(sidecar_dir: Path = SIDECAR_DIR) -> tuple[Path | None, list[str], list[str]]:
    """Move a broken sqlite store aside (never deleted), then let ``sync`` refill a fresh one.

    Returns (where the broken store went or None, imported uids, completed uids). A healthy
    store stays in place and is only synced. Run it as its own command: a process that already
    opened the store keeps its connection to the old file."""
    uri = tracking_uri()
    db = _sqlite_path(uri)
    if db is None:
        raise RuntimeError(f"rebuild handles sqlite stores only, not {uri}")
    moved = None
    with _store_lock(db):
        state = _store_state(db, thorough=True)[0]
        if state == "broken" or (state == "ok" and not _mlflow_opens(uri)):
            stamp, n = time.strftime("%Y%m%d-%H%M%S"), 0
            moved = db.with_name(f"{db.name}.broken-{stamp}")
            while moved.exists():
                n += 1
                moved = db.with_name(f"{db.name}.broken-{stamp}-{n}")
            for suffix in ("-journal", "-wal", "-shm", ""):  # sqlite finds a journal by the db's name
                if Path(f"{db}{suffix}").exists():
                    Path(f"{db}{suffix}").rename(f"{moved}{suffix}")
    return (moved, *sync(sidecar_dir))
