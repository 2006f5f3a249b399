import json

import pytest

from effdetr.evaluation.coco_eval import STAT_NAMES, coco_evaluate, load_coco_gt


def write_gt(tmp_path, anns, images=((1, 100, 100), (2, 100, 100))):
    gt = {"images": [{"id": i, "file_name": f"{i}.png", "height": h, "width": w} for i, h, w in images],
          "annotations": [{"id": k + 1, "image_id": im, "category_id": c, "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
                          for k, (im, c, b) in enumerate(anns)],
          "categories": [{"id": 1, "name": "a"}, {"id": 3, "name": "b"}]}
    p = tmp_path / "gt.json"
    p.write_text(json.dumps(gt))
    return load_coco_gt(str(p))


ANNS = [(1, 1, [10, 10, 40, 40]), (1, 3, [60, 60, 20, 20]), (2, 1, [5, 5, 8, 8])]


def test_perfect_predictions_give_ap_one(tmp_path):
    gt = write_gt(tmp_path, ANNS)
    dets = [{"image_id": im, "category_id": c, "bbox": b, "score": 0.9} for im, c, b in ANNS]
    s = coco_evaluate(gt, dets, [1, 2], area_ranges=(10, 30))
    assert set(s) == set(STAT_NAMES)
    assert s["AP"] == pytest.approx(1.0) and s["AP50"] == pytest.approx(1.0)
    assert s["APs"] == pytest.approx(1.0) and s["APl"] == pytest.approx(1.0)


def test_hand_made_case(tmp_path):
    """Two GT boxes of one class; detections: a hit (score .9), a miss (.8), the second GT
    found late (.7). Precision at recall .5 is 1, at recall 1 is 2/3 -> interpolated
    101-point AP = (51*1 + 50*2/3)/101 at every IoU threshold."""
    gt = write_gt(tmp_path, [(1, 1, [10, 10, 40, 40]), (2, 1, [20, 20, 40, 40])])
    dets = [{"image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 40], "score": 0.9},
            {"image_id": 1, "category_id": 1, "bbox": [70, 70, 20, 20], "score": 0.8},
            {"image_id": 2, "category_id": 1, "bbox": [20, 20, 40, 40], "score": 0.7}]
    s = coco_evaluate(gt, dets, [1, 2])
    expected = (51 * 1.0 + 50 * 2 / 3) / 101
    assert s["AP"] == pytest.approx(expected, abs=1e-6)
    assert s["AR100"] == pytest.approx(1.0)


def test_empty_detections_give_zeros(tmp_path):
    gt = write_gt(tmp_path, ANNS)
    assert coco_evaluate(gt, [], [1, 2]) == {k: 0.0 for k in STAT_NAMES}


def test_unknown_image_ids_rejected(tmp_path):
    gt = write_gt(tmp_path, ANNS)
    with pytest.raises(ValueError, match="not in the ground truth"):
        coco_evaluate(gt, [{"image_id": 99, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 1}], [99])


def test_subset_of_images_scored_against_its_own_ground_truth(tmp_path):
    gt = write_gt(tmp_path, ANNS)
    dets = [{"image_id": 2, "category_id": 1, "bbox": [5, 5, 8, 8], "score": 0.9}]
    assert coco_evaluate(gt, dets, [2])["AP"] == pytest.approx(1.0)
