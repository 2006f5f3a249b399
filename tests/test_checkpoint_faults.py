"""Faulty weights, data and disks stop train/eval with the file (and tensor / image) named,
instead of exiting 0 with a NaN or untrained model (issue 16)."""
import dataclasses
import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from effdetr.cli import main
from effdetr.engine.checkpoint import (
    DiskFullError,
    NonFiniteError,
    build_trained_model,
    first_nonfinite,
    save_atomic,
)
from effdetr.engine.evaluate import evaluate_dataset, mean_flops
from effdetr.engine.train import TrainingDiverged, train
from effdetr.models import build_model
from tests.conftest import TINY


def small(tiny_cfg, **train_kw):
    """One epoch of two iterations, a snapshot after each: last.pt = (epoch 1, iter 0), prev.pt = (0, 1)."""
    backbone = dataclasses.replace(tiny_cfg.model.backbone, pretrained="none")
    model = dataclasses.replace(tiny_cfg.model, backbone=backbone)
    kw = {"epochs": 1, "max_iters_per_epoch": 2, "checkpoint_every_iters": 1} | train_kw
    return dataclasses.replace(tiny_cfg, model=model, train=dataclasses.replace(tiny_cfg.train, **kw))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_cfg, tiny_data):
    """An uninterrupted reference run: its final model and its two snapshots."""
    root = tmp_path_factory.mktemp("ref")
    train(small(tiny_cfg), str(tiny_data), str(root / "model.pt"), str(root / "work"), "h")
    return root


def copy_work(trained, tmp_path) -> Path:
    shutil.copytree(trained / "work", tmp_path / "work")
    return tmp_path / "work"


def set_first(t: torch.Tensor, value: float = float("nan")) -> None:
    t[(0,) * t.dim()] = value


def poison(path: Path, key: str = "model") -> str:
    """Put a NaN into the first floating tensor of ``state[key]``; returns its name."""
    st = torch.load(path, weights_only=False)
    name = next(k for k, v in st[key].items() if v.is_floating_point())
    set_first(st[key][name])
    torch.save(st, path)
    return name


def same_weights(a: Path, b: Path) -> bool:
    ma, mb = (torch.load(p, weights_only=True)["model"] for p in (a, b))
    return ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)


def test_first_nonfinite_walks_nested_optimizer_state():
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p])
    p.grad = torch.ones(3)
    opt.step()
    sd = opt.state_dict()
    assert first_nonfinite({"optimizer": sd, "rng": torch.zeros(4, dtype=torch.uint8)}) is None
    sd["state"][0]["exp_avg_sq"][1] = float("inf")
    assert first_nonfinite({"optimizer": sd}) == "optimizer.state.0.exp_avg_sq"


# --- non-finite weights and outputs (cases 2, 16) --------------------------------------

def test_nan_model_file_is_an_error_at_load_and_in_eval(tmp_path, capsys, tiny_cfg, tiny_data):
    model = build_model(small(tiny_cfg).model)
    sd = model.state_dict()
    key = "class_embed.weight" if "class_embed.weight" in sd else next(iter(sd))
    set_first(sd[key])
    torch.save({"model": sd, "model_config": dataclasses.asdict(small(tiny_cfg).model)}, tmp_path / "nan.pt")
    with pytest.raises(NonFiniteError, match=rf"nan.pt: tensor 'model.{key}' has NaN/Inf"):
        build_trained_model(tmp_path / "nan.pt")
    assert main(["eval", "--params", str(TINY), "--experiment", "detr_dc5", "--data", str(tiny_data),
                 "--out", str(tmp_path / "e.json"), "--checkpoint", str(tmp_path / "nan.pt")]) == 2
    assert f"nan.pt: tensor 'model.{key}'" in capsys.readouterr().err
    assert not (tmp_path / "e.json").exists()


def val_dataset(cfg, root, ann=None):
    from effdetr.data.coco import CocoDetection, split_paths
    from effdetr.data.transforms import build_transforms
    img_dir, default = split_paths(cfg.data, "val", root)
    return CocoDetection(img_dir, ann or default, build_transforms(cfg.input, train=False), cfg.model.num_classes)


def test_nonfinite_outputs_or_weights_are_an_error_before_scoring(tiny_cfg, tiny_data, monkeypatch):
    cfg = small(tiny_cfg)
    dataset = val_dataset(cfg, tiny_data)
    model = build_model(cfg.model)

    def nan_second_image(module, inputs, out):
        out["pred_boxes"][1, 0, 0] = float("nan")
    handle = model.register_forward_hook(nan_second_image)
    import effdetr.engine.evaluate as ev
    monkeypatch.setattr(ev, "coco_evaluate", lambda *a, **k: pytest.fail("AP computed for NaN outputs"))
    second = dataset.images[1]["id"]
    with pytest.raises(NonFiniteError, match=rf"pred_boxes has NaN/Inf values for image id {second}\b"):
        evaluate_dataset(model, dataset, torch.device("cpu"), 8, 0, cfg.data.area_ranges)
    handle.remove()
    with torch.no_grad():
        set_first(next(model.parameters()))
    with pytest.raises(NonFiniteError, match="model to evaluate: tensor"):
        evaluate_dataset(model, dataset, torch.device("cpu"), 8, 0, cfg.data.area_ranges)


def test_nan_resumable_state_without_older_snapshot_is_an_error(trained, tmp_path, tiny_cfg, tiny_data):
    work = copy_work(trained, tmp_path)
    (work / "prev.pt").unlink(missing_ok=True)
    name = poison(work / "last.pt")
    with pytest.raises(RuntimeError, match=rf"last.pt: tensor 'model.{name}' has NaN/Inf.*prev.pt is missing"):
        train(small(tiny_cfg), str(tiny_data), str(tmp_path / "model.pt"), str(work), "h")
    assert not (tmp_path / "model.pt").exists()
    assert (work / "last.pt").exists()  # left for inspection, never deleted


def test_divergence_is_an_error_and_keeps_the_last_good_state(tmp_path, tiny_cfg, tiny_data):
    """Weights turn NaN while the loss stays finite (a BN running statistic, unused in
    training mode): no snapshot and no final model is written with them."""
    state = {}

    def builder(model_cfg):
        model = build_model(model_cfg)
        name, bn = next((n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d))
        state["key"] = f"model.{name}.running_mean"

        def on_second_forward(module, inputs):
            state["calls"] = state.get("calls", 0) + 1
            if state["calls"] == 2:
                bn.running_mean.fill_(float("nan"))
        model.register_forward_pre_hook(on_second_forward)
        return model
    work = tmp_path / "work"
    with pytest.raises(TrainingDiverged, match="training diverged: tensor") as err:
        train(small(tiny_cfg), str(tiny_data), str(tmp_path / "model.pt"), str(work), "h", model_builder=builder)
    assert f"'{state['key']}' has NaN/Inf values before writing {work / 'last.pt'}" in str(err.value)
    assert not (tmp_path / "model.pt").exists()
    st = torch.load(work / "last.pt", weights_only=False)
    assert (st["epoch"], st["iter"]) == (0, 1) and first_nonfinite(st["model"]) is None


def test_nonfinite_loss_after_resume_names_the_state_file(trained, tmp_path, tiny_cfg, tiny_data, monkeypatch):
    import effdetr.engine.train as tr
    real = tr.build_criterion

    def nan_criterion(model_cfg, loss_cfg):
        crit = real(model_cfg, loss_cfg)
        crit.total = lambda losses, num_aux: torch.tensor(float("nan"))
        return crit
    monkeypatch.setattr(tr, "build_criterion", nan_criterion)
    work = copy_work(trained, tmp_path)
    with pytest.raises(TrainingDiverged, match=rf"resumed from {work / 'last.pt'}\): loss is nan at epoch 1 iter 0"):
        train(small(tiny_cfg, epochs=2), str(tiny_data), str(tmp_path / "model.pt"), str(work), "h")


# --- two snapshots: a bad last.pt falls back to prev.pt (case 11) ------------------------

def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage", [truncate, poison], ids=["truncated", "nan"])
def test_bad_last_state_resumes_from_the_older_one(damage, trained, tmp_path, capsys, tiny_cfg, tiny_data):
    work = copy_work(trained, tmp_path)
    damage(work / "last.pt")
    bad_bytes = (work / "last.pt").read_bytes()
    train(small(tiny_cfg), str(tiny_data), str(tmp_path / "model.pt"), str(work), "h")
    out = capsys.readouterr()
    assert f"resuming from {work / 'prev.pt'}: epoch 0 iter 1" in out.out
    assert str(work / "last.pt") in out.err and f"older snapshot {work / 'prev.pt'}" in out.err
    assert (work / "last.pt.bad-1").read_bytes() == bad_bytes  # moved aside, not deleted
    assert same_weights(tmp_path / "model.pt", trained / "model.pt")  # exact resume from the older state


def test_no_good_snapshot_names_both_files(trained, tmp_path, tiny_cfg, tiny_data):
    work = copy_work(trained, tmp_path)
    st = torch.load(work / "last.pt", weights_only=False)
    truncate(work / "last.pt")
    set_first(st["optimizer"]["state"][0]["exp_avg"], float("inf"))
    torch.save(st, work / "prev.pt")
    with pytest.raises(RuntimeError, match=r"last.pt: not a readable .*prev.pt: tensor 'optimizer.state.0.exp_avg'"):
        train(small(tiny_cfg), str(tiny_data), str(tmp_path / "model.pt"), str(work), "h")
    assert sorted(p.name for p in work.iterdir()) == ["last.pt", "prev.pt"]


def test_snapshots_rotate(tmp_path):
    save_atomic({"v": 1}, tmp_path / "last.pt", previous=tmp_path / "prev.pt")
    assert not (tmp_path / "prev.pt").exists()
    save_atomic({"v": 2}, tmp_path / "last.pt", previous=tmp_path / "prev.pt")
    assert torch.load(tmp_path / "last.pt")["v"] == 2 and torch.load(tmp_path / "prev.pt")["v"] == 1


def test_a_kill_during_rotation_leaves_a_complete_last(tmp_path, monkeypatch):
    """Killed after the old state became prev.pt but before the new one became last.pt: a
    complete last.pt must still exist (else the newest state sits only in a temp file that
    the next save removes as stale)."""
    import effdetr.engine.checkpoint as ck
    last, prev = tmp_path / "last.pt", tmp_path / "prev.pt"
    save_atomic({"v": 1}, last, previous=prev)
    real_replace = os.replace

    def killed_before_last(src, dst):
        if Path(dst) == last:
            raise KeyboardInterrupt  # the kill
        return real_replace(src, dst)
    monkeypatch.setattr(ck.os, "replace", killed_before_last)
    with pytest.raises(KeyboardInterrupt):
        save_atomic({"v": 2}, last, previous=prev)
    assert torch.load(last)["v"] == 1 and torch.load(prev)["v"] == 1


# --- empty splits (cases 3, 8) ------------------------------------------------------------

def data_copy(tiny_data, tmp_path, split, edit) -> Path:
    """``tiny_data`` with one annotation file edited (images shared by symlink)."""
    root = tmp_path / "data"
    (root / "annotations").mkdir(parents=True)
    (root / "images").symlink_to(tiny_data / "images")
    for f in (tiny_data / "annotations").iterdir():
        d = json.loads(f.read_text())
        if f.name == f"instances_{split}.json":
            edit(d)
        (root / "annotations" / f.name).write_text(json.dumps(d))
    return root


def no_images(d):
    d["images"], d["annotations"] = [], []


def all_crowd(d):
    for a in d["annotations"]:
        a["iscrowd"] = 1


@pytest.mark.parametrize("edit,why", [(no_images, "has no images"), (all_crowd, "has no usable annotations")])
def test_empty_train_split_is_an_error_before_building_the_model(edit, why, tmp_path, tiny_cfg, tiny_data):
    root = data_copy(tiny_data, tmp_path, "train", edit)
    with pytest.raises(ValueError, match=rf"instances_train.json: the train split {why}"):
        train(small(tiny_cfg), str(root), str(tmp_path / "model.pt"), str(tmp_path / "work"), "h",
              model_builder=lambda cfg: pytest.fail("model built for an empty split"))
    assert not (tmp_path / "model.pt").exists()


def test_empty_val_split_is_an_error_naming_the_annotation_file(tmp_path, tiny_cfg, tiny_data):
    cfg = small(tiny_cfg)
    root = data_copy(tiny_data, tmp_path, "val", no_images)
    dataset = val_dataset(cfg, root)
    model = build_model(cfg.model)
    with pytest.raises(ValueError, match=r"instances_val.json: the split has no images"):
        evaluate_dataset(model, dataset, torch.device("cpu"), 8, 0, cfg.data.area_ranges, flops_images=2)
    with pytest.raises(ValueError, match=r"instances_val.json: no images"):
        mean_flops(model, dataset, 2)


# --- full disk, stale temporary files (case 10) -------------------------------------------

@pytest.mark.parametrize("error", [
    RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0"),
    OSError(errno.ENOSPC, "No space left on device"),
], ids=["torch", "oserror"])
def test_full_disk_keeps_the_previous_file(error, tmp_path, monkeypatch):
    path = tmp_path / "m.pt"
    save_atomic({"v": torch.arange(4)}, path)
    good = path.read_bytes()

    def partial_save(obj, f):
        Path(f).write_bytes(good[:10])
        raise error
    monkeypatch.setattr(torch, "save", partial_save)
    with pytest.raises(DiskFullError, match=rf"no space left on {tmp_path}"):
        save_atomic({"v": torch.arange(8)}, path)
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]  # temporary file removed


def test_stale_temp_files_of_dead_writers_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    dead_pid, live_pid = int(dead.stdout), 1  # pid 1 is always alive
    for pid in (dead_pid, live_pid):
        (tmp_path / f".m.pt.tmp.{pid}").write_bytes(b"partial")
    (tmp_path / ".other.pt.tmp.1234567").write_bytes(b"another file's")
    save_atomic({"v": 1}, tmp_path / "m.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".m.pt.tmp.1", ".other.pt.tmp.1234567", "m.pt"]
