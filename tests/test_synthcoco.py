import hashlib
import json

from effdetr.data.coco import load_annotations
from effdetr.data.synthcoco import category_ids, generate


def digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.name.encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_deterministic(tiny_cfg, tmp_path):
    generate(tiny_cfg.data.synth, tmp_path / "a")
    generate(tiny_cfg.data.synth, tmp_path / "b")
    assert digest(tmp_path / "a") == digest(tmp_path / "b")


def test_seed_changes_content(tiny_cfg, tmp_path):
    import dataclasses
    other = dataclasses.replace(tiny_cfg.data.synth, seed=tiny_cfg.data.synth.seed + 1)
    generate(tiny_cfg.data.synth, tmp_path / "a")
    generate(other, tmp_path / "b")
    assert digest(tmp_path / "a") != digest(tmp_path / "b")


def test_coco_format_and_category_holes(tiny_data, tiny_cfg):
    for split, count in (("train", tiny_cfg.data.synth.num_train), ("val", tiny_cfg.data.synth.num_val)):
        ann = tiny_data / "annotations" / f"instances_{split}.json"
        d = load_annotations(ann, tiny_data / "images" / split, tiny_cfg.model.num_classes)
        assert len(d["images"]) == count
        assert d["_dropped"] == 0
        for a in d["annotations"]:
            assert a["area"] > 0 and a["iscrowd"] == 0
            x, y, w, h = a["bbox"]
            assert a["area"] <= w * h + 1e-6
    assert category_ids(6, 1) == [1, 2, 4, 5, 7, 8]


def test_all_size_buckets_present(tmp_path):
    """With the default params the small/medium/large buckets are all populated."""
    from effdetr.config import profile_config
    from tests.conftest import REPO
    import dataclasses
    cfg = profile_config(REPO / "params.yaml", "synth")
    small = dataclasses.replace(cfg.data.synth, num_train=1, num_val=60)
    generate(small, tmp_path)
    s, m = cfg.data.area_ranges
    areas = [a["area"] for a in json.loads((tmp_path / "annotations" / "instances_val.json").read_text())["annotations"]]
    assert sum(a < s * s for a in areas) > 5
    assert sum(s * s <= a < m * m for a in areas) > 5
    assert sum(a >= m * m for a in areas) > 5
