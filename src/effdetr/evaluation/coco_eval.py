"""Thin wrapper over pycocotools COCOeval: all 12 stats as a dict, with guards.

Guards: an empty detection list (pycocotools crashes on it) yields zeros; detections must
refer to ground-truth images; evaluation is restricted to the images actually predicted
(so a capped val set is scored against its own ground truth). ``area_ranges`` (side
lengths) replaces COCO's 32/96 split for datasets with other object scales.
"""
from __future__ import annotations

import contextlib
import io

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

STAT_NAMES = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]


def load_coco_gt(ann_file: str) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(ann_file)


def coco_evaluate(gt: COCO, detections: list[dict], image_ids: list[int],
                  area_ranges: tuple[float, float] = (32, 96)) -> dict[str, float]:
    """detections: [{'image_id', 'category_id', 'bbox' (x,y,w,h), 'score'}] -> 12 stats."""
    image_ids = sorted(set(image_ids))
    unknown = {d["image_id"] for d in detections} - set(gt.getImgIds())
    if unknown:
        raise ValueError(f"detections refer to {len(unknown)} image ids not in the ground truth, e.g. {sorted(unknown)[:5]}")
    if not detections:
        return {k: 0.0 for k in STAT_NAMES}
    s, m = (float(a) ** 2 for a in area_ranges)
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(detections)
        ev = COCOeval(gt, dt, "bbox")
        ev.params.imgIds = image_ids
        ev.params.areaRng = [[0, 1e10], [0, s], [s, m], [m, 1e10]]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    # pycocotools reports -1 where a bucket has no ground truth; keep it visible as NaN.
    return {k: (float(v) if v >= 0 else float("nan")) for k, v in zip(STAT_NAMES, np.asarray(ev.stats))}
