"""Turn DETR outputs into per-image scored boxes in absolute xyxy pixels of the original image."""
from __future__ import annotations

import torch
from torch import Tensor

from ..utils.box_ops import box_cxcywh_to_xyxy


@torch.no_grad()
def postprocess(outputs: dict, orig_sizes: Tensor) -> list[dict]:
    """orig_sizes [B,2] as (h, w) -> [{'scores','labels','boxes'}] with one entry per query."""
    prob = outputs["pred_logits"].float().softmax(-1)
    scores, labels = prob[..., :-1].max(-1)
    boxes = box_cxcywh_to_xyxy(outputs["pred_boxes"].float())
    h, w = orig_sizes.float().unbind(1)
    boxes = boxes * torch.stack([w, h, w, h], dim=1)[:, None, :]
    return [{"scores": s, "labels": l, "boxes": b} for s, l, b in zip(scores, labels, boxes)]
