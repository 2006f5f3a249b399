"""DETR's data transforms on (PIL image, target) pairs.

Targets carry ``boxes`` as absolute xyxy until :class:`Normalize`, which turns them into
normalised (cx, cy, w, h) -- the format the model predicts. Boxes that a crop leaves
with no area are dropped together with their labels.
"""
from __future__ import annotations

import random

import torch
import torchvision.transforms.functional as TF
from PIL import Image

from ..utils.box_ops import box_xyxy_to_cxcywh

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
_PER_BOX = ("boxes", "labels", "area", "iscrowd")


def _keep(target: dict, keep: torch.Tensor) -> dict:
    return {k: (v[keep] if k in _PER_BOX else v) for k, v in target.items()}


class Compose:
    def __init__(self, transforms):
        self.transforms = transforms

    def __call__(self, img, target):
        for t in self.transforms:
            img, target = t(img, target)
        return img, target


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, img: Image.Image, target: dict):
        if random.random() >= self.p:
            return img, target
        w = img.width
        target = dict(target)
        b = target["boxes"]
        target["boxes"] = torch.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], dim=1)
        return TF.hflip(img), target


def resized_shape(h: int, w: int, size: int, max_size: int | None) -> tuple[int, int]:
    """Shorter side -> size unless the longer side would exceed max_size (DETR's rule)."""
    if max_size is not None:
        lo, hi = min(h, w), max(h, w)
        if hi / lo * size > max_size:
            size = int(round(max_size * lo / hi))
    if w < h:
        return int(size * h / w), size
    return size, int(size * w / h)


class RandomResize:
    def __init__(self, sizes: list[int], max_size: int | None = None):
        self.sizes, self.max_size = list(sizes), max_size

    def __call__(self, img: Image.Image, target: dict):
        size = random.choice(self.sizes)
        nh, nw = resized_shape(img.height, img.width, size, self.max_size)
        sx, sy = nw / img.width, nh / img.height
        target = dict(target)
        target["boxes"] = target["boxes"] * torch.tensor([sx, sy, sx, sy])
        target["area"] = target["area"] * (sx * sy)
        target["size"] = torch.tensor([nh, nw])
        return img.resize((nw, nh), Image.BILINEAR), target


class RandomSizeCrop:
    def __init__(self, min_size: int, max_size: int):
        self.min_size, self.max_size = min_size, max_size

    def __call__(self, img: Image.Image, target: dict):
        w = random.randint(min(self.min_size, img.width), min(img.width, self.max_size))
        h = random.randint(min(self.min_size, img.height), min(img.height, self.max_size))
        top, left = random.randint(0, img.height - h), random.randint(0, img.width - w)
        target = dict(target)
        b = target["boxes"] - torch.tensor([left, top, left, top])
        b = torch.min(b.reshape(-1, 2, 2), torch.tensor([w, h])).clamp(min=0)
        area = (b[:, 1, :] - b[:, 0, :]).prod(dim=1)
        target["boxes"] = b.reshape(-1, 4)
        target["area"] = area
        target["size"] = torch.tensor([h, w])
        keep = torch.all(b[:, 1, :] > b[:, 0, :], dim=1)
        return img.crop((left, top, left + w, top + h)), _keep(target, keep)


class RandomSelect:
    """Apply ``a`` with probability 1 - p, else ``b`` (DETR's crop branch)."""

    def __init__(self, a, b, p: float = 0.5):
        self.a, self.b, self.p = a, b, p

    def __call__(self, img, target):
        return self.b(img, target) if random.random() < self.p else self.a(img, target)


class Normalize:
    def __call__(self, img: Image.Image, target: dict):
        tensor = TF.normalize(TF.to_tensor(img), MEAN, STD)
        h, w = tensor.shape[-2:]
        target = dict(target)
        target["boxes"] = box_xyxy_to_cxcywh(target["boxes"]) / torch.tensor([w, h, w, h], dtype=torch.float32)
        return tensor, target


def build_transforms(input_cfg, train: bool) -> Compose:
    if not train:
        return Compose([RandomResize([input_cfg.val_scale], input_cfg.max_size), Normalize()])
    resize = RandomResize(input_cfg.train_scales, input_cfg.max_size)
    crop_branch = Compose([RandomResize(input_cfg.crop_scales),
                           RandomSizeCrop(input_cfg.crop_min, input_cfg.crop_max), resize])
    return Compose([RandomHorizontalFlip(input_cfg.hflip_prob),
                    RandomSelect(resize, crop_branch, input_cfg.crop_prob), Normalize()])
