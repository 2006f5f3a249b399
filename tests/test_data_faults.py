"""Data faults: an in-place edit of the data must retrain (not resume the old model), and every
image is decoded once before training, with errors naming the file and the image id."""
import json
import os
import shutil
import struct
import zlib

import pytest

from effdetr.cli import main
from effdetr.data.coco import AnnotationError, CocoDetection
from tests.conftest import TINY
from tests.test_bad_annotations import make

ROOT = "data/synthcoco"


def png_header(width: int, height: int) -> bytes:
    """A PNG claiming width x height pixels, with no pixel data: what a decompression bomb shows PIL."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@pytest.fixture
def synth(tmp_path, tiny_data):
    """A private copy of the tiny SynthCOCO (tests edit it in place)."""
    root = tmp_path / "data" / "synthcoco"
    shutil.copytree(tiny_data, root)
    return root


def edit_annotation(root, split="train"):
    """Move one box by a pixel, in place, as a hand fix of the labels would."""
    ann = root / "annotations" / f"instances_{split}.json"
    doc = json.loads(ann.read_text())
    doc["annotations"][0]["bbox"][0] += 1
    ann.write_text(json.dumps(doc))


def test_manifest_lies_beside_the_root_and_moves_only_on_an_edit(synth):
    from effdetr.data.manifest import manifest_path, refresh
    assert refresh("synth", synth) == ["no manifest yet: first record"]
    path = manifest_path(synth)
    assert path.parent == synth.parent and path.name == "synthcoco.manifest.json"
    first, stamp = json.loads(path.read_text()), path.stat().st_mtime_ns
    assert refresh("synth", synth) == [] and path.stat().st_mtime_ns == stamp  # nothing changed: untouched

    edit_annotation(synth)
    assert refresh("synth", synth) == ["annotations/instances_train.json (content changed)"]
    assert json.loads(path.read_text())["digest"] != first["digest"]
    img = synth / "images" / "val" / "000003.png"
    img.write_bytes(img.read_bytes() + b"\0")
    assert refresh("synth", synth) == ["images/val/000003.png (size/mtime changed)"]


class FakeRun:
    run_id, uid = "run", "uid"

    def __init__(self, *a, **kw):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def log_metrics(self, *a, **kw):
        pass

    def log_artifact(self, *a, **kw):
        pass


def test_train_after_an_in_place_edit_refuses_then_starts_over(workdir, tiny_data, monkeypatch, capsys):
    """Before: the work dir was keyed by params + code + weight files, so a rerun after editing
    the annotations resumed the finished state and wrote the old weights, bitwise."""
    import effdetr.cli
    import effdetr.engine.train
    import effdetr.tracking
    shutil.copy(TINY, workdir / "params.yaml")
    shutil.copytree(tiny_data, workdir / ROOT)
    work_dirs = []

    def fake_train(cfg, data, out, work, phash, **kw):
        work_dirs.append(work)
        return {"final": {}, "history": []}
    monkeypatch.setattr(effdetr.engine.train, "train", fake_train)
    monkeypatch.setattr(effdetr.tracking, "Run", FakeRun)
    monkeypatch.setattr(effdetr.cli, "_apply_threads", lambda cfg: None)  # keep this process's torch threads
    train = ["train", "--experiment", "detr_dc5", "--data", ROOT, "--out", "m.pt", "--metrics", "m.json"]

    assert main(train) == 0 and main(train) == 0  # the first run records the manifest
    assert work_dirs[0] == work_dirs[1]  # unchanged data: the same state, resumable

    edit_annotation(workdir / ROOT)
    capsys.readouterr()
    assert main(train) == 2
    err = capsys.readouterr().err
    assert f"{ROOT} changed since {ROOT}.manifest.json" in err
    assert "annotations/instances_train.json (content changed)" in err
    assert f"effdetr data manifest --out {ROOT}" in err
    assert len(work_dirs) == 2  # refused before compute

    assert main(["data", "manifest", "--out", ROOT]) == 0
    assert main(train) == 0
    assert work_dirs[2] != work_dirs[0]  # starts over on the edited data

    # a val-only fix is recorded too, but training never reads val: its state stays resumable
    edit_annotation(workdir / ROOT, "val")
    assert main(["data", "manifest", "--out", ROOT]) == 0
    assert main(train) == 0
    assert work_dirs[3] == work_dirs[2]

    # an empty val split is found before training, not by the eval stage afterwards
    ann = workdir / ROOT / "annotations" / "instances_val.json"
    doc = json.loads(ann.read_text())
    ann.write_text(json.dumps(dict(doc, images=[], annotations=[])))
    assert main(["data", "manifest", "--out", ROOT]) == 0
    capsys.readouterr()
    assert main(train) == 2
    assert "instances_val.json: the val split has no images" in capsys.readouterr().err
    assert len(work_dirs) == 4


def test_parse_time_refresh_never_breaks_the_workflow(workdir, tiny_data, monkeypatch, capsys):
    """A read-only data/ or a full disk: Snakemake still parses (warned), no temp file is left."""
    from effdetr import stages
    from effdetr.data import manifest
    shutil.copy(TINY, workdir / "params.yaml")
    shutil.copytree(tiny_data, workdir / ROOT)
    raw = stages.load_raw("params.yaml")
    real_write_text = type(workdir).write_text

    def enospc(self, *a, **k):
        if self.name.endswith(".tmp"):
            real_write_text(self, "partial")
            raise OSError(28, "No space left on device", str(self))
        return real_write_text(self, *a, **k)
    monkeypatch.setattr(type(workdir), "write_text", enospc)
    assert stages.refresh_data_manifest(raw) == []
    assert "could not refresh the manifest" in capsys.readouterr().err
    assert not manifest.manifest_path(ROOT).exists()
    assert not list((workdir / "data").glob(".*.tmp"))


def test_verify_decodes_every_image_and_names_file_and_id(synth, capsys):
    """Before: `data verify` checked the JSON alone; a broken image surfaced when first sampled,
    and a decompression-bomb header as an uncaught traceback."""
    train = synth / "images" / "train"
    (train / "000001.png").write_bytes((train / "000001.png").read_bytes()[:200])  # truncated
    shutil.copy(train / "000002.png", train / "000003.png")  # decodes, at another image's size
    (train / "000005.png").write_bytes(png_header(100_000, 100_000))  # PIL raises
    (train / "000007.png").write_bytes(png_header(10_000, 10_000))  # PIL only warns
    doc = json.loads((synth / "annotations" / "instances_train.json").read_text())
    sizes = {im["file_name"]: (im["height"], im["width"]) for im in doc["images"]}
    assert sizes["000002.png"] != sizes["000003.png"]

    assert main(["data", "verify", "--params", str(TINY), "--out", str(synth)]) == 2
    err = capsys.readouterr().err
    assert "instances_train.json: images: 4 of 48 images cannot be used" in err
    for image_id, name, why in [(2, "000001.png", "cannot decode"), (4, "000003.png", "but the annotation says"),
                                (6, "000005.png", "decompression bomb"), (8, "000007.png", "decompression bomb")]:
        line = next(x for x in err.splitlines() if f"images[id={image_id}]" in x)
        assert str(train / name) in line and why in line, line


def test_verify_cache_skips_unchanged_images(synth, tiny_cfg):
    """Each image that passed is remembered by (size, mtime_ns, width, height): a second check
    decodes nothing, and an image whose file changed is decoded again."""
    from effdetr.data.verify import verify_splits
    assert verify_splits(tiny_cfg, synth, ["val"])["val"]["decoded"] == 16
    assert verify_splits(tiny_cfg, synth, ["val"])["val"]["decoded"] == 0
    img = synth / "images" / "val" / "000004.png"
    st = img.stat()
    img.write_bytes(b"\0" * st.st_size)  # broken, but size and mtime as verified ...
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert verify_splits(tiny_cfg, synth, ["val"])["val"]["decoded"] == 0  # ... so not decoded again
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    with pytest.raises(AnnotationError, match=r"images\[id=5\] .*000004\.png: cannot decode"):
        verify_splits(tiny_cfg, synth, ["val"])


@pytest.mark.parametrize("side", [100_000, 10_000])  # above twice PIL's limit (it raises) / above it (it warns)
def test_a_decompression_bomb_met_in_training_is_named(tmp_path, side):
    p = make(tmp_path)
    (tmp_path / "a.png").write_bytes(png_header(side, side))
    with pytest.raises(AnnotationError, match="decompression bomb") as e:
        CocoDetection(tmp_path, p)[0]
    assert str(tmp_path / "a.png") in str(e.value) and "images[id=1]" in str(e.value)
