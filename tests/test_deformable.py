"""Deformable DETR / Sparse DETR: every shipped variant builds, returns its output contract,
has sane losses on empty and one-box ground truth, and learns; Sparse DETR's parts against
plain reference code."""
import math

import pytest
import torch
from torchvision.ops import sigmoid_focal_loss as tv_focal

from effdetr import config as C
from effdetr.evaluation.flops import count_flops
from effdetr.models import build_model
from effdetr.models.criterion import build_criterion
from effdetr.models.deformable_transformer import DeformableEncoder, DeformableEncoderLayer, valid_ratios
from effdetr.models.focal_criterion import sigmoid_focal_loss
from effdetr.models.matcher import HungarianMatcher
from effdetr.models.sparse_detr import attention_map, dam_target, keep_counts, select_tokens

VARIANTS = {
    "plain": {},
    "topk_bbr": {"deformable": {"two_stage": True, "box_refine": True}},
    "sparse_dam": {"deformable": {"two_stage": True, "box_refine": True}, "sparse": {"rho": 0.3}},
    "sparse_objectness": {"deformable": {"two_stage": True, "box_refine": True},
                          "sparse": {"rho": 0.3, "saliency": "objectness"}},
    "sparse_no_aux_no_topk": {"sparse": {"rho": 0.3, "enc_aux_loss": False}},
    "lite_h2_kda": {"deformable": {"two_stage": True, "box_refine": True},
                    "lite": {"high_levels": 2, "blocks": 2, "high_updates": 1, "key_aware": True}},
    "lite_h3_separate_low_ffn": {"lite": {"high_levels": 3, "blocks": 1, "high_updates": 2,
                                          "low_update": "separate", "low_ffn_dim": 16}},
    "three_scale": {"deformable": {"two_stage": True, "box_refine": True, "num_levels": 3, "skip_finest": 1}},
}


def model_cfg(**over):
    base = {"arch": "deformable", "backbone": {"name": "tiny", "pretrained": "none", "dilation": False,
                                               "freeze_bn": False, "channels": [8, 16, 32, 64]},
            "hidden_dim": 32, "nheads": 4, "enc_layers": 3, "dec_layers": 2, "ffn_dim": 64, "dropout": 0.0,
            "num_queries": 10, "num_classes": 5, "deformable": {"num_points": 2}}
    return C.build(C.ModelConfig, C.deep_merge(base, over), "test", "model")


def loss_cfg():
    return C.build(C.LossConfig, {"ce": 2.0, "cost_class": 2.0}, "test", "loss")


def batch():
    images = torch.randn(2, 3, 64, 80)
    mask = torch.zeros(2, 64, 80, dtype=torch.bool)
    mask[1, :, 60:] = True
    mask[1, 50:, :] = True
    return images, mask


def targets(n_boxes):
    boxes = torch.tensor([[0.5, 0.5, 0.3, 0.4], [0.2, 0.3, 0.1, 0.2]])[:n_boxes]
    labels = torch.tensor([1, 3])[:n_boxes]
    return [{"labels": labels, "boxes": boxes}, {"labels": labels, "boxes": boxes}]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_output_contract_and_loss_signs(variant):
    torch.manual_seed(0)
    cfg = model_cfg(**VARIANTS[variant])
    model, crit = build_model(cfg), build_criterion(cfg, loss_cfg())
    images, mask = batch()
    model.train()
    out = model(images, mask)
    assert out["pred_logits"].shape == (2, 10, 5) and out["pred_boxes"].shape == (2, 10, 4)
    assert len(out["aux_outputs"]) == 1
    assert ((out["pred_boxes"] >= 0) & (out["pred_boxes"] <= 1)).all()
    sparse = "sparse" in VARIANTS[variant]
    assert ("saliency" in out) == sparse
    if sparse:
        expected = keep_counts(out["saliency"]["padding"], 0.3).float().mean()
        assert out["kept_tokens"] == expected
        assert ("target" in out["saliency"]) == (VARIANTS[variant]["sparse"].get("saliency", "dam") == "dam")
        assert len(out.get("enc_aux_outputs", [])) == (2 if VARIANTS[variant]["sparse"].get("enc_aux_loss", True) else 0)
    assert ("enc_outputs" in out) == ("deformable" in VARIANTS[variant])
    empty = crit(out, targets(0))
    one = crit(out, targets(1))
    for losses, has_box in ((empty, False), (one, True)):
        for k, v in losses.items():
            assert torch.isfinite(v), k
            if k.startswith("loss_ce"):
                assert v > 0, k
            if k.startswith(("loss_bbox", "loss_giou")):
                assert (v > 0) == has_box, k
    crit.total(one).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads if g is not None)
    model.eval()
    res = model.postprocess(model(images, mask), torch.tensor([[64, 80], [50, 60]]))
    assert res[0]["boxes"].shape == (50, 4) and res[0]["labels"].max() < 5
    eval_out = model(images, mask)
    assert "enc_aux_outputs" not in eval_out and "backbone_outputs" not in eval_out  # training-only heads


def test_a_few_steps_reduce_the_loss():
    torch.manual_seed(0)
    cfg = model_cfg(deformable={"two_stage": True, "box_refine": True}, sparse={"rho": 0.3})
    model, crit = build_model(cfg), build_criterion(cfg, loss_cfg())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    images, mask = batch()
    first = None
    for _ in range(25):
        loss = crit.total(crit(model(images, mask), targets(2)))
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.7 * first


def test_sparse_encoder_updates_only_kept_tokens():
    torch.manual_seed(0)
    shapes = [(4, 5), (2, 3)]
    enc = DeformableEncoder(DeformableEncoderLayer(16, 2, 2, 2, 32, 0.0), 2)
    src, pos = torch.randn(2, 26, 16), torch.randn(2, 26, 16)
    padding = torch.zeros(2, 26, dtype=torch.bool)
    ratios = valid_ratios([torch.zeros(2, 4, 5, dtype=torch.bool), torch.zeros(2, 2, 3, dtype=torch.bool)])
    keep = torch.tensor([[0, 7, 21], [3, 4, 25]])
    valid = torch.tensor([[True, True, True], [True, True, False]])
    out = enc(src, pos, shapes, padding, ratios, keep, valid)
    changed = (out - src).abs().sum(-1) > 0
    expected = torch.zeros(2, 26, dtype=torch.bool)
    expected[0, [0, 7, 21]] = True
    expected[1, [3, 4]] = True
    assert torch.equal(changed, expected)


def test_keep_counts_and_selection_follow_the_official_rule():
    padding = torch.zeros(2, 50, dtype=torch.bool)
    padding[1, 30:] = True
    assert keep_counts(padding, 0.1).tolist() == [6, 4]  # floor(0.1 * 50) + 1, floor(0.1 * 30) + 1
    scores = torch.randn(2, 50)
    index, valid = select_tokens(scores, padding, 0.1)
    assert index.shape == (2, 6) and valid.sum(1).tolist() == [6, 4]
    assert set(index[0].tolist()) == set(scores[0].topk(6).indices.tolist())
    assert (index[1, :4] < 30).all()


def attention_map_loop(sampling, shapes):
    b = sampling[0][0].shape[0]
    total = sum(h * w for h, w in shapes)
    out = torch.zeros(b, total, dtype=torch.float64)
    starts = [0, shapes[0][0] * shapes[0][1]]
    for loc, weight in sampling:
        for idx in torch.cartesian_prod(*[torch.arange(n) for n in weight.shape]).tolist():
            bi, qi, mi, li, ki = idx
            h, w = shapes[li]
            x = float(loc[bi, qi, mi, li, ki, 0]) * w - 0.5
            y = float(loc[bi, qi, mi, li, ki, 1]) * h - 0.5
            for xi in (math.floor(x), math.floor(x) + 1):
                for yi in (math.floor(y), math.floor(y) + 1):
                    if 0 <= xi < w and 0 <= yi < h:
                        out[bi, starts[li] + yi * w + xi] += float(weight[bi, qi, mi, li, ki]) * \
                            (1 - abs(x - xi)) * (1 - abs(y - yi))
    return out


def test_attention_map_matches_a_per_sample_loop():
    g = torch.Generator().manual_seed(0)
    shapes = [(3, 5), (2, 2)]
    sampling = [(torch.rand(2, 3, 2, 2, 2, 2, generator=g) * 1.3 - 0.15, torch.rand(2, 3, 2, 2, 2, generator=g))
                for _ in range(2)]
    torch.testing.assert_close(attention_map(sampling, shapes).double(), attention_map_loop(sampling, shapes),
                               rtol=1e-5, atol=1e-6)


def test_dam_target_marks_the_top_tokens_of_each_image():
    dam = torch.tensor([[0.1, 0.9, 0.3, 0.0, 0.5, 0.2, 0.05, 0.4, 0.6, 0.7],
                        [5.0, 0.0, 1.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    padding = torch.zeros(2, 10, dtype=torch.bool)
    padding[1, 0] = True  # the largest value sits on padding: never a target
    target = dam_target(dam, padding, 0.2)  # floor(0.2 * v) + 1 = 3 and 2
    assert target[0].nonzero().flatten().tolist() == [1, 8, 9]
    assert target[1].nonzero().flatten().tolist() == [2, 3]


def test_focal_loss_and_matcher_cost_against_references():
    torch.manual_seed(0)
    logits, tgt = torch.randn(3, 7, 4), (torch.rand(3, 7, 4) > 0.7).float()
    torch.testing.assert_close(sigmoid_focal_loss(logits, tgt, 0.25, 2.0), tv_focal(logits, tgt, 0.25, 2.0))
    m = HungarianMatcher(2.0, 5.0, 2.0, focal_alpha=0.25)
    labels = torch.tensor([2, 0])
    cost = m.class_cost(logits[0], labels)
    # FL(p, 1) - FL(p, 0) for the target class, per prediction
    for j, c in enumerate(labels.tolist()):
        pos = tv_focal(logits[0, :, c], torch.ones(7), 0.25, 2.0)
        neg = tv_focal(logits[0, :, c], torch.zeros(7), 0.25, 2.0)
        torch.testing.assert_close(cost[:, j], pos - neg, rtol=1e-4, atol=1e-5)


def test_sparse_encoder_flops_grow_with_rho():
    torch.manual_seed(0)
    images, mask = torch.randn(1, 3, 96, 96), torch.zeros(1, 96, 96, dtype=torch.bool)
    enc = {}
    for rho in (0.1, 0.5, None):
        model = build_model(model_cfg(deformable={"two_stage": True, "box_refine": True}, sparse={"rho": rho}))
        enc[rho] = count_flops(model, images, mask, model.flops_parts)["encoder"]
    assert enc[0.1] < enc[0.5] < enc[None]


@pytest.mark.parametrize("over,key", [
    ({"sparse": {"rho": 0.0}}, "model.sparse.rho"),
    ({"sparse": {"rho": 1.5}}, "model.sparse.rho"),
    ({"sparse": {"saliency": "random"}}, "model.sparse.saliency"),
    ({"deformable": {"num_points": 0}}, "model.deformable.num_points"),
    ({"deformable": {"bogus": 1}}, "model.deformable.bogus"),
])
def test_bad_deformable_params_name_the_key(over, key):
    with pytest.raises(C.ConfigError, match=key.replace(".", r"\.")):
        model_cfg(**over)
