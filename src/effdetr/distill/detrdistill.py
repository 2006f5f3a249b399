"""DETRDistill's losses (Chang et al., ICCV 2023): knowledge distillation for DETR students.

Teacher and student queries are not aligned (different query sets, different training), so
every instance-level term first matches them. The three parts:

- Progressive instance distillation: at every decoder stage k, Hungarian-match the
  teacher's stage-k predictions to the student's (cost: class divergence + L1 + GIoU of the
  boxes) and pull each student prediction to its teacher partner (class divergence, L1,
  GIoU); plus the query-relation term: the pairwise distances between the matched
  queries' decoder embeddings, each set normalised by its mean distance (as GID), L1.
- Attention-agnostic feature distillation: a soft mask over the teacher's feature map
  recovered from its decoder queries, merged with each query's quality (teacher score x
  IoU with the ground truth, so background queries count little); the student's features,
  through an adaptation layer, imitate the teacher's under that mask. The mask needs no
  attention maps, so it works for dense, deformable or any other cross-attention. Two
  readings: the official code's (``cosine_stages``: cosine of the normalised stage-k
  queries with the normalised features, weighted by the top-100 (query, class) scores x
  IoU, clamped at 0.01, divided by its max; one MSE per decoder stage) and effdetr's first
  (``sigmoid_last``: sigmoid(q . F / sqrt(d)) of the last stage; unnormalised, so the
  feature norms set how much it saturates, and summed over every query it selects little).
- Teacher-assisted assignment distillation (see :mod:`effdetr.distill.taad`).

Classes: softmax students (DETR, K+1 logits with "no object") use KL(p_t || p_s); sigmoid
students (Deformable DETR family) use the per-class binary KL. Both are 0 for equal logits.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from ..utils.box_ops import box_cxcywh_to_xyxy, box_iou, generalized_box_iou, paired_generalized_box_iou

_EPS = 1e-6


def class_divergence(t_logits: Tensor, s_logits: Tensor, sigmoid: bool) -> Tensor:
    """Pairwise divergence of teacher [...,T,K] and student [...,S,K] class predictions ->
    [...,T,S] (leading batch dimensions broadcast)."""
    if sigmoid:
        p, log_p, log_1p = t_logits.sigmoid(), F.logsigmoid(t_logits), F.logsigmoid(-t_logits)
        log_q, log_1q = F.logsigmoid(s_logits), F.logsigmoid(-s_logits)
        ent = (p * log_p + (1 - p) * log_1p).sum(-1, keepdim=True)  # [...,T,1]
        return ent - p @ log_q.transpose(-1, -2) - (1 - p) @ log_1q.transpose(-1, -2)
    p, log_p = t_logits.softmax(-1), t_logits.log_softmax(-1)
    return (p * log_p).sum(-1, keepdim=True) - p @ s_logits.log_softmax(-1).transpose(-1, -2)


def match_predictions(teacher: dict, student: dict, sigmoid: bool, w_class: float = 1.0, w_l1: float = 5.0,
                      w_giou: float = 2.0) -> list[tuple[Tensor, Tensor]]:
    """Per image, (teacher indices, student indices) of the lowest-cost one-to-one matching
    (every query of the smaller set is matched). The costs of the whole batch are one
    [B,T,S] tensor; only the assignment runs per image."""
    with torch.no_grad():
        tl, tb = teacher["pred_logits"].float(), teacher["pred_boxes"].float()
        sl, sb = student["pred_logits"].float(), student["pred_boxes"].float()
        cost = (w_class * class_divergence(tl, sl, sigmoid) + w_l1 * torch.cdist(tb, sb, p=1)
                - w_giou * generalized_box_iou(box_cxcywh_to_xyxy(tb), box_cxcywh_to_xyxy(sb))).cpu()
    out = []
    for c in cost:
        ti, si = linear_sum_assignment(c.numpy())
        out.append((torch.as_tensor(ti, dtype=torch.long), torch.as_tensor(si, dtype=torch.long)))
    return out


def _gather(x: Tensor, indices: list[tuple[Tensor, Tensor]], side: int) -> Tensor:
    return torch.cat([x[b, idx[side].to(x.device)] for b, idx in enumerate(indices)])


def instance_terms(teacher: dict, student: dict, indices, sigmoid: bool) -> dict[str, Tensor]:
    """Mean over matched pairs of the class divergence, box L1 and 1 - GIoU."""
    tl, sl = _gather(teacher["pred_logits"].float(), indices, 0), _gather(student["pred_logits"].float(), indices, 1)
    tb, sb = _gather(teacher["pred_boxes"].float(), indices, 0), _gather(student["pred_boxes"].float(), indices, 1)
    n = max(len(tl), 1)
    if sigmoid:
        p = tl.sigmoid()
        cls = F.binary_cross_entropy_with_logits(sl, p, reduction="sum") - F.binary_cross_entropy_with_logits(
            tl, p, reduction="sum")
    else:
        cls = F.kl_div(sl.log_softmax(-1), tl.log_softmax(-1), log_target=True, reduction="sum")
    giou = paired_generalized_box_iou(box_cxcywh_to_xyxy(sb), box_cxcywh_to_xyxy(tb)) if len(tl) else tl.sum(-1)
    return {"loss_pid_class": cls / n, "loss_pid_l1": (sb - tb).abs().sum() / n, "loss_pid_giou": (1 - giou).sum() / n}


def _normalised_distances(x: Tensor) -> Tensor:
    d = torch.cdist(x, x)
    n = len(x)
    mean = d.sum() / max(n * (n - 1), 1)
    return d / mean.clamp(min=_EPS)


def relation_loss(t_queries: Tensor, s_queries: Tensor, indices) -> Tensor:
    """L1 between the mean-normalised pairwise distances of the matched teacher queries
    [B,T,Ct] and of their student partners [B,S,Cs] (the dimensions may differ)."""
    total, pairs = t_queries.new_zeros(()), 0
    for b, (ti, si) in enumerate(indices):
        if len(ti) < 2:
            continue
        dt = _normalised_distances(t_queries[b, ti.to(t_queries.device)].float())
        ds = _normalised_distances(s_queries[b, si.to(s_queries.device)].float())
        total = total + (dt - ds).abs().sum()
        pairs += len(ti) * (len(ti) - 1)
    return total / max(pairs, 1)


def query_quality(t_logits: Tensor, t_boxes: Tensor, targets: list[dict], sigmoid: bool) -> Tensor:
    """Per teacher query: its top foreground score x its best IoU with the image's ground
    truth (0 for an image without objects) -> [B,T]."""
    probs = t_logits.float().sigmoid() if sigmoid else t_logits.float().softmax(-1)[..., :-1]
    score = probs.max(-1).values
    ious = []
    for boxes, tgt in zip(t_boxes.float(), targets):
        if len(tgt["boxes"]) == 0:
            ious.append(boxes.new_zeros(len(boxes)))
        else:
            ious.append(box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(tgt["boxes"].float()))[0].max(1).values)
    return score * torch.stack(ious)


def decoder_stages(out: dict) -> list[dict]:
    """Per decoder stage, first to last: the auxiliary outputs, then the final one."""
    return list(out.get("aux_outputs", [])) + [out]


def topk_query_quality(t_logits: Tensor, t_boxes: Tensor, targets: list[dict], sigmoid: bool, k: int = 100) -> Tensor:
    """Per teacher query [B,T]: the sum, over its pairs among the image's top-k (query,
    class) foreground scores, of score x its box's best IoU with the ground truth (score
    alone in an image without objects) -- the official code's weights, which pick the
    teacher's detections instead of every query's best class."""
    probs = t_logits.float().sigmoid() if sigmoid else t_logits.float().softmax(-1)[..., :-1]
    scores, flat = probs.flatten(1).topk(min(k, probs[0].numel()), dim=1)
    query = torch.div(flat, probs.shape[-1], rounding_mode="floor")  # [B,k]
    weights = []
    for s, q, boxes, tgt in zip(scores, query, t_boxes.float(), targets):
        if len(tgt["boxes"]):
            s = s * box_iou(box_cxcywh_to_xyxy(boxes[q]), box_cxcywh_to_xyxy(tgt["boxes"].float()))[0].max(1).values
        weights.append(s)
    return torch.zeros(probs.shape[:2], device=probs.device).scatter_add_(1, query, torch.stack(weights))


def cosine_feature_mask(t_queries: Tensor, t_features: Tensor, weights: Tensor, padding: Tensor | None,
                        level_sizes: list[int]) -> Tensor:
    """sum_q w_q cos(q, F_n) over teacher queries [B,T,C] and feature tokens [B,N,C],
    clamped at >= 0.01 and divided by its max per image and level -> [B,N] in (0, 1]; zero
    on padding (effdetr; the official code keeps padded cells)."""
    cos = F.normalize(t_queries.float(), dim=-1) @ F.normalize(t_features.float(), dim=-1).transpose(1, 2)
    mask = (weights.float().unsqueeze(-1) * cos).sum(1).clamp(min=0.01)
    if padding is not None:
        mask = mask.masked_fill(padding, 0.0)
    return torch.cat([m / m.amax(1, keepdim=True).clamp(min=_EPS) for m in mask.split(level_sizes, 1)], 1)


def masked_mse(t_features: Tensor, s_adapted: Tensor, mask: Tensor, level_sizes: list[int]) -> Tensor:
    """MSE(M * F_t, M * F_s') per level (mean over images, tokens and channels), summed
    over levels, as the official loss."""
    sq = (mask.unsqueeze(-1) * (t_features.float() - s_adapted.float())).pow(2)
    return sum(level.mean() for level in sq.split(level_sizes, 1))


def feature_mask(t_queries: Tensor, t_features: Tensor, quality: Tensor, padding: Tensor | None) -> Tensor:
    """Quality-weighted sum over teacher queries [B,T,C] of sigmoid(q . F / sqrt(C)) over the
    teacher's feature tokens [B,N,C] -> [B,N], zero on padding."""
    raw = torch.sigmoid(t_queries.float() @ t_features.float().transpose(1, 2) / t_features.shape[-1] ** 0.5)
    mask = (quality.float().unsqueeze(-1) * raw).sum(1)
    return mask if padding is None else mask.masked_fill(padding, 0.0)


def feature_loss(t_features: Tensor, s_adapted: Tensor, mask: Tensor) -> Tensor:
    """Mask-weighted mean squared error per channel: sum M * |F_t - F_s'|^2 / (sum M * C)."""
    sq = (t_features.float() - s_adapted.float()).pow(2).sum(-1)  # [B,N]
    return (mask * sq).sum() / (mask.sum() * t_features.shape[-1]).clamp(min=_EPS)
