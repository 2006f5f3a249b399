"""The files dvc.yaml's `plots:` name must be drawable by DVC's own converter, which drops a
data file whose rows do not all share their keys (a training history validates only every
``val_every`` epochs, so its rows differ)."""
from __future__ import annotations

import json
from pathlib import Path

import yaml
from dvc.render.converter.vega import get_datapoints

from effdetr import stages
from effdetr.reporting.figures import curve_rows

REPO = Path(__file__).resolve().parents[1]
HISTORY = [
    {"epoch": 0, "lr": 2e-4, "train_loss": 8.6, "train_loss_ce": 0.4},
    {"epoch": 1, "lr": 2e-4, "train_loss": 6.6, "train_loss_ce": 0.3, "val_AP": 0.11, "val_AP50": 0.3},
    {"epoch": 2, "lr": 2e-5, "train_loss": 6.1, "train_loss_ce": 0.3},
]


def test_a_raw_history_with_sparse_validation_is_not_drawable_by_dvc():
    assert get_datapoints(HISTORY) == []  # why the curves are drawn from the table's files


def test_curve_rows_are_drawable_and_keep_every_epoch():
    rows = curve_rows(HISTORY)
    points = get_datapoints(rows)
    assert [p["epoch"] for p in points] == [0, 1, 2]
    assert [p["train_loss"] for p in points] == [8.6, 6.6, 6.1]
    assert [p["val_AP"] for p in points] == [None, 0.11, None]


def test_every_top_level_plot_is_a_table_figure_file_and_trainings_declare_no_plots():
    doc = yaml.safe_load(stages.render_dvc(stages.load_raw(str(REPO / "params.yaml"))))
    files = {path for entry in doc["plots"] for plot in entry.values() for path in plot["y"]}
    assert files and all(f.startswith("reports/figures/") for f in files)
    assert any(f.endswith("_curve.json") for f in files) and any(f.endswith("_reproduced.json") for f in files)
    for name, st in doc["stages"].items():
        if name.startswith("train_"):
            assert "plots" not in st, name


def test_committed_plot_files_are_drawable():
    """The committed reports: each file a top-level plot names exists and DVC finds its rows."""
    doc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    for entry in doc["plots"]:
        for plot in entry.values():
            for path in plot["y"]:
                rows = json.loads((REPO / path).read_text())
                assert rows and get_datapoints(rows), path
