"""Every rejected annotation case names the file and the field; the documented filters hold."""
import json

import pytest
from PIL import Image

from effdetr.data.coco import AnnotationError, CocoDetection, load_annotations


def make(tmp_path, anns=None, images=None, cats=None, files=True):
    images = images if images is not None else [{"id": 1, "file_name": "a.png", "height": 20, "width": 30}]
    if files:
        for im in images:
            Image.new("RGB", (im["width"], im["height"])).save(tmp_path / im["file_name"])
    doc = {"images": images,
           "annotations": anns if anns is not None else [
               {"id": 1, "image_id": 1, "category_id": 2, "bbox": [1, 1, 5, 5], "area": 25, "iscrowd": 0}],
           "categories": cats if cats is not None else [{"id": 2, "name": "x"}]}
    p = tmp_path / "ann.json"
    p.write_text(json.dumps(doc))
    return p


def ann(**kw):
    a = {"id": 1, "image_id": 1, "category_id": 2, "bbox": [1, 1, 5, 5], "area": 25, "iscrowd": 0}
    a.update(kw)
    return [a]


@pytest.mark.parametrize("kw,field,msg", [
    ({"bbox": [1, 1, -2, 5]}, "annotations[0].bbox", "negative"),
    ({"bbox": [1, 1, 5]}, "annotations[0].bbox", "expected [x, y, w, h]"),
    ({"bbox": [1, "a", 5, 5]}, "annotations[0].bbox", "expected [x, y, w, h]"),
    ({"category_id": 7}, "annotations[0].category_id", "unknown category id 7"),
    ({"image_id": 5}, "annotations[0].image_id", "unknown image id 5"),
    ({"area": "big"}, "annotations[0].area", "not a number"),
])
def test_bad_annotation_fields(tmp_path, kw, field, msg):
    p = make(tmp_path, anns=ann(**kw))
    with pytest.raises(AnnotationError) as e:
        load_annotations(p, tmp_path)
    assert str(p) in str(e.value) and field in str(e.value) and msg in str(e.value)


def test_missing_image_file(tmp_path):
    p = make(tmp_path, files=False)
    with pytest.raises(AnnotationError, match=r"images\[0\]\.file_name.*does not exist") as e:
        load_annotations(p, tmp_path)
    assert str(p) in str(e.value)


def test_malformed_json(tmp_path):
    p = tmp_path / "ann.json"
    p.write_text('{"images": [')
    with pytest.raises(AnnotationError, match="malformed JSON at line 1") as e:
        load_annotations(p)
    assert str(p) in str(e.value)


def test_missing_sections_and_file(tmp_path):
    p = tmp_path / "ann.json"
    p.write_text(json.dumps({"images": []}))
    with pytest.raises(AnnotationError, match="annotations: missing or not a list"):
        load_annotations(p)
    with pytest.raises(AnnotationError, match="annotation file not found"):
        load_annotations(tmp_path / "nope.json")


def test_bad_image_entry_and_category_range(tmp_path):
    p = make(tmp_path, images=[{"id": 1, "file_name": "a.png", "height": 0, "width": 30}], files=False)
    with pytest.raises(AnnotationError, match=r"images\[0\]\.height"):
        load_annotations(p)
    p = make(tmp_path, cats=[{"id": 2, "name": "x"}])
    with pytest.raises(AnnotationError, match=r"categories\[0\]\.id.*num_classes=2"):
        load_annotations(p, tmp_path, num_classes=2)


def test_documented_filters(tmp_path):
    """Zero-size and fully-outside boxes are dropped and counted; partial ones clipped."""
    anns = [dict(ann()[0], id=1, bbox=[1, 1, 0, 5]),
            dict(ann()[0], id=2, bbox=[40, 1, 5, 5]),
            dict(ann()[0], id=3, bbox=[25, 15, 10, 10]),
            dict(ann()[0], id=4, bbox=[2, 2, 4, 4], iscrowd=1)]
    p = make(tmp_path, anns=anns)
    ds = CocoDetection(tmp_path, p)
    assert ds.dropped == 2
    _, target = ds[0]
    assert target["boxes"].tolist() == [[25.0, 15.0, 30.0, 20.0]]  # clipped; crowd box not a target


def test_corrupt_image_file_named(tmp_path):
    p = make(tmp_path)
    (tmp_path / "a.png").write_bytes(b"not a png")
    ds = CocoDetection(tmp_path, p)
    with pytest.raises(AnnotationError, match="cannot read image") as e:
        ds[0]
    assert "a.png" in str(e.value)


def test_image_size_mismatch_named(tmp_path):
    p = make(tmp_path)
    Image.new("RGB", (31, 20)).save(tmp_path / "a.png")
    with pytest.raises(AnnotationError, match=r"height/width.*20x30.*20x31"):
        CocoDetection(tmp_path, p)[0]


def test_non_utf8_bytes_named_with_offset_and_line(tmp_path):
    """Before: a bare UnicodeDecodeError naming neither the file nor where."""
    p = tmp_path / "ann.json"
    body = b'{"images": [],\n "annotations": [],\n "categories": [{"id": 1, "name": "caf\xe9"}]}'
    p.write_bytes(body)
    offset = body.index(b"\xe9")
    column = offset - body.rindex(b"\n", 0, offset)
    with pytest.raises(AnnotationError, match=rf"not UTF-8: byte 0xe9 at byte offset {offset} "
                                              rf"\(line 3, column {column};") as e:
        load_annotations(p)
    assert str(p) in str(e.value)
