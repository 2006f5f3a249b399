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
        """Predictions logits [N,K+1] (or [N,K] sigmoid), boxes [N,4] against targets -> cost [N,T]."""
        c_class = self.class_cost(logits, tgt["labels"])
        c_l1 = torch.cdist(boxes.float(), tgt["boxes"].float(), p=1)
        c_giou = -generalized_box_iou(box_cxcywh_to_xyxy(boxes.float()), box_cxcywh_to_xyxy(tgt["boxes"].float()))
        return self.cost_l1 * c_l1 + self.cost_class * c_class + self.cost_giou * c_giou

    @torch.no_grad()
    def forward(self, outputs: dict, targets: list[dict]) -> list[tuple[Tensor, Tensor]]:
        """Returns per image (pred_idx, tgt_idx) int64 tensors of equal length min(Q, T).

        One cost matrix for the whole batch (every query against every image's targets, as the
        official matcher), cut into per-image blocks for the assignment: each entry is the
        same arithmetic as a per-image matrix, with a few ops per batch instead of per image."""
        sizes = [len(t["labels"]) for t in targets]
        empty = torch.empty(0, dtype=torch.int64)
        if not sum(sizes):
            return [(empty, empty) for _ in targets]
        q = outputs["pred_logits"].shape[1]
        tgt = {k: torch.cat([t[k] for t in targets]) for k in ("labels", "boxes")}
        cost = self.cost_matrix(outputs["pred_logits"].flatten(0, 1), outputs["pred_boxes"].flatten(0, 1), tgt)
        blocks = cost.view(len(targets), q, -1).cpu().split(sizes, -1)
        result = []
        for i, block in enumerate(blocks):
            if sizes[i] == 0:
                result.append((empty, empty))
                continue
            rows, cols = linear_sum_assignment(block[i].numpy())
            result.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return result
