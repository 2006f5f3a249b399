"""DETR set criterion: matched CE (down-weighted no-object), L1 and GIoU, with aux losses."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..utils.box_ops import box_cxcywh_to_xyxy, paired_generalized_box_iou
from ..utils.dist import mean_over_ranks
from .matcher import HungarianMatcher


def matched_index(indices, device) -> tuple[Tensor, Tensor]:
    """(image, query) index pairs of every match of the batch, image by image: one gather or
    scatter for the whole batch instead of one per image."""
    batch = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
    return batch.to(device), torch.cat([src for src, _ in indices]).to(device)


def matched_labels(targets: list[dict], indices) -> Tensor:
    """The matched targets' labels, in :func:`matched_index` order."""
    return torch.cat([t["labels"][tgt] for t, (_, tgt) in zip(targets, indices)])


def matched_box_losses(out: dict, targets: list[dict], indices, num_boxes: float) -> dict[str, Tensor]:
    """L1 and 1 - GIoU of the matched (prediction, ground truth) boxes, summed / num_boxes."""
    pred = out["pred_boxes"][matched_index(indices, out["pred_boxes"].device)].float()
    gt = torch.cat([t["boxes"][tgt] for t, (_, tgt) in zip(targets, indices)]).float()
    l1 = F.l1_loss(pred, gt, reduction="none").sum() / num_boxes
    if len(pred) == 0:
        giou = pred.sum()
    else:
        giou = (1 - paired_generalized_box_iou(box_cxcywh_to_xyxy(pred), box_cxcywh_to_xyxy(gt))).sum() / num_boxes
    return {"loss_bbox": l1, "loss_giou": giou}


class SetCriterion(nn.Module):
    def __init__(self, num_classes: int, matcher: HungarianMatcher, weight_dict: dict[str, float],
                 eos_coef: float = 0.1):
        super().__init__()
        self.num_classes, self.matcher = num_classes, matcher
        self.base_weights = dict(weight_dict)
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        self.register_buffer("empty_weight", empty_weight)
        self.losses = {"loss_ce": self.loss_labels, "loss_bbox": self.loss_boxes}

    def weight_dict(self, num_aux: int) -> dict[str, float]:
        """Weights for the final layer's losses and each auxiliary layer's (suffix _i)."""
        out = dict(self.base_weights)
        for i in range(num_aux):
            out.update({f"{k}_{i}": v for k, v in self.base_weights.items()})
        return out

    def loss_labels(self, out: dict, targets: list[dict], indices, num_boxes: float) -> dict:
        logits = out["pred_logits"].float()
        target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        target_classes[matched_index(indices, logits.device)] = matched_labels(targets, indices)
        loss = F.cross_entropy(logits.transpose(1, 2), target_classes, self.empty_weight)
        return {"loss_ce": loss}

    def loss_boxes(self, out: dict, targets: list[dict], indices, num_boxes: float) -> dict:
        return matched_box_losses(out, targets, indices, num_boxes)

    def _single(self, out: dict, targets: list[dict], num_boxes: float, suffix: str = "", indices=None) -> dict:
        if indices is None:
            indices = self.matcher(out, targets)
        losses = {}
        for fn in self.losses.values():
            losses.update({k + suffix: v for k, v in fn(out, targets, indices, num_boxes).items()})
        return losses

    def forward(self, outputs: dict, targets: list[dict], indices=None) -> dict[str, Tensor]:
        """Unweighted losses by name; combine with :meth:`weight_dict`. ``indices``: a fixed
        (query, target) assignment for every layer instead of Hungarian matching (DETRDistill's
        teacher-assisted stream)."""
        # DETR under DDP: the boxes of the whole global batch, / world size (each rank's loss
        # is then averaged by DDP); the plain count in a single process
        num_boxes = float(sum(len(t["labels"]) for t in targets))
        num_boxes = max(mean_over_ranks(num_boxes, targets[0]["labels"].device if targets else None), 1.0)
        losses = self._single(outputs, targets, num_boxes, indices=indices)
        for i, aux in enumerate(outputs.get("aux_outputs", [])):
            losses.update(self._single(aux, targets, num_boxes, f"_{i}", indices))
        return losses

    def total(self, losses: dict[str, Tensor], num_aux: int) -> Tensor:
        w = self.weight_dict(num_aux)
        return sum(losses[k] * w[k] for k in losses if k in w)


def build_criterion(model_cfg, loss_cfg) -> nn.Module:
    if model_cfg.arch == "deformable":
        from .focal_criterion import build_focal_criterion
        # Deformable DETR's two-stage head ranks by class 0: it is trained class-agnostic
        return build_focal_criterion(loss_cfg, model_cfg.deformable.two_stage_variant == "deformable_detr")
    matcher = HungarianMatcher(loss_cfg.cost_class, loss_cfg.cost_l1, loss_cfg.cost_giou)
    weights = {"loss_ce": loss_cfg.ce, "loss_bbox": loss_cfg.l1, "loss_giou": loss_cfg.giou}
    return SetCriterion(model_cfg.num_classes, matcher, weights, loss_cfg.eos_coef)
