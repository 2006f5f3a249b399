"""ACT's multi-task knowledge distillation (MTKD).

The ACT student starts from the DETR teacher's weights, so query i of the student and
query i of the teacher predict the same object; no matching is needed. At every decoder
layer the student imitates the teacher's class distribution (KL, temperature T) and its
boxes (L1 + GIoU). Box terms are weighted per query by the teacher's object probability
(1 - p(no object)), normalised over the batch: imitating where the teacher sees nothing
would only teach noise. Trained as L = L_pred (Hungarian loss on ground truth) + L_KD.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..utils.box_ops import box_cxcywh_to_xyxy, paired_generalized_box_iou


def kd_terms(student: dict, teacher: dict, temperature: float) -> dict[str, Tensor]:
    """KD losses of one decoder layer. student/teacher: pred_logits [B,Q,K+1], pred_boxes [B,Q,4]."""
    s_logits, t_logits = student["pred_logits"].float(), teacher["pred_logits"].float()
    t = temperature
    t_prob = F.softmax(t_logits / t, -1)
    kl = (t_prob * (F.log_softmax(t_logits / t, -1) - F.log_softmax(s_logits / t, -1))).sum(-1)
    loss_ce = kl.mean() * t * t
    weight = 1.0 - F.softmax(t_logits, -1)[..., -1]  # teacher's object probability [B,Q]
    weight = weight / weight.sum().clamp(min=1e-6)
    s_boxes, t_boxes = student["pred_boxes"].float(), teacher["pred_boxes"].float()
    l1 = ((s_boxes - t_boxes).abs().sum(-1) * weight).sum()
    giou = paired_generalized_box_iou(box_cxcywh_to_xyxy(s_boxes.flatten(0, 1)),
                                      box_cxcywh_to_xyxy(t_boxes.flatten(0, 1)))
    loss_giou = ((1 - giou).view_as(weight) * weight).sum()
    return {"loss_kd_ce": loss_ce, "loss_kd_l1": l1, "loss_kd_giou": loss_giou}


class MTKDLoss(nn.Module):
    def __init__(self, ce: float, l1: float, giou: float, temperature: float):
        super().__init__()
        self.weights = {"loss_kd_ce": ce, "loss_kd_l1": l1, "loss_kd_giou": giou}
        self.temperature = temperature

    def forward(self, student_out: dict, teacher_out: dict, **_) -> dict[str, Tensor]:
        """Unweighted KD losses of the last layer and (suffix _i) each auxiliary layer."""
        losses = kd_terms(student_out, teacher_out, self.temperature)
        for i, (s, t) in enumerate(zip(student_out.get("aux_outputs", []), teacher_out.get("aux_outputs", []))):
            losses.update({f"{k}_{i}": v for k, v in kd_terms(s, t, self.temperature).items()})
        return losses

    def total(self, losses: dict[str, Tensor]) -> Tensor:
        """Weighted sum; an auxiliary layer's loss ``<name>_<i>`` takes the weight of ``<name>``."""
        return sum(v * self.weights[k if k in self.weights else k.rsplit("_", 1)[0]] for k, v in losses.items())
