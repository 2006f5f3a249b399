"""Resume edge cases (issue 20, 3.5), in-process through the engine's ``train()``: a kill
right after the epoch-boundary snapshot, a kill after the last epoch's snapshot but before
the final model is written, a distilled run (the adapters' state), and a resumable state
written for other params. A "kill" is an exception raised right after a chosen snapshot is
safely on disk -- the files SIGKILL leaves behind at that moment (test_resume.py kills for
real). With no loader workers every sample reseeds the RNG, so in-process runs are bitwise
comparable."""
import dataclasses
import shutil

import pytest
import torch

from effdetr import config as C
from effdetr.engine import train as engine
from effdetr.engine.checkpoint import save_atomic
from effdetr.models import build_model


pytestmark = pytest.mark.one_thread  # see conftest.one_thread


class Killed(Exception):
    """Stands for SIGKILL right after a snapshot."""


def small(tiny_cfg, **train_kw):
    """2 epochs x 2 iterations of 4 images, a snapshot after every iteration: the states written are
    (epoch 0, iter 1), (1, 0) the epoch boundary, (1, 1), (2, 0) after the last epoch,
    then the final model file."""
    backbone = dataclasses.replace(tiny_cfg.model.backbone, pretrained="none")
    model = dataclasses.replace(tiny_cfg.model, backbone=backbone)
    kw = {"epochs": 2, "max_iters_per_epoch": 2, "checkpoint_every_iters": 1, "batch_size": 4} | train_kw
    return dataclasses.replace(tiny_cfg, model=model, train=dataclasses.replace(tiny_cfg.train, **kw))


def kill_after_state(monkeypatch, epoch: int, it: int):
    """Make the run die right after writing the resumable state (epoch, it)."""
    real = engine.save_atomic

    def save_then_die(obj, path, previous=None):
        real(obj, path, previous=previous)
        if isinstance(obj, dict) and (obj.get("epoch"), obj.get("iter")) == (epoch, it) and "rng" in obj:
            raise Killed(f"after writing {path} at epoch {epoch} iter {it}")
    monkeypatch.setattr(engine, "save_atomic", save_then_die)


def strip(history):
    return [{k: v for k, v in e.items() if k != "epoch_seconds"} for e in history]


def weights(path):
    return torch.load(path, weights_only=True)["model"]


def assert_same_weights(a: dict, b: dict):
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


@pytest.fixture(scope="module")
def reference(tiny_cfg, tiny_data, tmp_path_factory):
    """The uninterrupted run: its result, final model file and work dir."""
    root = tmp_path_factory.mktemp("ref")
    result = engine.train(small(tiny_cfg), str(tiny_data), str(root / "model.pt"), str(root / "work"), "h")
    return {"result": result, "model": root / "model.pt", "work": root / "work"}


def kill_then_resume(tiny_cfg, tiny_data, tmp_path, monkeypatch, capsys, epoch, it):
    """Run until killed after state (epoch, it); rerun -> (the rerun's result, its stdout)."""
    args = (small(tiny_cfg), str(tiny_data), str(tmp_path / "model.pt"), str(tmp_path / "work"), "h")
    with monkeypatch.context() as mp:
        kill_after_state(mp, epoch, it)
        with pytest.raises(Killed):
            engine.train(*args)
    assert not (tmp_path / "model.pt").exists()
    st = torch.load(tmp_path / "work" / "last.pt", weights_only=False)
    assert (st["epoch"], st["iter"]) == (epoch, it)
    capsys.readouterr()
    result = engine.train(*args)
    return result, capsys.readouterr().out


def test_kill_at_the_epoch_boundary_resumes_at_the_next_epoch(reference, tiny_cfg, tiny_data, tmp_path,
                                                              monkeypatch, capsys):
    """Killed right after epoch 0's closing snapshot: the rerun starts epoch 1 at iteration 0,
    runs its two iterations once, does not repeat epoch 0 (history has each epoch once) and
    ends bitwise equal to the uninterrupted run."""
    result, out = kill_then_resume(tiny_cfg, tiny_data, tmp_path, monkeypatch, capsys, 1, 0)
    assert f"resuming from {tmp_path / 'work' / 'last.pt'}: epoch 1 iter 0\n" in out
    assert "epoch 0 iter" not in out and "epoch 1 iter 1/2" in out and "epoch 1 iter 2/2" in out
    assert [e["epoch"] for e in result["history"]] == [0, 1]
    assert strip(result["history"]) == strip(reference["result"]["history"])
    assert_same_weights(weights(tmp_path / "model.pt"), weights(reference["model"]))


def test_a_resumed_runs_training_time_includes_the_sessions_before(reference, tiny_cfg, tiny_data, tmp_path,
                                                                    capsys):
    """train_seconds of a run that spans sessions is their sum (each up to its last snapshot),
    not the last session's alone: the snapshot carries the time trained so far. Checked by
    the bookkeeping (a snapshot that says 1000 s were trained), not by timing anything."""
    work = tmp_path / "work"
    shutil.copytree(reference["work"], work)
    st = torch.load(work / "last.pt", weights_only=False)
    assert st["trained_seconds"] > 0
    earlier = st["trained_seconds"] + 1000.0  # as if an earlier session had trained 1000 s more
    save_atomic({**st, "trained_seconds": earlier}, work / "last.pt")
    result = engine.train(small(tiny_cfg), str(tiny_data), str(tmp_path / "model.pt"), str(work), "h")
    assert result["train_seconds"] >= earlier


def test_kill_after_the_last_epoch_writes_the_model_without_training(reference, tiny_cfg, tiny_data, tmp_path,
                                                                     capsys):
    """Killed after the last epoch's snapshot (epoch 2 of 2) but before the final model file --
    exactly the uninterrupted run's work dir without its model: the rerun trains nothing,
    writes the model and returns the uninterrupted run's metrics."""
    work = tmp_path / "work"
    shutil.copytree(reference["work"], work)
    st = torch.load(work / "last.pt", weights_only=False)
    assert (st["epoch"], st["iter"]) == (2, 0)
    result = engine.train(small(tiny_cfg), str(tiny_data), str(tmp_path / "model.pt"), str(work), "h")
    out = capsys.readouterr().out
    assert f"resuming from {work / 'last.pt'}: epoch 2 iter 0\n" in out
    assert " iter " not in out.replace(": epoch 2 iter 0", "")  # no progress line: no training step
    assert strip(result["history"]) == strip(reference["result"]["history"])
    assert strip([result["final"]]) == strip([reference["result"]["final"]])
    assert_same_weights(weights(tmp_path / "model.pt"), weights(reference["model"]))


def test_state_written_for_other_params_is_an_error(reference, tiny_cfg, tiny_data, tmp_path):
    """A resumable state is only picked up by the params it was written for: another params
    hash is an error naming the file and both hashes, and leaves the state and no model."""
    work = tmp_path / "work"
    shutil.copytree(reference["work"], work)
    before = (work / "last.pt").read_bytes()
    with pytest.raises(RuntimeError, match=rf"{work / 'last.pt'}: written for params hash h, not other\b"):
        engine.train(small(tiny_cfg), str(tiny_data), str(tmp_path / "model.pt"), str(work), "other")
    assert not (tmp_path / "model.pt").exists()
    assert (work / "last.pt").read_bytes() == before


# --- a distilled run: the adaptation layers are part of the resumable state -----------------

def distill_cfg():
    """DETRDistill's feature term only: its adapter is the distiller's one trainable layer."""
    return C.build(C.DistillConfig, {"teacher": "t", "method": "detrdistill",
                                     "detrdistill": {"instance": 0, "relation": 0, "assignment": 0}}, "test", "distill")


def test_distilled_run_resumes_the_adapter_state(tiny_cfg, tiny_data, tmp_path, monkeypatch):
    """Killed mid-epoch in a distilled run, the rerun restores the feature adapter too: the
    adapter and the student end bitwise equal to an uninterrupted distilled run's. (A rerun
    that rebuilt the adapter fresh would restart it from its initial weights, while the
    student and the optimizer carried on.)"""
    t_cfg = small(tiny_cfg).model
    torch.manual_seed(0)
    save_atomic({"model": build_model(t_cfg).state_dict(), "model_config": dataclasses.asdict(t_cfg),
                 "params_hash": "t", "epochs": 0}, tmp_path / "teacher.pt")
    student = dataclasses.replace(t_cfg, hidden_dim=16, ffn_dim=32, nheads=4)
    cfg = dataclasses.replace(small(tiny_cfg, epochs=1), model=student)
    kw = {"teacher": str(tmp_path / "teacher.pt"), "distill_cfg": distill_cfg()}

    def run(name):
        return engine.train(cfg, str(tiny_data), str(tmp_path / name / "model.pt"), str(tmp_path / name / "work"),
                            "h", **kw)
    ref = run("ref")
    with monkeypatch.context() as mp:
        kill_after_state(mp, 0, 1)
        with pytest.raises(Killed):
            run("res")
    res = run("res")
    assert strip(res["history"]) == strip(ref["history"])
    assert_same_weights(weights(tmp_path / "res/model.pt"), weights(tmp_path / "ref/model.pt"))
    a, b = (torch.load(tmp_path / name / "work/last.pt", weights_only=False)["distiller"] for name in ("ref", "res"))
    assert set(a) == {"adapt.weight", "adapt.bias"}
    assert_same_weights(a, b)
