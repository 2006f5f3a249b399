"""Hungarian matching between predictions and ground truth (scipy's linear_sum_assignment)."""
from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from ..utils.box_ops import box_cxcywh_to_xyxy, generalized_box_iou


class HungarianMatcher(nn.Module):
    """cost = w_class * C_class + w_l1 * L1(box) - w_giou * GIoU(box); C_class = -p(class)
    for softmax logits (DETR), or with ``focal_alpha`` set the focal-loss difference
    FL(p, 1) - FL(p, 0) for sigmoid logits (Deformable DETR)."""

    def __init__(self, cost_class: float = 1.0, cost_l1: float = 5.0, cost_giou: float = 2.0,
                 focal_alpha: float | None = None, focal_gamma: float = 2.0):
        super().__init__()
        if cost_class == cost_l1 == cost_giou == 0:
            raise ValueError("all matching costs are 0")
        self.cost_class, self.cost_l1, self.cost_giou = cost_class, cost_l1, cost_giou
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma

    def class_cost(self, logits: Tensor, labels: Tensor) -> Tensor:
        if self.focal_alpha is None:
            return -logits.float().softmax(-1)[:, labels]
        a, g = self.focal_alpha, self.focal_gamma
        p = logits.float().sigmoid()[:, labels]
        pos = a * (1 - p) ** g * -(p + 1e-8).log()
        neg = (1 - a) * p ** g * -(1 - p + 1e-8).log()
        return pos - neg

    def cost_matrix(self, logits: Tensor, boxes: Tensor, tgt: dict) -> Tensor:
        """One image: logits [Q,K+1] (or [Q,K] sigmoid), boxes [Q,4] -> cost [Q,T]."""
        c_class = self.class_cost(logits, tgt["labels"])
        c_l1 = torch.cdist(boxes.float(), tgt["boxes"].float(), p=1)
        c_giou = -generalized_box_iou(box_cxcywh_to_xyxy(boxes.float()), box_cxcywh_to_xyxy(tgt["boxes"].float()))
        return self.cost_l1 * c_l1 + self.cost_class * c_class + self.cost_giou * c_giou

    @torch.no_grad()
    def forward(self, outputs: dict, targets: list[dict]) -> list[tuple[Tensor, Tensor]]:
        """Returns per image (pred_idx, tgt_idx) int64 tensors of equal length min(Q, T)."""
        result = []
        for i, tgt in enumerate(targets):
            if len(tgt["labels"]) == 0:
                empty = torch.empty(0, dtype=torch.int64)
                result.append((empty, empty))
                continue
            cost = self.cost_matrix(outputs["pred_logits"][i], outputs["pred_boxes"][i], tgt).cpu()
            rows, cols = linear_sum_assignment(cost.numpy())
            result.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return result
