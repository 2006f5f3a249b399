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
    """CE with eos_coef: an all-no-object target costs 0.1x the weight of a real class."""
    crit = make()
    out = outputs(b=1, q=1)
    empty = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}]
    ce = crit(out, empty)["loss_ce"]
    ref = torch.nn.functional.cross_entropy(out["pred_logits"][0], torch.tensor([4]))
    assert torch.allclose(ce, ref)  # single query: weighting cancels in the weighted mean


def test_aux_losses_and_weights():
    crit = make()
    out = outputs()
    out["aux_outputs"] = [outputs(seed=1), outputs(seed=2)]
    tgt = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.4, 0.4, 0.2, 0.2]])}] * 2
    losses = crit(out, tgt)
    assert {"loss_ce_0", "loss_giou_1"} <= set(losses)
    w = crit.weight_dict(2)
    total = crit.total(losses, 2)
    assert torch.allclose(total, sum(losses[k] * w[k] for k in losses))


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
