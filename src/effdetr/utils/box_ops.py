"""Pure box functions: format conversion, IoU, generalized IoU (Rezatofighi et al. 2019)."""
import torch
from torch import Tensor


def box_cxcywh_to_xyxy(b: Tensor) -> Tensor:
    cx, cy, w, h = b.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def box_xyxy_to_cxcywh(b: Tensor) -> Tensor:
    x0, y0, x1, y1 = b.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def box_area(b: Tensor) -> Tensor:
    return (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])


def box_iou(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Pairwise IoU and union of xyxy boxes: [...,N,4] x [...,M,4] -> [...,N,M] (leading
    batch dimensions broadcast)."""
    area_a, area_b = box_area(a), box_area(b)
    lt = torch.max(a[..., :, None, :2], b[..., None, :, :2])
    rb = torch.min(a[..., :, None, 2:], b[..., None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[..., :, None] + area_b[..., None, :] - inter
    return inter / union, union


def check_xyxy(caller: str, *boxes: Tensor) -> None:
    """GIoU is defined for xyxy boxes with x1>=x0, y1>=y0; inverted ones are a caller bug."""
    if not all((b[..., 2:] >= b[..., :2]).all() for b in boxes):
        raise ValueError(f"{caller}: boxes must be xyxy with x1>=x0, y1>=y0")


def generalized_box_iou(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise GIoU of xyxy boxes, [...,N,M]."""
    check_xyxy("generalized_box_iou", a, b)
    iou, union = box_iou(a, b)
    lt = torch.min(a[..., :, None, :2], b[..., None, :, :2])
    rb = torch.max(a[..., :, None, 2:], b[..., None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    hull = wh[..., 0] * wh[..., 1]
    return iou - (hull - union) / hull


def paired_generalized_box_iou(a: Tensor, b: Tensor) -> Tensor:
    """GIoU of aligned pairs of xyxy boxes, [N,4] x [N,4] -> [N]: the diagonal of
    :func:`generalized_box_iou` by the same arithmetic (so the same floats and gradients), in
    O(N) instead of an N x N matrix whose off-diagonal the losses never read."""
    check_xyxy("paired_generalized_box_iou", a, b)
    area_a, area_b = box_area(a), box_area(b)
    wh = (torch.min(a[:, 2:], b[:, 2:]) - torch.max(a[:, :2], b[:, :2])).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a + area_b - inter
    iou = inter / union
    wh = (torch.max(a[:, 2:], b[:, 2:]) - torch.min(a[:, :2], b[:, :2])).clamp(min=0)
    hull = wh[..., 0] * wh[..., 1]
    return iou - (hull - union) / hull
