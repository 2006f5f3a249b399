import math

import pytest
import torch

from effdetr.models.criterion import SetCriterion, build_criterion
from effdetr.models.matcher import HungarianMatcher


def make(num_classes=4):
    return SetCriterion(num_classes, HungarianMatcher(), {"loss_ce": 1, "loss_bbox": 5, "loss_giou": 2}, 0.1)


def outputs(b=2, q=5, k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"pred_logits": torch.randn(b, q, k + 1, generator=g),
            "pred_boxes": torch.rand(b, q, 4, generator=g) * 0.5 + 0.25}


def test_empty_targets_only_classification_loss():
    crit = make()
    empty = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}] * 2
    losses = crit(outputs(), empty)
    assert losses["loss_ce"] > 0
    assert losses["loss_bbox"] == 0 and losses["loss_giou"] == 0


def test_one_box_targets_all_losses_positive_and_perfect_box_gives_zero():
    crit = make()
    out = outputs(b=1)
    tgt = [{"labels": torch.tensor([2]), "boxes": torch.tensor([[0.5, 0.5, 0.3, 0.2]])}]
    losses = crit(out, tgt)
    assert all(losses[k] > 0 for k in ("loss_ce", "loss_bbox", "loss_giou"))
    out["pred_boxes"][0, :] = torch.tensor([0.5, 0.5, 0.3, 0.2])
    losses = crit(out, tgt)
    assert losses["loss_bbox"].abs() < 1e-6 and losses["loss_giou"].abs() < 1e-6


def test_no_object_class_is_down_weighted():
    """Catches eos_coef being ignored (empty_weight all ones, or eos_coef forced to 1.0).

    Two queries, one target: query a is the obvious match (its box is the target's and its
    logits favour class 0), query b is left as no-object. Logits (5 = 4 classes + no-object):
      a = [2, 0, 0, 0, 0], label 0  -> ce_a = -log(e^2 / (e^2 + 4)) = log(1 + 4 e^-2)
      b = [0, 0, 0, 0, 0], label 4  -> ce_b = -log(1/5)           = log 5
    PyTorch's weighted mean CE: (1 * ce_a + 0.1 * ce_b) / (1 + 0.1). With one query only
    (the old test) the weight cancels, so a criterion ignoring eos_coef passed."""
    crit = make(num_classes=4)
    out = {"pred_logits": torch.tensor([[[2.0, 0, 0, 0, 0], [0.0, 0, 0, 0, 0]]]),
           "pred_boxes": torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.1, 0.9, 0.05, 0.05]]])}
    tgt = [{"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    ce_a, ce_b = math.log(1 + 4 * math.exp(-2)), math.log(5)
    expected = (ce_a + 0.1 * ce_b) / 1.1  # 0.53961...
    ce = crit(out, tgt)["loss_ce"].item()
    assert ce == pytest.approx(expected, rel=1e-6)
    assert abs(ce - (ce_a + ce_b) / 2) > 0.4  # eos_coef = 1 would give 1.021: the check tells them apart


def test_aux_losses_and_weights():
    """Catches a wrong or missing weight, for the final layer or an auxiliary one (e.g. the
    giou weight mapped from loss.l1, or aux layers weighted differently from the last).

    DETR's weights, written out here (not read from the criterion): ce 1, L1 5, GIoU 2, the
    same for every auxiliary decoder layer (suffixes _0, _1); the tiny profile and
    LossConfig's defaults use these values."""
    from effdetr.config import LossConfig, ModelConfig
    crit = build_criterion(ModelConfig(num_classes=4), LossConfig(ce=1.0, l1=5.0, giou=2.0))
    out = outputs()
    out["aux_outputs"] = [outputs(seed=1), outputs(seed=2)]
    tgt = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.4, 0.4, 0.2, 0.2]])}] * 2
    losses = crit(out, tgt)
    layers = ("", "_0", "_1")
    assert set(losses) == {f"loss_{n}{s}" for n in ("ce", "bbox", "giou") for s in layers}
    expected = sum(1.0 * losses[f"loss_ce{s}"] + 5.0 * losses[f"loss_bbox{s}"] + 2.0 * losses[f"loss_giou{s}"]
                   for s in layers)
    assert crit.total(losses, 2).item() == pytest.approx(expected.item(), rel=1e-6)
    # every term matters: the three layers' losses differ and none is zero
    assert all(losses[k] > 0 for k in losses)
    assert len({round(losses[f"loss_giou{s}"].item(), 6) for s in layers}) == 3


def test_two_stage_proposals_train_class_agnostic_for_deformable_detrs_variant():
    """Deformable DETR's criterion relabels every target 0 for enc_outputs (its top-k ranks
    by class 0); Sparse DETR's --eff_specific_head keeps the classes."""
    from effdetr.config import DeformableConfig, LossConfig, ModelConfig
    g = torch.Generator().manual_seed(0)
    out = {"pred_logits": torch.randn(1, 5, 4, generator=g), "pred_boxes": torch.rand(1, 5, 4, generator=g) * 0.5 + 0.2,
           "enc_outputs": {"pred_logits": torch.randn(1, 9, 4, generator=g),
                           "pred_boxes": torch.rand(1, 9, 4, generator=g) * 0.5 + 0.2}}
    targets = [{"labels": torch.tensor([2, 3]), "boxes": torch.tensor([[0.4, 0.4, 0.2, 0.2], [0.6, 0.5, 0.3, 0.2]])}]
    losses = {}
    for variant in ("deformable_detr", "sparse_detr"):
        mcfg = ModelConfig(arch="deformable", deformable=DeformableConfig(two_stage=True, box_refine=True,
                                                                          two_stage_variant=variant))
        crit = build_criterion(mcfg, LossConfig())
        assert crit.enc_class_agnostic is (variant == "deformable_detr")
        losses[variant] = crit(out, targets)
    zero = [dict(t, labels=torch.zeros_like(t["labels"])) for t in targets]
    agnostic = crit.set_loss(out["enc_outputs"], zero, 2.0, "_enc")
    specific = crit.set_loss(out["enc_outputs"], targets, 2.0, "_enc")
    torch.testing.assert_close(losses["deformable_detr"]["loss_ce_enc"], agnostic["loss_ce_enc"])
    torch.testing.assert_close(losses["sparse_detr"]["loss_ce_enc"], specific["loss_ce_enc"])
    assert not torch.allclose(agnostic["loss_ce_enc"], specific["loss_ce_enc"])
    torch.testing.assert_close(losses["deformable_detr"]["loss_ce"], losses["sparse_detr"]["loss_ce"])
