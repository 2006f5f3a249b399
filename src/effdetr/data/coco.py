"""COCO-format detection datasets: strict annotation checks, DETR targets, padded batches.

Checks run when a dataset is opened, before any compute, and raise
:class:`AnnotationError` naming the file and the offending field. Documented filter rule
(what is *not* an error): crowd annotations are kept for evaluation but not used as
training targets (as in DETR); boxes are clipped to their image; a box with no area after
clipping (zero width/height, or lying wholly outside the image) is dropped and counted in
``dataset.dropped``. Negative widths/heights, non-numeric boxes, unknown category ids,
duplicate ids, images without a file, malformed JSON and non-UTF-8 bytes are errors. An
image that cannot be read, or that PIL refuses as a decompression bomb, is an error naming
the file and the image id; ``effdetr data verify`` and the stages that read the data decode
every image once beforehand (effdetr.data.images), so this is rarely met mid-epoch.
"""
from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset

from .images import ImageProblem, open_rgb
from .manifest import layout


class AnnotationError(ValueError):
    def __init__(self, file: str | Path, field: str, message: str):
        self.file, self.field = str(file), field
        super().__init__(f"{file}: {field}: {message}")


def split_paths(data_cfg, split: str, root: str | Path | None = None) -> tuple[Path, Path]:
    """(image folder, annotation file) of a split ('train' / 'val') for either dataset."""
    return layout(data_cfg.dataset, root or data_cfg.root, split)


def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def load_annotations(ann_file: str | Path, img_dir: str | Path | None = None,
                     num_classes: int | None = None) -> dict:
    """Read and check a COCO instances file; returns the parsed dict plus ``_dropped``."""
    ann_file = Path(ann_file)
    if not ann_file.exists():
        raise AnnotationError(ann_file, "<file>", "annotation file not found")
    raw = ann_file.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise AnnotationError(ann_file, "<encoding>", f"not UTF-8: byte 0x{raw[e.start]:02x} at byte offset {e.start} "
                              f"(line {line}, column {column}; {e.reason})") from None
    del raw  # the 450 MB COCO train file: do not hold it twice while parsing
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise AnnotationError(ann_file, "<json>", f"malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    if not isinstance(data, dict):
        raise AnnotationError(ann_file, "<root>", "expected a JSON object")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise AnnotationError(ann_file, key, "missing or not a list")
    cat_ids = set()
    for i, c in enumerate(data["categories"]):
        if not isinstance(c, dict) or not isinstance(c.get("id"), int) or isinstance(c.get("id"), bool):
            raise AnnotationError(ann_file, f"categories[{i}].id", "missing or not an integer")
        if c["id"] in cat_ids:
            raise AnnotationError(ann_file, f"categories[{i}].id", f"duplicate category id {c['id']}")
        if num_classes is not None and not 0 <= c["id"] < num_classes:
            raise AnnotationError(ann_file, f"categories[{i}].id",
                                  f"id {c['id']} does not fit model.num_classes={num_classes} (ids must be < num_classes)")
        cat_ids.add(c["id"])
    images = {}
    for i, im in enumerate(data["images"]):
        for key, ok in (("id", lambda v: isinstance(v, int)), ("file_name", lambda v: isinstance(v, str) and v),
                        ("height", lambda v: isinstance(v, int) and v > 0), ("width", lambda v: isinstance(v, int) and v > 0)):
            if key not in im or not ok(im[key]):
                raise AnnotationError(ann_file, f"images[{i}].{key}", f"missing or invalid ({im.get(key)!r})")
        if im["id"] in images:
            raise AnnotationError(ann_file, f"images[{i}].id", f"duplicate image id {im['id']}")
        if img_dir is not None and not (Path(img_dir) / im["file_name"]).is_file():
            raise AnnotationError(ann_file, f"images[{i}].file_name",
                                  f"image file {Path(img_dir) / im['file_name']} does not exist")
        images[im["id"]] = im
    dropped, ann_ids = 0, set()
    kept = []
    for i, a in enumerate(data["annotations"]):
        where = f"annotations[{i}]"
        if not isinstance(a, dict):
            raise AnnotationError(ann_file, where, "not an object")
        if a.get("id") in ann_ids:
            raise AnnotationError(ann_file, f"{where}.id", f"duplicate annotation id {a.get('id')}")
        ann_ids.add(a.get("id"))
        if a.get("image_id") not in images:
            raise AnnotationError(ann_file, f"{where}.image_id", f"unknown image id {a.get('image_id')!r}")
        if a.get("category_id") not in cat_ids:
            raise AnnotationError(ann_file, f"{where}.category_id", f"unknown category id {a.get('category_id')!r}")
        bbox = a.get("bbox")
        if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_num(v) for v in bbox):
            raise AnnotationError(ann_file, f"{where}.bbox", f"expected [x, y, w, h] numbers, got {bbox!r}")
        if bbox[2] < 0 or bbox[3] < 0:
            raise AnnotationError(ann_file, f"{where}.bbox", f"negative width/height in {bbox}")
        if "area" in a and not _is_num(a["area"]):
            raise AnnotationError(ann_file, f"{where}.area", f"not a number ({a['area']!r})")
        im = images[a["image_id"]]
        x0, y0 = max(bbox[0], 0.0), max(bbox[1], 0.0)
        x1, y1 = min(bbox[0] + bbox[2], im["width"]), min(bbox[1] + bbox[3], im["height"])
        if x1 <= x0 or y1 <= y0:
            dropped += 1
            continue
        kept.append(a)
    data["_dropped"] = dropped
    data["_kept"] = kept
    return data


class CocoDetection(Dataset):
    """Image + DETR target dict (``boxes`` xyxy abs -> normalised cxcywh after transforms)."""

    def __init__(self, img_dir, ann_file, transforms=None, num_classes: int | None = None,
                 max_images: int | None = None):
        self.img_dir, self.ann_file = Path(img_dir), Path(ann_file)
        data = load_annotations(ann_file, img_dir, num_classes)
        self.dropped = data["_dropped"]
        self.images = sorted(data["images"], key=lambda im: im["id"])[:max_images]
        self.by_image = defaultdict(list)
        for a in data["_kept"]:
            self.by_image[a["image_id"]].append(a)
        self.transforms = transforms

    def __len__(self) -> int:
        return len(self.images)

    def _target(self, im: dict) -> dict:
        anns = [a for a in self.by_image[im["id"]] if not a.get("iscrowd", 0)]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, im["width"])
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, im["height"])
        return {"boxes": boxes,
                "labels": torch.tensor([a["category_id"] for a in anns], dtype=torch.int64),
                "area": torch.tensor([a.get("area", a["bbox"][2] * a["bbox"][3]) for a in anns], dtype=torch.float32),
                "iscrowd": torch.zeros(len(anns), dtype=torch.int64),
                "image_id": torch.tensor(im["id"]),
                "orig_size": torch.tensor([im["height"], im["width"]]),
                "size": torch.tensor([im["height"], im["width"]])}

    def __getitem__(self, idx: int):
        im = self.images[idx]
        path = self.img_dir / im["file_name"]
        try:
            img = open_rgb(path)
        except ImageProblem as e:
            raise AnnotationError(self.ann_file, f"images[id={im['id']}]", f"{path}: {e}") from None
        if (img.height, img.width) != (im["height"], im["width"]):
            raise AnnotationError(self.ann_file, f"images[id={im['id']}].height/width",
                                  f"says {im['height']}x{im['width']} but {path} is {img.height}x{img.width}")
        target = self._target(im)
        if self.transforms is not None:
            img, target = self.transforms(img, target)
        return img, target


def collate(batch: list) -> tuple[Tensor, Tensor, list[dict]]:
    """Pad images to the batch's max H, W; mask is True on padding."""
    imgs, targets = zip(*batch)
    h = max(i.shape[1] for i in imgs)
    w = max(i.shape[2] for i in imgs)
    out = torch.zeros(len(imgs), 3, h, w)
    mask = torch.ones(len(imgs), h, w, dtype=torch.bool)
    for k, img in enumerate(imgs):
        out[k, :, : img.shape[1], : img.shape[2]] = img
        mask[k, : img.shape[1], : img.shape[2]] = False
    return out, mask, list(targets)
