"""SynthCOCO: a deterministic, COCO-format detection dataset drawn on the fly.

Each image is a textured background (smooth noise plus stripes or checks) with 1..N
filled shapes -- one category per shape kind; each category's hue is drawn around its own
centre with a spread wider than the gap to its neighbours, so colour is a cue but only
shape decides the class. Objects are placed in order; a placement is rejected when it would hide more
than ``max_overlap`` of any earlier object, so occlusion is present but bounded. Sides are
log-uniform in [min_side, max_side], which spreads objects over the small / medium /
large buckets given by ``data.area_ranges`` (side lengths; area = visible pixel count,
as COCO's ``area`` is the segment area). Category ids start at ``category_id_offset`` and
skip every third id, so code that assumes contiguous ids fails here as it would on COCO.
Everything derives from (seed, split, image index): the same params give the same bytes.
"""
from __future__ import annotations

import colorsys
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ["circle", "square", "triangle", "star", "cross", "ring", "diamond", "hexagon"]
SPLIT_SEEDS = {"train": 0, "val": 1}


def category_ids(num_classes: int, offset: int) -> list[int]:
    """Ids with COCO-like holes: offset, offset+1, (skip), offset+3, offset+4, (skip), ..."""
    ids, cid = [], offset
    while len(ids) < num_classes:
        if (cid - offset) % 3 != 2:
            ids.append(cid)
        cid += 1
    return ids


def _background(rng: np.random.Generator, h: int, w: int, saturation: float, contrast: float) -> np.ndarray:
    """Smooth colour noise plus stripes or checks; ``saturation`` blends the noise towards
    its own grey, ``contrast`` scales the texture around mid-grey (1, 1 = loud, busy)."""
    coarse = rng.uniform(0, 255, size=(max(h // 16, 2), max(w // 16, 2), 3)).astype(np.float32)
    img = np.asarray(Image.fromarray(coarse.astype(np.uint8)).resize((w, h), Image.BILINEAR), np.float32)
    img = saturation * img + (1 - saturation) * img.mean(-1, keepdims=True)
    yy, xx = np.mgrid[0:h, 0:w]
    period = rng.uniform(10, 40)
    angle = rng.uniform(0, math.pi)
    if rng.random() < 0.5:
        pattern = np.sin((xx * math.cos(angle) + yy * math.sin(angle)) * 2 * math.pi / period)
    else:
        pattern = np.sign(np.sin(xx * 2 * math.pi / period) * np.sin(yy * 2 * math.pi / period))
    img = 0.7 * img + 0.3 * 127 * (1 + pattern[..., None]) * rng.uniform(0.3, 1.0, size=3)
    img = 127.5 + contrast * (img - 127.5)
    img += rng.normal(0, 5, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _class_colour(rng: np.random.Generator, cls: int, num_classes: int, jitter: float) -> np.ndarray:
    """Hue drawn around the category's own hue with std ``jitter`` x the gap between
    neighbouring categories: below ~0.3 colour nearly decides the class, above ~0.5 only
    shape does. Saturation and value vary freely."""
    hue = (cls / num_classes + rng.normal(0, jitter / num_classes)) % 1.0
    sat, val = rng.uniform(0.5, 1.0), rng.uniform(0.55, 1.0)
    return 255 * np.array(colorsys.hsv_to_rgb(hue, sat, val))


def _polygon(kind: str, x: float, y: float, s: float) -> list[tuple[float, float]]:
    """Axis-aligned polygon vertices inside the square [x, x+s] x [y, y+s]."""
    cx, cy, r = x + s / 2, y + s / 2, s / 2
    if kind == "triangle":
        pts = [(0, -1), (1, 1), (-1, 1)]
    elif kind == "star":
        pts = [(math.cos(a) * (1 if i % 2 == 0 else 0.45), math.sin(a) * (1 if i % 2 == 0 else 0.45))
               for i, a in enumerate(np.linspace(-math.pi / 2, 1.5 * math.pi, 10, endpoint=False))]
        return [(cx + r * px, cy + r * py) for px, py in pts]
    elif kind == "cross":
        t = 0.33
        pts = [(-t, -1), (t, -1), (t, -t), (1, -t), (1, t), (t, t), (t, 1), (-t, 1), (-t, t), (-1, t), (-1, -t), (-t, -t)]
    elif kind == "diamond":
        pts = [(0, -1), (1, 0), (0, 1), (-1, 0)]
    elif kind == "hexagon":
        pts = [(math.cos(a), math.sin(a)) for a in np.linspace(0, 2 * math.pi, 6, endpoint=False)]
    else:
        raise ValueError(kind)
    return [(cx + r * px, cy + r * py) for px, py in pts]


def _shape_mask(kind: str, h: int, w: int, x: float, y: float, s: float) -> np.ndarray:
    m = Image.new("L", (w, h), 0)
    d = ImageDraw.Draw(m)
    box = [x, y, x + s - 1, y + s - 1]
    if kind == "circle":
        d.ellipse(box, fill=255)
    elif kind == "square":
        d.rectangle(box, fill=255)
    elif kind == "ring":
        d.ellipse(box, fill=255)
        t = max(s * 0.25, 1.5)
        d.ellipse([x + t, y + t, x + s - 1 - t, y + s - 1 - t], fill=0)
    else:
        d.polygon(_polygon(kind, x, y, s - 1), fill=255)
    return np.asarray(m) > 0


def render_image(cfg, split: str, index: int) -> tuple[np.ndarray, list[dict]]:
    """One image and its objects: [{'category', 'bbox' (x,y,w,h), 'area'}]."""
    rng = np.random.default_rng([cfg.seed, SPLIT_SEEDS[split], index])
    size = cfg.image_size
    h = int(round(size * rng.uniform(0.85, 1.15)))
    w = int(round(size * rng.uniform(0.85, 1.15)))
    img = _background(rng, h, w, cfg.background_saturation, cfg.background_contrast).astype(np.float32)
    n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    objects, masks = [], []
    for _ in range(n):
        for _attempt in range(20):
            s = float(np.exp(rng.uniform(math.log(cfg.min_side), math.log(min(cfg.max_side, h, w)))))
            s = max(round(s), cfg.min_side)
            x, y = int(rng.integers(0, w - s + 1)), int(rng.integers(0, h - s + 1))
            cls = int(rng.integers(0, cfg.num_classes))
            m = _shape_mask(SHAPES[cls], h, w, x, y, s)
            if m.sum() < 4:
                continue
            if all((vis & ~m).sum() >= (1 - cfg.max_overlap) * full for vis, full in
                   ((mv, o["full_area"]) for mv, o in zip(masks, objects))):
                break
        else:
            continue
        masks = [mv & ~m for mv in masks]
        masks.append(m)
        colour = _class_colour(rng, cls, cfg.num_classes, cfg.hue_jitter)
        img[m] = colour + rng.normal(0, 6, size=(int(m.sum()), 3))
        objects.append({"category": cls, "full_area": int(m.sum())})
    img = np.clip(img, 0, 255).astype(np.uint8)
    anns = []
    for o, m in zip(objects, masks):
        ys, xs = np.nonzero(m)
        if len(xs) == 0:
            continue
        x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
        anns.append({"category": o["category"], "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                     "area": float(m.sum())})
    return img, anns


def generate(cfg, root: str | Path) -> dict:
    """Write images/{train,val}/*.png and annotations/instances_{train,val}.json under root."""
    root = Path(root)
    ids = category_ids(cfg.num_classes, cfg.category_id_offset)
    categories = [{"id": cid, "name": SHAPES[i], "supercategory": "shape"} for i, cid in enumerate(ids)]
    summary = {}
    for split, count in (("train", cfg.num_train), ("val", cfg.num_val)):
        img_dir = root / "images" / split
        img_dir.mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for i in range(count):
            img, objs = render_image(cfg, split, i)
            name = f"{i:06d}.png"
            Image.fromarray(img).save(img_dir / name, optimize=False, compress_level=1)
            image_id = i + 1
            images.append({"id": image_id, "file_name": name, "height": img.shape[0], "width": img.shape[1]})
            for o in objs:
                annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                    "category_id": ids[o["category"]], "bbox": o["bbox"],
                                    "area": o["area"], "iscrowd": 0})
        ann_dir = root / "annotations"
        ann_dir.mkdir(parents=True, exist_ok=True)
        coco = {"info": {"description": "SynthCOCO", "seed": cfg.seed}, "images": images,
                "annotations": annotations, "categories": categories}
        tmp = ann_dir / f".instances_{split}.json.tmp"
        tmp.write_text(json.dumps(coco))
        tmp.replace(ann_dir / f"instances_{split}.json")
        summary[split] = {"images": len(images), "annotations": len(annotations)}
    return summary
