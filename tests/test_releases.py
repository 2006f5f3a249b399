"""Released checkpoints: verified downloads, pinned checksums, safe loading."""
import argparse
import hashlib
from types import SimpleNamespace

import pytest
import torch

from effdetr.convert import load_official
from effdetr.convert import releases as rel_mod
from effdetr.data.download import DownloadError, fetch_checked
from tests.test_download import Handler, server  # noqa: F401 - the local HTTP server fixture


def test_fetch_checked_verifies_the_published_prefix_and_resumes(server, tmp_path):  # noqa: F811
    data = b"checkpoint-bytes" * 5000
    prefix = hashlib.sha256(data).hexdigest()[:8]
    Handler.files["/detr/good.pth"] = data
    Handler.cut_after = 20000  # the first transfer breaks off
    with pytest.raises(DownloadError, match="truncated at 20000 of 80000 bytes.*rerun to resume"):
        fetch_checked(f"{server}/detr/good.pth", tmp_path / "good.pth", prefix)
    assert (tmp_path / "good.pth.part").stat().st_size == 20000
    dest = fetch_checked(f"{server}/detr/good.pth", tmp_path / "good.pth", prefix)
    assert dest.read_bytes() == data and Handler.requests[-1][1] == "bytes=20000-"
    Handler.files["/detr/bad.pth"] = b"other bytes"
    with pytest.raises(DownloadError, match=rf"SHA-256 [0-9a-f]{{64}}, expected {prefix}\.\.\."):
        fetch_checked(f"{server}/detr/bad.pth", tmp_path / "bad.pth", prefix)
    assert (tmp_path / "bad.pth.part.bad").read_bytes() == b"other bytes"  # kept, never deleted


def _release(monkeypatch, server, **entry):  # noqa: F811
    table = {"r": {"format": "detr", "file": "r.pth", "url": f"{server}/r.pth", "source": "test", **entry}}
    monkeypatch.setattr(rel_mod, "releases", lambda: table)
    return SimpleNamespace(file=None, release="r")


def test_unpublished_checksum_is_pinned_on_first_download(server, tmp_path, monkeypatch):  # noqa: F811
    spec = _release(monkeypatch, server, sha256=None)
    Handler.files["/r.pth"] = b"v1" * 100
    path, digest = rel_mod.resolve_source(spec, tmp_path)
    sums = (tmp_path / "SHA256SUMS").read_text()
    assert sums == f"{hashlib.sha256(b'v1' * 100).hexdigest()}  r.pth\n" and sums.startswith(digest)
    assert rel_mod.resolve_source(spec, tmp_path) == (path, digest)  # checked again, still fine
    path.write_bytes(b"v2" * 100)  # the file changed on disk
    with pytest.raises(DownloadError, match="differs from the one recorded on first download"):
        rel_mod.resolve_source(spec, tmp_path)


def test_a_file_on_disk_is_checked_against_the_published_prefix(server, tmp_path, monkeypatch):  # noqa: F811
    good = b"released weights"
    spec = _release(monkeypatch, server, sha256=hashlib.sha256(good).hexdigest()[:8])
    (tmp_path / "r.pth").write_bytes(b"put here by hand, but not the release")
    with pytest.raises(DownloadError, match=r"r\.pth: SHA-256 .* does not start with the published"):
        rel_mod.resolve_source(spec, tmp_path)
    assert not Handler.requests  # nothing downloaded over a file that exists


def test_manual_release_and_missing_file_name_what_to_do(server, tmp_path, monkeypatch):  # noqa: F811
    spec = _release(monkeypatch, server, sha256=None, manual=True, url="https://drive.example/x")
    with pytest.raises(FileNotFoundError, match=r"r\.pth: release 'r' must be downloaded by hand from "
                                                 r"https://drive\.example/x"):
        rel_mod.resolve_source(spec, tmp_path)
    with pytest.raises(FileNotFoundError, match=r"nope\.pth: checkpoint not found \(import_checkpoint\.file\)"):
        rel_mod.resolve_source(SimpleNamespace(file=str(tmp_path / "nope.pth"), release=None), tmp_path)


def test_official_checkpoints_load_without_running_pickled_code(tmp_path):
    path = tmp_path / "ckpt.pth"
    torch.save({"model": {"w": torch.ones(2)}, "args": argparse.Namespace(dilation=True), "epoch": 49}, path)
    ckpt = load_official(path)
    assert ckpt["args"].dilation is True and ckpt["epoch"] == 49

    class Evil:
        def __reduce__(self):
            return (print, ("pickled code ran",))
    torch.save({"model": {}, "x": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match=r"evil\.pth: not a readable torch checkpoint"):
        load_official(tmp_path / "evil.pth")
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(ValueError, match=r"junk\.pth: not a readable torch checkpoint"):
        load_official(tmp_path / "junk.pth")
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(ValueError, match=r"list\.pth: expected a dict"):
        load_official(tmp_path / "list.pth")


def test_eval_only_coco_copy_needs_val2017_alone(tmp_path):
    """Released checkpoints need val2017 + annotations (~1 GB); train2017 only when listed."""
    import shutil
    from types import SimpleNamespace

    from effdetr.data.download import prepare_coco
    from tests.test_coco_path import fabricate_coco
    src = tmp_path / "coco"
    fabricate_coco(src)
    shutil.rmtree(src / "train2017")
    cfg = SimpleNamespace(existing=str(src), splits=["val2017", "annotations_trainval2017"])
    assert (prepare_coco(cfg, tmp_path / "data" / "coco") / "val2017").is_dir()
    cfg.splits = ["train2017", "val2017", "annotations_trainval2017"]
    with pytest.raises(DownloadError, match=r"train2017: image folder missing"):
        prepare_coco(cfg, tmp_path / "data" / "coco2")
