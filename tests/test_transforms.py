"""DETR's data transforms (datasets/transforms.py in facebookresearch/detr) against hand
computations: horizontal flip, the resize rule, the crop's box clipping and dropping, and
Normalize. Boxes are absolute xyxy until Normalize."""
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from effdetr.data import transforms as T


def coded_image(w: int, h: int) -> Image.Image:
    """Pixel (x, y) = (10 x, 20 y, 7): where a pixel went is readable after a transform."""
    img = Image.new("RGB", (w, h))
    img.putdata([(10 * x, 20 * y, 7) for y in range(h) for x in range(w)])
    return img


def target(boxes, **extra) -> dict:
    boxes = torch.tensor(boxes, dtype=torch.float32)
    n = len(boxes)
    t = {"boxes": boxes, "labels": torch.arange(1, n + 1), "iscrowd": torch.zeros(n, dtype=torch.int64),
         "area": (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]), "image_id": torch.tensor(42)}
    return t | extra


def test_horizontal_flip_mirrors_boxes_and_pixels():
    """x -> W - x with x0 and x1 swapped (so boxes stay x0 <= x1): in a 10-wide image
    [1, 2, 4, 3] -> [6, 2, 9, 3]; pixel column 1 ends up in column 8. p = 0 never flips.
    Catches a flip that does not swap x0/x1, uses W - 1 - x, or flips y."""
    img, tgt = coded_image(10, 4), target([[1, 2, 4, 3], [0, 0, 10, 4], [0, 1, 3, 4]])
    out_img, out = T.RandomHorizontalFlip(p=1.0)(img, tgt)
    assert out["boxes"].tolist() == [[6, 2, 9, 3], [0, 0, 10, 4], [7, 1, 10, 4]]
    assert out["labels"].tolist() == [1, 2, 3]
    assert out_img.size == (10, 4)
    assert out_img.getpixel((8, 2)) == (10, 40, 7) and out_img.getpixel((0, 0)) == (90, 0, 7)
    assert tgt["boxes"].tolist()[0] == [1, 2, 4, 3]  # the caller's target is not modified
    same_img, same = T.RandomHorizontalFlip(p=0.0)(img, tgt)
    assert same["boxes"].tolist() == tgt["boxes"].tolist() and same_img.getpixel((1, 0)) == (10, 0, 7)


@pytest.mark.parametrize("h,w,size,max_size,expected", [
    (480, 640, 800, 1333, (800, 1066)),    # 800 * 640 / 480 = 1066.7, truncated
    (640, 480, 800, 1333, (1066, 800)),    # portrait: the width is the shorter side
    (427, 640, 800, 1333, (800, 1199)),    # 800 * 640 / 427 = 1199.06
    (800, 800, 800, 1333, (800, 800)),
    (500, 1500, 800, 1333, (444, 1332)),   # 3 * 800 > 1333: size = round(1333 / 3) = 444
    (1500, 500, 800, 1333, (1332, 444)),
    (480, 1000, 800, 1333, (640, 1333)),   # size = round(1333 * 0.48) = round(639.84) = 640
    (600, 1000, 800, 1333, (800, 1333)),   # 1333.3 > 1333 caps, but round(799.8) = 800 again
    (100, 300, 200, None, (200, 600)),     # no cap
])
def test_resize_rule_shorter_side_to_size_longer_side_capped(h, w, size, max_size, expected):
    """DETR's get_size_with_aspect_ratio: the shorter side goes to ``size`` unless the longer
    would then exceed ``max_size``; then size = round(max_size * short / long). Output (h, w).
    Catches a missing cap, int() for round(), the cap computed with short/long swapped, and
    (h, w) returned as (w, h)."""
    assert T.resized_shape(h, w, size, max_size) == expected


def test_resize_scales_boxes_area_and_size_per_axis():
    """A 7 x 4 (w x h) image resized to shorter side 2 becomes 3 x 2 (int(2 * 7 / 4) = 3), so
    x scales by 3/7 and y by 1/2: [3.5, 2, 7, 4] -> [1.5, 1, 3, 2], area 7 -> 1.5. Catches
    the x and y factors swapped and an area left unscaled."""
    img, tgt = coded_image(7, 4), target([[0, 0, 7, 4], [3.5, 2, 7, 4]])
    out_img, out = T.RandomResize([2])(img, tgt)
    assert out_img.size == (3, 2)
    assert out["size"].tolist() == [2, 3]
    torch.testing.assert_close(out["boxes"], torch.tensor([[0, 0, 3, 2], [1.5, 1, 3, 2]]))
    torch.testing.assert_close(out["area"], torch.tensor([6.0, 1.5]))


class Draws:
    """Stands in for the ``random`` module: randint returns the scripted values in order,
    each checked against the range it was asked for."""

    def __init__(self, *values):
        self.values, self.ranges = list(values), []

    def randint(self, a, b):
        v = self.values.pop(0)
        self.ranges.append((a, b))
        assert a <= v <= b, (v, a, b)
        return v


def test_crop_clips_partial_boxes_and_drops_the_ones_left_without_area(monkeypatch):
    """A 20 x 10 image cropped to w 8, h 6 at left 5, top 2 (the window x 5..13, y 2..8):
    boxes shift by (-5, -2) and clip to [0, 8] x [0, 6]; a box with no area left goes, with
    its label and iscrowd. By hand:
      1 [6, 3, 10, 7]  inside          -> [1, 1, 5, 5], area 16
      2 [0, 0, 8, 4]   top-left corner -> [0, 0, 3, 2], area 6
      3 [15, 0, 19, 9] right of it     -> dropped (x clipped to 8..8)
      4 [0, 8, 4, 10]  below it        -> dropped (y clipped to 6..6)
      5 [12, 7, 18, 9] bottom-right    -> [7, 5, 8, 6], area 1
    Catches dropping partially-inside boxes, keeping empty ones, the clip with (h, w)
    for (w, h), and a crop window offset from the boxes'."""
    draws = Draws(8, 6, 2, 5)  # w, h, top, left
    monkeypatch.setattr(T, "random", draws)
    img = coded_image(20, 10)
    tgt = target([[6, 3, 10, 7], [0, 0, 8, 4], [15, 0, 19, 9], [0, 8, 4, 10], [12, 7, 18, 9]],
                 iscrowd=torch.tensor([0, 1, 1, 0, 0]))
    out_img, out = T.RandomSizeCrop(6, 8)(img, tgt)
    assert draws.ranges == [(6, 8), (6, 8), (0, 4), (0, 12)]
    assert out["boxes"].tolist() == [[1, 1, 5, 5], [0, 0, 3, 2], [7, 5, 8, 6]]
    assert out["labels"].tolist() == [1, 2, 5]
    assert out["iscrowd"].tolist() == [0, 1, 0]
    assert out["area"].tolist() == [16, 6, 1]
    assert out["size"].tolist() == [6, 8] and out["image_id"].item() == 42
    assert out_img.size == (8, 6) and out_img.getpixel((0, 0)) == (50, 40, 7)


def test_normalize_uses_imagenet_statistics_and_normalised_cxcywh_boxes():
    """Pixel (255, 0, 128) -> ((1 - 0.485) / 0.229, (0 - 0.456) / 0.224, (128/255 - 0.406) /
    0.225) = (2.24891, -2.03571, 0.42649); in a 40 x 20 (w x h) image the box [4, 2, 12, 10]
    -> centre (8, 6), size (8, 8) -> [0.2, 0.3, 0.2, 0.4]. Catches BGR means, a missing std,
    boxes divided by (h, w) and boxes left as xyxy."""
    img = Image.new("RGB", (40, 20), (255, 0, 128))
    tensor, out = T.Normalize()(img, target([[4, 2, 12, 10], [0, 0, 40, 20]]))
    assert tensor.shape == (3, 20, 40)
    torch.testing.assert_close(tensor[:, 5, 7], torch.tensor([2.2489083, -2.0357143, 0.4264924]))
    torch.testing.assert_close(out["boxes"], torch.tensor([[0.2, 0.3, 0.2, 0.4], [0.5, 0.5, 1.0, 1.0]]))


def test_eval_transforms_resize_then_normalise():
    """The eval pipeline: a 60 x 30 image at val_scale 20 (max_size 50; 40 <= 50, no cap)
    becomes 40 x 20, so [6, 3, 18, 15] -> [4, 2, 12, 10] -> cxcywh / (40, 20, 40, 20)."""
    cfg = SimpleNamespace(val_scale=20, max_size=50)
    tensor, out = T.build_transforms(cfg, train=False)(coded_image(60, 30), target([[6, 3, 18, 15]]))
    assert tensor.shape == (3, 20, 40)
    assert out["size"].tolist() == [20, 40]
    torch.testing.assert_close(out["boxes"], torch.tensor([[0.2, 0.3, 0.2, 0.4]]))
