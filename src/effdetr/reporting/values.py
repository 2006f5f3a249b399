"""Reproduced numbers as the tables read them, from the metrics JSON files the stages wrote
(AP-type metrics in percent, as the papers print them; GFLOPs = GMACs)."""
from __future__ import annotations

import json
import math
from pathlib import Path

from ..utils.records import provenance_path

AP_KEYS = {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"}


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def read_record(path: Path) -> tuple[dict | None, dict]:
    """A stage's metrics (None if not run) and its provenance sidecar ({} if absent)."""
    return read_json(path), read_json(provenance_path(path)) or {}


def experiment_values(metrics_dir: Path, name: str) -> tuple[dict, list[dict]]:
    """Reproduced numbers of one experiment (AP-type in percent, as the papers print them)."""
    ev, ev_rec = read_record(metrics_dir / name / "eval.json")
    tr, tr_rec = read_record(metrics_dir / name / "train.json")
    values, prov = {}, []
    if ev:
        for k, v in ev.items():
            values[k] = 100 * v if k in AP_KEYS else v
            if k.startswith("gmacs_"):  # the papers' "GFLOPs" are multiply-adds
                values["gflops_" + k.removeprefix("gmacs_")] = v
        prov.append({"what": f"eval {name}", "precision": ev_rec.get("precision", "fp32"),
                     **ev_rec.get("provenance", {}), "file": str(metrics_dir / name / "eval.json")})
    if tr:
        values["train_seconds"] = tr["train_seconds"]
        prov.append({"what": f"train {name}", **tr_rec.get("provenance", {}),
                     "file": str(metrics_dir / name / "train.json")})
    return values, prov


def seed_values(metrics_dir: Path, names: list[str]) -> tuple[dict, list[dict]]:
    """One row from several seeds of an experiment: the mean of every metric all of them
    report, and its sample standard deviation as ``<metric>_sd``."""
    runs, prov = [], []
    for n in names:
        values, p = experiment_values(metrics_dir, n)
        if values:
            runs.append(values)
        prov += p
    if len(runs) < len(names):
        return {}, prov  # not every seed has run yet
    out = {}
    for k in set.intersection(*(set(r) for r in runs)):
        xs = [r[k] for r in runs]
        if all(isinstance(x, (int, float)) for x in xs):
            mean = sum(xs) / len(xs)
            out[k] = mean
            out[k + "_sd"] = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    out["seeds"] = len(runs)
    return out, prov


def seed_spreads(metrics_dir: Path, seed_spread: dict[str, list[str]]) -> dict[str, dict]:
    """family -> {metric: max - min over its repeated runs} for the AP-type metrics, plus
    ``runs`` (the experiments, once all of them have been evaluated)."""
    out = {}
    for fam, runs in seed_spread.items():
        values = [experiment_values(metrics_dir, r)[0] for r in runs]
        if not all(values):
            continue
        spread = {m: max(v[m] for v in values) - min(v[m] for v in values)
                  for m in AP_KEYS if all(m in v for v in values)}
        out[fam] = {**spread, "runs": runs}
    return out


def add_gains(spec: dict, reproduced: dict[str, dict]) -> None:
    """``gain_vs: row``: ``<metric>_gain`` = this row's metric minus that row's (means)."""
    for key, row in spec["rows"].items():
        base = reproduced.get(row.get("gain_vs"), {})
        mine = reproduced.get(key, {})
        for m in list(mine):
            if isinstance(mine[m], float) and not m.endswith(("_sd", "_gain")) and m in base:
                mine[m + "_gain"] = mine[m] - base[m]


def flops_values(metrics_dir: Path) -> tuple[dict[str, dict], list[dict], dict | None]:
    """Paper-scale FLOPs rows; the third value: the run's settings (``input_sizes`` per model)."""
    data, rec = read_record(metrics_dir / "flops.json")
    if not data:
        return {}, [], None
    rows = {name: {"gflops": m["gmacs"]["total"], "params_m": m["params_m"],
                   **{f"gflops_{k}": v for k, v in m["gmacs"].items() if k != "total"},
                   **{k: v for k, v in m.items() if k.startswith("token_share_")}}
            for name, m in data["models"].items()}
    return rows, [{"what": "flops", **rec.get("provenance", {}), "file": str(metrics_dir / "flops.json")}], rec


def speed_values(metrics_dir: Path) -> tuple[dict[str, dict], list[dict], dict | None]:
    """Encoder timing rows (see evaluation/speed.py); speedup = dense ms / this ms. The third
    value: the run's settings (device, environment, protocol)."""
    data, rec = read_record(metrics_dir / "speed.json")
    if not data:
        return {}, [], None
    dense = data["results"].get("dense", {}).get("ms")
    rows = {label: {**r, "speedup": (dense / r["ms"]) if dense and r.get("ms") else None}
            for label, r in data["results"].items()}
    return rows, [{"what": "speed", **rec.get("provenance", {}), "file": str(metrics_dir / "speed.json")}], rec
