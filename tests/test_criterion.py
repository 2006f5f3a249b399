import torch

from effdetr.models.criterion import SetCriterion
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
