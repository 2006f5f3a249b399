"""The training schedule (issue 20, 3.4): warm-up and the LR drop, the parameter groups
(backbone LR; Deformable DETR's 0.1x LR for sampling offsets and reference points), the
``lr_backbone == 0`` freeze and gradient clipping -- each against hand values, through the
engine's ``train()`` where it is the engine that applies them."""
import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch

from effdetr.config import experiment_config
from effdetr.engine import train as engine
from effdetr.models import build_model
from tests.conftest import TINY

LR, LR_BACKBONE = 5e-4, 1e-4


pytestmark = pytest.mark.one_thread  # see conftest.one_thread


class Stop(Exception):
    """Raised by the recording optimizer to end a run after the steps a test needs."""


def small(cfg, model=None, **train_kw):
    """``cfg`` with an untrained backbone (``model`` overrides more) and ``train_kw`` set."""
    backbone = dataclasses.replace(cfg.model.backbone, pretrained="none")
    model_cfg = dataclasses.replace(cfg.model, backbone=backbone, **(model or {}))
    kw = {"lr": LR, "lr_backbone": LR_BACKBONE, "epochs": 1, "max_iters_per_epoch": 1,
          "checkpoint_every_iters": 100} | train_kw
    return dataclasses.replace(cfg, model=model_cfg, train=dataclasses.replace(cfg.train, **kw))


def recorded_run(cfg, data, tmp, monkeypatch, stop_after=None):
    """Train ``cfg``; at every optimizer step record each group's LR and the total gradient
    norm before clipping (from per-parameter post-accumulate hooks) and after (what the step
    sees). Stops with :class:`Stop` after ``stop_after`` steps. -> (steps, model, optimizer, initial weights)."""
    seen, raw = {"steps": []}, {}

    def builder(model_cfg):
        model = build_model(model_cfg)
        for p in model.parameters():
            if p.requires_grad:
                p.register_post_accumulate_grad_hook(lambda q: raw.__setitem__(id(q), q.grad.detach().clone()))
        seen["model"], seen["initial"] = model, {k: v.clone() for k, v in model.state_dict().items()}
        return model

    class Recording(torch.optim.AdamW):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen["optimizer"] = self

        def step(self, closure=None):
            grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
            seen["steps"].append({
                "lrs": [g["lr"] for g in self.param_groups],
                "raw_norm": math.sqrt(sum(float(g.pow(2).sum()) for g in raw.values())),
                "norm": math.sqrt(sum(float(g.pow(2).sum()) for g in grads))})
            raw.clear()
            out = super().step(closure)
            if stop_after is not None and len(seen["steps"]) == stop_after:
                raise Stop
            return out
    monkeypatch.setattr(torch.optim, "AdamW", Recording)
    args = (cfg, str(data), str(tmp / "model.pt"), str(tmp / "work"), "h")
    if stop_after is None:
        engine.train(*args, model_builder=builder)
    else:
        with pytest.raises(Stop):
            engine.train(*args, model_builder=builder)
    return seen["steps"], seen["model"], seen["optimizer"], seen["initial"]


def group_of(optimizer):
    """id(parameter) -> index of its optimizer group; fails on a parameter in two groups."""
    where = {}
    for i, g in enumerate(optimizer.param_groups):
        for p in g["params"]:
            assert id(p) not in where, "a parameter in two optimizer groups"
            where[id(p)] = i
    return where


def test_lr_factor_hand_values():
    """Linear warm-up over the first ``warmup_iters`` global steps ((step + 1) / warmup_iters),
    times 0.1 from epoch ``lr_drop`` on (one drop, as DETR's runs: epochs < 2 x lr_drop)."""
    cfg = SimpleNamespace(warmup_iters=4, lr_drop=2)
    cases = {(0, 0): 0.25, (0, 1): 0.5, (0, 2): 0.75, (0, 3): 1.0, (1, 10): 1.0, (1, 999): 1.0,
             (2, 1): 0.05, (2, 3): 0.1, (2, 10): 0.1, (3, 500): 0.1}
    got = {k: engine.lr_factor(cfg, *k) for k in cases}
    assert got == pytest.approx(cases, rel=1e-12)
    no_warmup = SimpleNamespace(warmup_iters=0, lr_drop=2)
    assert [engine.lr_factor(no_warmup, e, 0) for e in range(4)] == pytest.approx([1.0, 1.0, 0.1, 0.1])


@pytest.fixture(scope="module")
def detr_run(tiny_cfg, tiny_data, tmp_path_factory):
    """Four steps of the tiny DETR: 2 epochs x 2 iterations, warm-up over 4 steps, drop at
    epoch 1, clip at 0.1 (the tiny profile's)."""
    cfg = small(tiny_cfg, epochs=2, max_iters_per_epoch=2, warmup_iters=4, lr_drop=1, clip_max_norm=0.1)
    with pytest.MonkeyPatch.context() as mp:
        return recorded_run(cfg, tiny_data, tmp_path_factory.mktemp("detr_run"), mp)


def test_train_applies_warmup_and_drop_to_both_groups(detr_run):
    """Step s of epoch e runs at base LR x (warm-up x drop): factors 1/4, 2/4 (epoch 0),
    3/4 x 0.1, 1 x 0.1 (epoch 1), for the transformer (5e-4) and the backbone (1e-4) alike."""
    steps, model, optimizer, _ = detr_run
    backbone = {id(p) for p in model.backbone.parameters() if p.requires_grad}
    kinds = ["backbone" if {id(p) for p in g["params"]} == backbone else "rest" for g in optimizer.param_groups]
    assert sorted(kinds) == ["backbone", "rest"]
    want = {"rest": [1.25e-4, 2.5e-4, 3.75e-5, 5e-5], "backbone": [2.5e-5, 5e-5, 7.5e-6, 1e-5]}
    got = {kind: [s["lrs"][i] for s in steps] for i, kind in enumerate(kinds)}
    assert got == {k: pytest.approx(v, rel=1e-9) for k, v in want.items()}


def test_detr_groups_cover_every_trainable_parameter_once(detr_run):
    """Every trainable parameter is in exactly one optimizer group, and no frozen one in any."""
    _, model, optimizer, _ = detr_run
    where = group_of(optimizer)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    frozen = {id(p) for p in model.parameters() if not p.requires_grad}
    assert set(where) == trainable and not frozen & set(where)


def test_gradients_are_clipped_to_max_norm(detr_run):
    """Each step's gradients arrive above clip_max_norm = 0.1 (so the clip has work to do) and
    leave at total norm 0.1 (clip_grad_norm_ scales by max / (norm + 1e-6))."""
    steps, *_ = detr_run
    assert len(steps) == 4
    for s in steps:
        assert s["raw_norm"] > 0.2, s
        assert s["norm"] == pytest.approx(0.1 * s["raw_norm"] / (s["raw_norm"] + 1e-6), rel=1e-4), s


def test_no_clipping_at_max_norm_zero(tiny_cfg, tiny_data, tmp_path, monkeypatch):
    """clip_max_norm 0 switches clipping off: the step sees the raw gradients."""
    steps, *_ = recorded_run(small(tiny_cfg, clip_max_norm=0.0), tiny_data, tmp_path, monkeypatch, stop_after=1)
    assert steps[0]["norm"] == pytest.approx(steps[0]["raw_norm"], rel=1e-6) and steps[0]["norm"] > 0.2


def test_deformable_offsets_and_reference_points_train_at_a_tenth(tiny_cfg, tiny_data, tmp_path, monkeypatch):
    """Deformable DETR's rule (lr_linear_proj_names = reference_points, sampling_offsets; x0.1):
    at the first step (warm-up factor 1/2) the sampling offsets of the one encoder and two
    decoder layers and the reference-point head run at 5e-4 x 0.1 / 2, the backbone at
    1e-4 / 2, everything else at 5e-4 / 2."""
    cfg = experiment_config(TINY, "deformable_detr_topk")[0]
    deformable = dataclasses.replace(cfg.model.deformable, two_stage=False, box_refine=False)  # a reference head
    cfg = small(cfg, model={"deformable": deformable}, warmup_iters=2)
    steps, model, optimizer, _ = recorded_run(cfg, tiny_data, tmp_path, monkeypatch, stop_after=1)
    where = group_of(optimizer)
    lr_of = {n: steps[0]["lrs"][where[id(p)]] for n, p in model.named_parameters() if p.requires_grad}
    slow = {f"{layer}.sampling_offsets.{w}" for layer in ("encoder.layers.0.self_attn", "decoder.layers.0.cross_attn",
                                                        "decoder.layers.1.cross_attn") for w in ("weight", "bias")}
    slow |= {"reference.weight", "reference.bias"}
    want = {n: 2.5e-5 if n in slow else 5e-5 if n.startswith("backbone.") else 2.5e-4 for n in lr_of}
    assert slow <= set(lr_of)
    assert lr_of == pytest.approx(want, rel=1e-9)


def test_zero_backbone_lr_freezes_the_backbone(tiny_cfg, tiny_data, tmp_path, monkeypatch):
    """DETR's rule: lr_backbone 0 means a frozen backbone -- requires_grad off, so no gradient
    is computed for it (nor clipped with the rest), no optimizer slot, unchanged weights after
    a step; the rest trains."""
    _, model, optimizer, initial = recorded_run(small(tiny_cfg, lr_backbone=0.0), tiny_data, tmp_path, monkeypatch,
                                                stop_after=1)
    backbone = dict(model.backbone.named_parameters(prefix="backbone"))
    assert len(backbone) > 0
    assert [n for n, p in backbone.items() if p.requires_grad or p.grad is not None] == []
    assert not {id(p) for p in backbone.values()} & set(group_of(optimizer))
    assert [n for n, p in backbone.items() if not torch.equal(p, initial[n])] == []
    rest = {n: p for n, p in model.named_parameters() if not n.startswith("backbone.")}
    assert all(p.requires_grad and p.grad is not None for p in rest.values())
    assert any(not torch.equal(p, initial[n]) for n, p in rest.items())
