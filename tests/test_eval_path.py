"""The evaluation path end to end, with a model that knows the answer.

A stub with DETR's output contract (``pred_logits`` [B, Q, C+1], the last class "no object";
``pred_boxes`` [B, Q, 4], normalised cx, cy, w, h of each image's own extent) emits the
ground truth. Run through the real ``evaluate_dataset`` -- val transforms (DETR's resize
rule), padded batches of non-square images of different sizes, post-processing to pixel
xyxy of the original image, xyxy -> COCO xywh, category ids used as class indices (COCO's
ids have holes) -- it must score AP = 1.0. Each step that can go wrong (scaling by the
padded or resized size instead of the original one, swapping w and h, skipping the xywh
conversion, shifting the category ids) scores below 1.
"""
import json
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from torch import nn

from effdetr.data.coco import CocoDetection, collate
from effdetr.data.transforms import build_transforms
from effdetr.engine.evaluate import evaluate_dataset, predict

NUM_CLASSES = 8  # class indices 0..7 = category ids; 7 + 1 = "no object"
CATEGORIES = [1, 3, 7]  # non-contiguous, as COCO's 1..90 with holes
# image id -> (height, width), its boxes as (category id, [x, y, w, h]) in original pixels
IMAGES = {
    139: ((60, 90), [(1, [10.0, 5.0, 30.0, 20.0]), (7, [50.0, 30.0, 36.0, 24.0])]),
    285: ((100, 40), [(3, [4.0, 10.0, 20.0, 50.0]), (1, [22.0, 70.0, 16.0, 24.0])]),
    632: ((50, 50), [(7, [0.0, 0.0, 25.0, 50.0])]),
}
# DETR's resize rule by hand for val_scale 64, max_size 100: shorter side -> 64 unless the
# longer one would pass 100 (100x40: 64 * 2.5 = 160 > 100, so the shorter side becomes 40)
RESIZED = {139: (64, 96), 285: (100, 40), 632: (64, 64)}
INPUT = SimpleNamespace(val_scale=64, max_size=100)


def write_dataset(root):
    (root / "images").mkdir(parents=True)
    images, anns = [], []
    for iid, ((h, w), boxes) in IMAGES.items():
        Image.new("RGB", (w, h), (90, 120, 150)).save(root / "images" / f"{iid:012d}.png")
        images.append({"id": iid, "file_name": f"{iid:012d}.png", "height": h, "width": w})
        for cat, box in boxes:
            anns.append({"id": len(anns) + 1, "image_id": iid, "category_id": cat, "bbox": box,
                         "area": box[2] * box[3], "iscrowd": 0})
    ann_file = root / "instances_val.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": anns,
                                    "categories": [{"id": c, "name": f"c{c}"} for c in CATEGORIES]}))
    return CocoDetection(root / "images", ann_file, build_transforms(INPUT, train=False), num_classes=NUM_CLASSES)


def normalised_cxcywh(box, h, w):
    """COCO [x, y, w, h] pixels -> DETR's target: centre and size over the image's w and h."""
    x, y, bw, bh = box
    return [(x + bw / 2) / w, (y + bh / 2) / h, bw / w, bh / h]


class GroundTruthStub(nn.Module):
    """Emits each image's ground truth in the first queries (logit 10 on its category id),
    "no object" elsewhere. Images come in dataset order (the loader does not shuffle); each
    one's unpadded extent is checked against the hand-computed resize first."""

    def __init__(self, num_queries: int = 5):
        super().__init__()
        self.order = sorted(IMAGES)
        self.seen = 0
        self.num_queries = num_queries

    def forward(self, images, masks):
        b, q, c = images.shape[0], self.num_queries, NUM_CLASSES
        logits = torch.zeros(b, q, c + 1)
        logits[..., c] = 10.0
        boxes = torch.full((b, q, 4), 0.2)
        for i in range(b):
            iid = self.order[self.seen]
            self.seen += 1
            valid = ~masks[i]
            extent = (int(valid.any(1).sum()), int(valid.any(0).sum()))
            assert extent == RESIZED[iid], f"image {iid}: unpadded extent {extent}, expected {RESIZED[iid]}"
            (h, w), objs = IMAGES[iid]
            for k, (cat, box) in enumerate(objs):
                logits[i, k] = 0.0
                logits[i, k, cat] = 10.0
                boxes[i, k] = torch.tensor(normalised_cxcywh(box, h, w))
        return {"pred_logits": logits, "pred_boxes": boxes}


def test_the_batches_are_padded_non_square_images_of_different_sizes(tmp_path):
    """What the stub is fed: the first batch pads a 64x96 and a 100x40 image to 100x96."""
    ds = write_dataset(tmp_path)
    images, masks, targets = collate([ds[0], ds[1]])
    assert tuple(images.shape[-2:]) == (100, 96)
    assert [tuple(t["orig_size"].tolist()) for t in targets] == [(60, 90), (100, 40)]
    assert bool(masks[0, 64:, :].all()) and not bool(masks[0, :64, :96].any())
    assert bool(masks[1, :, 40:].all()) and not bool(masks[1, :, :40].any())


def test_ground_truth_predictions_score_ap_one(tmp_path):
    ds = write_dataset(tmp_path)
    stats = evaluate_dataset(GroundTruthStub(), ds, torch.device("cpu"), batch_size=2, num_workers=0,
                             area_ranges=(16, 48))
    assert stats["num_images"] == 3
    for k in ("AP", "AP50", "AP75", "AR100"):
        assert stats[k] == pytest.approx(1.0), (k, stats)


def test_detections_are_the_ground_truth_boxes_in_original_pixels(tmp_path):
    """The same path one step earlier: each ground-truth box comes back as a COCO detection
    [x, y, w, h] in the original image's pixels, under its own category id."""
    ds = write_dataset(tmp_path)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, shuffle=False, collate_fn=collate)
    dets, ids, _ = predict(GroundTruthStub(), loader, torch.device("cpu"))
    assert ids == [139, 285, 632]
    confident = [d for d in dets if d["score"] > 0.5]
    assert len(confident) == sum(len(objs) for _, objs in IMAGES.values())
    for iid, (_, objs) in IMAGES.items():
        got = sorted((d["category_id"], d["bbox"]) for d in confident if d["image_id"] == iid)
        want = sorted(objs)
        assert [c for c, _ in got] == [c for c, _ in want], iid
        for (_, g), (_, w) in zip(got, want):
            assert g == pytest.approx(w, abs=1e-3), (iid, g, w)
