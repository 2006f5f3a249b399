"""The figures a table stage draws: the paper-vs-reproduced trade-off curve its paper YAML
names, the training curves of its experiments, and ACT's prototypes per encoder layer."""
from __future__ import annotations

import json
from pathlib import Path

from .plan import TablePlan
from ..utils.records import history_path
from .values import read_json


def tradeoff_data_file(figure_file: str, source: str) -> str:
    """``sparse_ap_vs_gflops.png`` + ``paper`` -> ``sparse_ap_vs_gflops_paper.json``."""
    return f"{Path(figure_file).stem}_{source}.json"


CURVE_FIELDS = ("epoch", "train_loss", "val_AP")


def curve_data_file(experiment: str) -> str:
    """``detr_dc5`` -> ``detr_dc5_curve.json``: the training curve as data for `dvc plots show`."""
    return f"{experiment}_curve.json"


def curve_rows(history: list[dict]) -> list[dict]:
    """One row per epoch with the same keys in every row, ``None`` where an epoch was not
    validated: DVC draws a data file only when all its rows share their keys, and a training
    history validates every ``val_every`` epochs only."""
    return [{k: rec.get(k) for k in CURVE_FIELDS} for rec in history]


def table_figures(plan: TablePlan, reproduced: dict[str, dict], metrics_dir: Path, fig_dir: Path) -> list[Path]:
    from .plots import plot_placeholder, plot_prototypes_per_layer, plot_tradeoff, plot_training_curves
    fig_dir.mkdir(parents=True, exist_ok=True)
    written = []
    spec = plan.spec
    if spec.get("figure"):
        fig = spec["figure"]
        series = {"paper": {}, "reproduced": {}}
        for key in fig["rows"]:
            row = spec["rows"][key]
            label = row.get("label", key)
            if row.get(fig["x"]) is not None and row.get(fig["y"]) is not None:
                series["paper"][label] = (row[fig["x"]], row[fig["y"]])
            got = reproduced.get(key, {})
            if got.get(fig["x"]) is not None and got.get(fig["y"]) is not None:
                series["reproduced"][label] = (got[fig["x"]], got[fig["y"]])
        baselines = tuple(spec["rows"][k].get("label", k) for k in fig.get("baselines", []))
        out = fig_dir / fig["file"]
        plot_tradeoff(series, fig["x"], fig["y"], spec["title"], out, baselines)
        written.append(out)
        # the same points as data: `dvc plots show` draws them (dvc.yaml's top-level plots)
        for source, points in series.items():
            data = fig_dir / tradeoff_data_file(fig["file"], source)
            rows = [{"model": label, fig["x"]: x, fig["y"]: y} for label, (x, y) in points.items()]
            data.write_text(json.dumps(rows, indent=1) + "\n")
            written.append(data)
    for name in plan.curves:
        history = read_json(history_path(metrics_dir / name / "train.json"))
        if history:
            out = fig_dir / f"{name}_training.png"
            plot_training_curves(history, f"{name}: training losses per epoch", out)
            data = fig_dir / curve_data_file(name)
            data.write_text(json.dumps(curve_rows(history), indent=1) + "\n")
            written += [out, data]
    layers = {n: ev for n in plan.swaps
              if (ev := read_json(metrics_dir / n / "eval.json")) and "prototypes_layer0" in ev}
    if layers:
        out = fig_dir / "prototypes_per_layer.png"
        plot_prototypes_per_layer(dict(sorted(layers.items())), out)
        written.append(out)
    for name in plan.figures:  # every declared figure exists, drawn or not
        out = fig_dir / name
        if out not in written:
            plot_placeholder(name, "not run yet", out)
            written.append(out)
    return written
