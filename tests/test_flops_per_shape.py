"""The eval's FLOPs mean counts a model once per image shape unless its cost depends on the
content: check that premise for every model config of params.yaml, and that the shortcut
gives the very numbers of counting every image."""
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from effdetr.config import experiment_config, expand_experiments, load_params
from effdetr.engine import evaluate
from effdetr.engine.evaluate import cost_depends_on_content, image_flops, mean_flops
from effdetr.models import build_model

REPO = Path(__file__).resolve().parents[1]
PARAMS = REPO / "params.yaml"


def _distinct_models() -> dict[str, object]:
    """One experiment per distinct code path in the synth profile (architecture, encoder
    attention, the deformable settings, which Sparse / Lite parts are on; not the sizes, ratios
    or layer counts): name -> model config."""
    params, _ = load_params(PARAMS)
    seen, out = set(), {}
    for name in expand_experiments(params.experiments, PARAMS):
        try:
            cfg = experiment_config(PARAMS, name)[0]
        except Exception:  # an experiment of another profile only (e.g. an imported release)
            continue
        model = dataclasses.replace(cfg.model, backbone=dataclasses.replace(cfg.model.backbone, pretrained="none"))
        key = json.dumps([model.arch, model.encoder_attention, dataclasses.asdict(model.deformable),
                          model.sparse.rho is None, model.sparse.saliency, model.sparse.enc_aux_loss,
                          model.lite.high_levels is None, model.lite.low_update, model.lite.key_aware])
        if key not in seen:
            seen.add(key)
            out[name] = model
    return out


MODELS = _distinct_models()


def _kernels(model):
    tf = getattr(model, "transformer", None)
    return [a.kernel for a in tf.encoder_attention_modules()] if tf else []


def _built(model_cfg):
    torch.manual_seed(0)
    return build_model(model_cfg).eval()


def test_every_architecture_is_covered():
    archs = {(m.arch, m.encoder_attention) for m in MODELS.values()}
    assert {("detr", "dense"), ("detr", "act"), ("detr", "kmeans"), ("deformable", "dense")} <= archs
    assert any(m.lite.high_levels for m in MODELS.values()), "no Lite DETR config in params.yaml"
    assert any(m.sparse.rho for m in MODELS.values()), "no Sparse DETR config in params.yaml"


@pytest.mark.parametrize("name", sorted(MODELS))
def test_shape_alone_decides_the_cost_unless_the_model_says_otherwise(name):
    model = _built(MODELS[name])
    content = cost_depends_on_content(model)
    assert content == (MODELS[name].encoder_attention in ("act", "kmeans"))
    if content:
        return
    gen = torch.Generator().manual_seed(1)
    a, b = (torch.rand(3, 96, 112, generator=gen) for _ in range(2))
    parts = model.flops_parts
    assert image_flops(model, a, parts, _kernels(model)) == image_flops(model, b, parts, _kernels(model))


class Images:
    """A dataset of random images, three distinct shapes among seven."""

    def __init__(self):
        gen = torch.Generator().manual_seed(2)
        shapes = [(96, 96), (88, 104), (96, 96), (80, 120), (88, 104), (96, 96), (80, 120)]
        self.images = [torch.rand(3, h, w, generator=gen) for h, w in shapes]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], {}


@pytest.mark.parametrize("name", ["deformable_detr_topk", "act_L32"])
def test_per_shape_mean_is_the_per_image_mean(name, monkeypatch):
    model = _built(MODELS.get(name) or experiment_config(PARAMS, name)[0].model)
    counted = []
    real = evaluate.image_flops
    monkeypatch.setattr(evaluate, "image_flops", lambda *a: counted.append(1) or real(*a))
    fast = mean_flops(model, Images(), 7)
    n_fast = len(counted)
    monkeypatch.setattr(evaluate, "cost_depends_on_content", lambda m: True)
    assert mean_flops(model, Images(), 7) == fast  # bitwise: the same numbers in the same order
    assert len(counted) - n_fast == 7
    assert n_fast == (7 if name.startswith("act") else 3)
