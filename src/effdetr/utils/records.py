"""Where a stage's record goes beside its metrics file (no torch: the stage table reads this).

A metrics file holds numbers only -- what ``dvc metrics show`` lists and the tables read. What
made them (experiment, commit, params hash, MLflow run, device, settings) goes to its sidecar,
``<stem>.provenance.json``; a training's per-epoch history (DVC plots' input) to
``<stem>_history.json``.
"""
from __future__ import annotations

from pathlib import Path


def provenance_path(metrics: str | Path) -> Path:
    p = Path(metrics)
    return p.with_name(f"{p.stem}.provenance.json")


def history_path(metrics: str | Path) -> Path:
    p = Path(metrics)
    return p.with_name(f"{p.stem}_history.json")
