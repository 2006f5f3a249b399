"""MLflow tracking (the only module that imports mlflow) with a JSON sidecar per run.

Every CLI invocation is one MLflow run tagged with paper, table, stage, experiment, git
sha + dirty flag and params hash. Everything logged is also appended to a sidecar JSON
(``mlruns/sidecars/<uid>.json``) so ``effdetr mlflow sync`` can re-import any run the
store lost (e.g. a SQLite race or a deleted database). Store calls retry with backoff.
"""
from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

DEFAULT_URI = "sqlite:///mlruns/mlflow.db"
SIDECAR_DIR = Path("mlruns/sidecars")
ARTIFACT_DIR = Path("mlruns/artifacts")


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_URI)


def _client():
    import mlflow
    from mlflow.tracking import MlflowClient
    uri = tracking_uri()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    return MlflowClient(uri)


def _retry(fn, *args, attempts: int = 6, **kwargs):
    delay = 0.5
    for i in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception:  # noqa: BLE001 - store races (sqlite locks, schema creation)
            if i == attempts - 1:
                raise
            time.sleep(delay)
            delay *= 2


def experiment_id(client, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=ARTIFACT_DIR.resolve().as_uri())
    except Exception:  # noqa: BLE001 - another process created it first
        return client.get_experiment_by_name(name).experiment_id


def init_store(experiment: str) -> str:
    """Create the schema and the experiment once, before parallel jobs start."""
    client = _retry(_client)
    return _retry(experiment_id, client, experiment)


def flatten(d: Any, prefix: str = "") -> dict[str, str]:
    out = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}." if prefix or k else k))
        return out
    out[prefix.rstrip(".")] = json.dumps(d) if isinstance(d, (list, tuple)) else str(d)
    return out


class Run:
    """One tracked invocation; use as a context manager. Logs go to MLflow and the sidecar."""

    def __init__(self, experiment: str, run_name: str, tags: dict[str, str], params: dict):
        self.uid = uuid.uuid4().hex
        self.record = {"uid": self.uid, "experiment": experiment, "run_name": run_name,
                       "tags": {**{k: str(v) for k, v in tags.items()}, "effdetr.uid": self.uid},
                       "params": flatten(params), "metrics": [], "artifacts": [],
                       "status": "RUNNING", "mlflow_run_id": None, "start_time": int(time.time() * 1000)}
        self.client = None
        self.run_id = None

    # -- context management ---------------------------------------------------------------
    def __enter__(self) -> "Run":
        SIDECAR_DIR.mkdir(parents=True, exist_ok=True)
        try:
            self.client = _retry(_client)
            exp_id = _retry(experiment_id, self.client, self.record["experiment"])
            run = _retry(self.client.create_run, exp_id, run_name=self.record["run_name"],
                         tags=self.record["tags"], start_time=self.record["start_time"])
            self.run_id = run.info.run_id
            self.record["mlflow_run_id"] = self.run_id
            self._batch(params=self.record["params"])
        except Exception as e:  # noqa: BLE001 - tracking must never stop the science
            print(f"[tracking] MLflow unavailable ({e}); run kept in sidecar {self.sidecar_path}")
            self.client = None
        self._flush()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.record["status"] = "FINISHED" if exc_type is None else "FAILED"
        self.record["end_time"] = int(time.time() * 1000)
        if self.client is not None:
            try:
                _retry(self.client.set_terminated, self.run_id, self.record["status"], self.record["end_time"])
            except Exception as e:  # noqa: BLE001
                print(f"[tracking] could not close MLflow run: {e}")
        self._flush()

    @property
    def sidecar_path(self) -> Path:
        return SIDECAR_DIR / f"{self.uid}.json"

    def _flush(self) -> None:
        tmp = self.sidecar_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.record, indent=1))
        tmp.replace(self.sidecar_path)

    def _batch(self, metrics=(), params=None) -> None:
        from mlflow.entities import Metric, Param
        ps = [Param(k, v[:6000]) for k, v in (params or {}).items()]
        ms = [Metric(m["key"], m["value"], m["timestamp"], m["step"]) for m in metrics]
        for i in range(0, max(len(ps), 1), 100):
            _retry(self.client.log_batch, self.run_id, metrics=ms if i == 0 else [], params=ps[i:i + 100])

    # -- logging ---------------------------------------------------------------------------
    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        now = int(time.time() * 1000)
        entries = [{"key": k.replace("@", "_"), "value": float(v), "step": int(step), "timestamp": now}
                   for k, v in metrics.items() if v is not None]
        self.record["metrics"].extend(entries)
        if self.client is not None:
            try:
                self._batch(metrics=entries)
            except Exception as e:  # noqa: BLE001
                print(f"[tracking] metric logging failed, kept in sidecar: {e}")
        self._flush()

    def log_artifact(self, path: str | Path) -> None:
        path = Path(path)
        self.record["artifacts"].append(str(path))
        if self.client is not None and path.exists():
            try:
                _retry(self.client.log_artifact, self.run_id, str(path))
            except Exception as e:  # noqa: BLE001
                print(f"[tracking] artifact upload failed, kept in sidecar: {e}")
        self._flush()


def sync(sidecar_dir: Path = SIDECAR_DIR) -> list[str]:
    """Re-import every sidecar run whose ``effdetr.uid`` tag the store does not have."""
    from mlflow.entities import Metric, Param, RunTag
    client = _retry(_client)
    imported = []
    for path in sorted(Path(sidecar_dir).glob("*.json")):
        rec = json.loads(path.read_text())
        exp_id = _retry(experiment_id, client, rec["experiment"])
        found = client.search_runs([exp_id], filter_string=f"tags.`effdetr.uid` = '{rec['uid']}'")
        if found:
            continue
        run = client.create_run(exp_id, run_name=rec["run_name"], tags=rec["tags"], start_time=rec["start_time"])
        params = [Param(k, v[:6000]) for k, v in rec["params"].items()]
        metrics = [Metric(m["key"], m["value"], m["timestamp"], m["step"]) for m in rec["metrics"]]
        for i in range(0, max(len(params), len(metrics), 1), 100):
            client.log_batch(run.info.run_id, metrics=metrics[i:i + 100], params=params[i:i + 100],
                             tags=[RunTag("effdetr.synced", "true")] if i == 0 else [])
        for art in rec["artifacts"]:
            if Path(art).exists():
                client.log_artifact(run.info.run_id, art)
        status = rec["status"] if rec["status"] != "RUNNING" else "KILLED"
        client.set_terminated(run.info.run_id, status, rec.get("end_time"))
        rec["mlflow_run_id"] = run.info.run_id
        path.write_text(json.dumps(rec, indent=1))
        imported.append(rec["uid"])
    return imported
