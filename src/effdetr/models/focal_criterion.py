"""Set criterion of the Deformable DETR family: sigmoid focal classification + L1 + GIoU on
every prediction set the model returns, each Hungarian-matched on its own, plus Sparse
DETR's scoring-network loss.

Prediction sets (all optional except the first): the final decoder layer, ``aux_outputs``
(earlier layers, suffix ``_i``), ``enc_outputs`` (two-stage proposals, ``_enc``),
``enc_aux_outputs`` (Sparse DETR encoder heads, ``_encaux{i}``) and ``backbone_outputs``
(class-agnostic objectness ablation, ``_backbone``). Weights go by loss stem
(``loss_ce``/``loss_bbox``/``loss_giou``/``loss_saliency``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..utils.dist import mean_over_ranks
from .criterion import matched_box_losses, matched_index, matched_labels
from .matcher import HungarianMatcher


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, alpha: float, gamma: float) -> Tensor:
    """Element-wise focal loss (Lin et al.) of sigmoid logits against 0/1 targets."""
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
    return alpha_t * ce * (1 - p_t) ** gamma


class FocalSetCriterion(nn.Module):
    """``enc_class_agnostic``: the two-stage proposals learn objectness (every target labelled
    0), as Deformable DETR's criterion and Sparse DETR's without ``--eff_specific_head``."""

    def __init__(self, matcher: HungarianMatcher, weights: dict[str, float], alpha: float = 0.25,
                 gamma: float = 2.0, enc_class_agnostic: bool = False):
        super().__init__()
        self.matcher, self.weights, self.alpha, self.gamma = matcher, dict(weights), alpha, gamma
        self.enc_class_agnostic = enc_class_agnostic

    def set_loss(self, out: dict, targets: list[dict], num_boxes: float, suffix: str,
                 class_agnostic: bool = False, indices=None) -> dict[str, Tensor]:
        if class_agnostic:
            targets = [dict(t, labels=torch.zeros_like(t["labels"])) for t in targets]
        if indices is None:
            indices = self.matcher(out, targets)
        logits = out["pred_logits"].float()
        onehot = torch.zeros_like(logits)
        onehot[(*matched_index(indices, logits.device), matched_labels(targets, indices))] = 1.0
        losses = {"loss_ce": sigmoid_focal_loss(logits, onehot, self.alpha, self.gamma).sum() / num_boxes,
                  **matched_box_losses(out, targets, indices, num_boxes)}
        return {k + suffix: v for k, v in losses.items()}

    def forward(self, outputs: dict, targets: list[dict], indices=None) -> dict[str, Tensor]:
        """Unweighted losses by name; combine with :meth:`total`. ``indices``: a fixed (query,
        target) assignment for every decoder layer instead of Hungarian matching."""
        # DETR under DDP: the boxes of the whole global batch, / world size (each rank's loss
        # is then averaged by DDP); the plain count in a single process
        num_boxes = float(sum(len(t["labels"]) for t in targets))
        num_boxes = max(mean_over_ranks(num_boxes, targets[0]["labels"].device if targets else None), 1.0)
        losses = self.set_loss(outputs, targets, num_boxes, "", indices=indices)
        for i, aux in enumerate(outputs.get("aux_outputs", [])):
            losses.update(self.set_loss(aux, targets, num_boxes, f"_{i}", indices=indices))
        if "enc_outputs" in outputs:
            losses.update(self.set_loss(outputs["enc_outputs"], targets, num_boxes, "_enc",
                                        class_agnostic=self.enc_class_agnostic))
        for i, aux in enumerate(outputs.get("enc_aux_outputs", [])):
            losses.update(self.set_loss(aux, targets, num_boxes, f"_encaux{i}"))
        if "backbone_outputs" in outputs:
            losses.update(self.set_loss(outputs["backbone_outputs"], targets, num_boxes, "_backbone",
                                        class_agnostic=True))
        sal = outputs.get("saliency", {})
        if "target" in sal:
            from .sparse_detr import dam_loss  # Sparse DETR's only
            losses["loss_saliency"] = dam_loss(sal["logits"], sal["target"], sal["padding"])
        return losses

    def total(self, losses: dict[str, Tensor], num_aux: int | None = None) -> Tensor:
        """Weighted sum; a loss's weight is its stem's (``loss_ce_enc`` -> ``loss_ce``)."""
        return sum(v * self.weights["_".join(k.split("_")[:2])] for k, v in losses.items())


def build_focal_criterion(loss_cfg, enc_class_agnostic: bool = False) -> FocalSetCriterion:
    matcher = HungarianMatcher(loss_cfg.cost_class, loss_cfg.cost_l1, loss_cfg.cost_giou,
                               focal_alpha=loss_cfg.focal_alpha, focal_gamma=loss_cfg.focal_gamma)
    weights = {"loss_ce": loss_cfg.ce, "loss_bbox": loss_cfg.l1, "loss_giou": loss_cfg.giou,
               "loss_saliency": loss_cfg.saliency}
    return FocalSetCriterion(matcher, weights, loss_cfg.focal_alpha, loss_cfg.focal_gamma, enc_class_agnostic)
