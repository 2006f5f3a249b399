"""COCO download: verified, resumable, atomic -- against a real HTTP server on 127.0.0.1."""
import hashlib
import io
import threading
import zipfile
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from effdetr.data.download import Archive, DownloadError, extract, fetch, prepare_coco


def make_zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


class Handler(BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}
    cut_after: int | None = None  # bytes to send before dropping the connection (once)
    honour_range = True
    requests: list = []

    def log_message(self, *a):
        pass

    def do_GET(self):
        data = self.files.get(self.path)
        Handler.requests.append((self.path, self.headers.get("Range")))
        if data is None:
            self.send_error(404)
            return
        start = 0
        rng = self.headers.get("Range")
        if rng and self.honour_range:
            start = int(rng.split("=")[1].split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if Handler.cut_after is not None:
            self.wfile.write(body[:Handler.cut_after])
            Handler.cut_after = None
            self.wfile.flush()
            self.connection.shutdown(2)
            return
        self.wfile.write(body)


@pytest.fixture
def server():
    Handler.files, Handler.cut_after, Handler.honour_range, Handler.requests = {}, None, True, []
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


def publish(path, data):
    Handler.files[path] = data
    return Archive(path.lstrip("/"), len(data), hashlib.md5(data).hexdigest())


def test_good_archive(server, tmp_path):
    data = make_zip({"val2017/1.jpg": b"x" * 1000})
    arc = publish("/zips/val.zip", data)
    dest = fetch(f"{server}/zips/val.zip", tmp_path / "val.zip", arc)
    assert dest.read_bytes() == data and not (tmp_path / "val.zip.part").exists()
    assert fetch(f"{server}/zips/val.zip", dest, arc) == dest  # idempotent, no new request
    assert len(Handler.requests) == 1


def test_interrupted_then_resumed(server, tmp_path):
    data = make_zip({"val2017/1.jpg": bytes(range(256)) * 400})
    arc = publish("/zips/val.zip", data)
    Handler.cut_after = 30_000
    with pytest.raises(DownloadError, match="truncated|transfer failed"):
        fetch(f"{server}/zips/val.zip", tmp_path / "val.zip", arc)
    part = tmp_path / "val.zip.part"
    assert 0 < part.stat().st_size < len(data)
    dest = fetch(f"{server}/zips/val.zip", tmp_path / "val.zip", arc)
    assert dest.read_bytes() == data
    assert Handler.requests[-1][1] == "bytes=30000-"


def test_server_without_range_support_restarts(server, tmp_path):
    data = make_zip({"a": b"y" * 5000})
    arc = publish("/a.zip", data)
    (tmp_path / "a.zip.part").write_bytes(data[:100])
    Handler.honour_range = False
    assert fetch(f"{server}/a.zip", tmp_path / "a.zip", arc).read_bytes() == data


def test_corrupted_archive_is_quarantined_not_deleted(server, tmp_path):
    data = make_zip({"a": b"z" * 5000})
    arc = publish("/a.zip", data)
    Handler.files["/a.zip"] = data[:-10] + b"0123456789"  # same size, wrong bytes
    with pytest.raises(DownloadError, match="MD5 .* expected " + arc.md5) as e:
        fetch(f"{server}/a.zip", tmp_path / "a.zip", arc)
    assert (tmp_path / "a.zip.part.bad").exists() and not (tmp_path / "a.zip").exists()
    assert "a.zip.part" in str(e.value)


def test_wrong_size_and_bad_zip(server, tmp_path):
    data = make_zip({"a": b"q" * 100})
    arc = publish("/a.zip", data)
    Handler.files["/a.zip"] = data + b"extra"
    with pytest.raises(DownloadError, match="expected " + str(len(data))):
        fetch(f"{server}/a.zip", tmp_path / "a.zip", arc)
    junk = b"not a zip at all" * 10
    arc2 = publish("/b.zip", junk)
    with pytest.raises(DownloadError, match="not a valid zip"):
        fetch(f"{server}/b.zip", tmp_path / "b.zip", arc2)


def test_http_error_names_url(server, tmp_path):
    with pytest.raises(DownloadError, match="missing.zip"):
        fetch(f"{server}/missing.zip", tmp_path / "m.zip", Archive("missing.zip", 10, "0" * 32))


@dataclass
class Cfg:
    base_url: str
    splits: list
    existing: str | None = None


def test_prepare_and_extract_layout(server, tmp_path):
    import json
    ann = {"images": [{"id": 1, "file_name": "1.jpg", "height": 2, "width": 2}], "annotations": [],
           "categories": [{"id": 1, "name": "a"}]}
    arcs = {
        "val2017": publish("/zips/val2017.zip", make_zip({"val2017/1.jpg": b"j"})),
        "train2017": publish("/zips/train2017.zip", make_zip({"train2017/1.jpg": b"j"})),
        "annotations_trainval2017": publish("/annotations/ann.zip", make_zip({
            "annotations/instances_val2017.json": json.dumps(ann).encode(),
            "annotations/instances_train2017.json": json.dumps(ann).encode()})),
    }
    root = prepare_coco(Cfg(server, list(arcs)), tmp_path / "coco", archives=arcs)
    assert (root / "val2017" / "1.jpg").exists() and (root / "annotations" / "instances_train2017.json").exists()
    extract(root / "zips" / "val2017.zip", root)  # second call is a no-op
    # an existing copy is validated and linked instead of downloaded
    linked = prepare_coco(Cfg(server, [], existing=str(root)), tmp_path / "elsewhere")
    assert (linked / "val2017" / "1.jpg").exists()
    with pytest.raises(DownloadError, match="image folder missing"):
        prepare_coco(Cfg(server, [], existing=str(tmp_path / "nothing")), tmp_path / "x")


def test_repeated_failures_are_numbered_not_overwritten(server, tmp_path):
    """Each failed file is kept (.bad, .bad.1, .bad.2, ...), and the error says what a rerun
    does: it downloads again from scratch (before: the next failure overwrote .bad, and the
    message told to delete it "to download again", though a rerun downloads anyway)."""
    data = make_zip({"a": b"z" * 5000})
    arc = publish("/a.zip", data)
    messages = []
    for i in range(3):
        Handler.files["/a.zip"] = data[:-10] + f"{i:010d}".encode()  # a mirror serving broken bytes
        with pytest.raises(DownloadError, match="MD5") as e:
            fetch(f"{server}/a.zip", tmp_path / "a.zip", arc)
        messages.append(str(e.value))
    kept = [tmp_path / name for name in ("a.zip.part.bad", "a.zip.part.bad.1", "a.zip.part.bad.2")]
    assert [k.read_bytes()[-10:] for k in kept] == [f"{i:010d}".encode() for i in range(3)]
    for k, msg in zip(kept, messages):
        assert f"moved to {k}" in msg and "downloads the file again from scratch" in msg
        assert "delete it to download again" not in msg
    Handler.files["/a.zip"] = data
    assert fetch(f"{server}/a.zip", tmp_path / "a.zip", arc).read_bytes() == data
    assert all(k.exists() for k in kept) and Handler.requests[-1][1] is None  # from byte 0


def test_an_oversize_part_file_is_quarantined_before_any_request(server, tmp_path):
    """A .part longer than the archive (e.g. another file's bytes under its name) cannot be
    resumed: it is moved to .part.bad untouched, no request is sent, and the rerun downloads
    from byte 0."""
    data = make_zip({"a": b"k" * 3000})
    arc = publish("/a.zip", data)
    stale = b"s" * (len(data) + 7)
    (tmp_path / "a.zip.part").write_bytes(stale)
    with pytest.raises(DownloadError, match=f"partial file is {len(stale)} bytes, larger than the expected "
                                            f"{len(data)}") as e:
        fetch(f"{server}/a.zip", tmp_path / "a.zip", arc)
    assert Handler.requests == []
    assert (tmp_path / "a.zip.part.bad").read_bytes() == stale and not (tmp_path / "a.zip.part").exists()
    assert f"moved to {tmp_path / 'a.zip.part.bad'}" in str(e.value)
    assert fetch(f"{server}/a.zip", tmp_path / "a.zip", arc).read_bytes() == data
    assert Handler.requests == [("/a.zip", None)]


def crc_broken_zip() -> tuple[bytes, bytes]:
    """A stored (uncompressed) zip whose member bytes are changed after writing: the central
    directory is intact, only the member's CRC-32 no longer matches. Returns (good, broken)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as z:
        z.writestr("val2017/1.jpg", b"pixels" * 500)
    good = buf.getvalue()
    at = good.index(b"pixels" * 500) + 100
    broken = good[:at] + b"X" + good[at + 1:]
    return good, broken


def test_a_zip_crc_failure_is_quarantined_even_when_the_md5_matches(server, tmp_path):
    """The MD5 guards the transfer; the zip's CRCs guard what was published (an archive whose
    listed checksum is of corrupt bytes). testzip's failure moves it to .part.bad, names the
    member, and nothing is extracted."""
    good, broken = crc_broken_zip()
    assert len(good) == len(broken) and zipfile.ZipFile(io.BytesIO(broken)).namelist() == ["val2017/1.jpg"]
    arc = publish("/val2017.zip", broken)  # size and MD5 of the broken bytes: both checks pass
    with pytest.raises(DownloadError, match="zip member val2017/1.jpg fails its CRC check"):
        fetch(f"{server}/val2017.zip", tmp_path / "zips" / "val2017.zip", arc)
    assert (tmp_path / "zips" / "val2017.zip.part.bad").read_bytes() == broken
    assert not (tmp_path / "zips" / "val2017.zip").exists()
    with pytest.raises(DownloadError, match="CRC"):  # through prepare_coco: nothing reaches the root
        prepare_coco(Cfg(server, ["val2017"]), tmp_path / "coco", archives={"val2017": arc})
    assert sorted(p.name for p in (tmp_path / "coco").iterdir()) == ["zips"]


def two_part_zip(tmp_path):
    members = {"val2017/1.jpg": b"one" * 100, "val2017/2.jpg": b"two" * 100,
               "annotations/instances_val2017.json": b'{"images": []}'}
    path = tmp_path / "val2017.zip"
    path.write_bytes(make_zip(members))
    return path, members


def test_extraction_killed_while_unpacking_is_redone_cleanly(tmp_path):
    """A kill during extractall leaves .extract-<stem>/ with a truncated file and no marker;
    the rerun throws that folder away and unpacks again: every file whole, nothing stray, and
    annotations/ (already there from the other archive) merged, its file kept."""
    zip_path, members = two_part_zip(tmp_path)
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "instances_train2017.json").write_bytes(b"from the other archive")
    tmp = root / ".extract-val2017"
    (tmp / "val2017").mkdir(parents=True)
    (tmp / "val2017" / "1.jpg").write_bytes(b"on")  # cut short
    (tmp / "val2017" / "junk.tmp").write_bytes(b"?")  # not in the archive
    extract(zip_path, root)
    assert not tmp.exists() and (root / ".val2017.extracted").exists()
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) == \
        [".val2017.extracted", "annotations/instances_train2017.json", "annotations/instances_val2017.json",
         "val2017/1.jpg", "val2017/2.jpg"]
    for name, data in members.items():
        assert (root / name).read_bytes() == data, name
    assert (root / "annotations" / "instances_train2017.json").read_bytes() == b"from the other archive"


def test_extraction_killed_between_the_renames_is_completed_by_a_rerun(tmp_path, monkeypatch):
    """A kill after the first top-level entry was moved into place: annotations/ (or val2017/)
    is there, the other still in the temp folder, no marker. The rerun completes the layout
    and writes the marker; the entry already in place is kept (merged), not duplicated."""
    import os

    import effdetr.data.download as dl
    zip_path, members = two_part_zip(tmp_path)
    root = tmp_path / "coco"
    root.mkdir()
    real_replace, calls = os.replace, []

    class Killed(BaseException):
        """The process dies here (a BaseException, as KeyboardInterrupt: no handler catches it)."""

    def killed_after_one(src, dst):
        if calls:
            raise Killed(dst)
        calls.append(dst)
        return real_replace(src, dst)

    monkeypatch.setattr(dl.os, "replace", killed_after_one)
    with pytest.raises(Killed):
        extract(zip_path, root)
    monkeypatch.setattr(dl.os, "replace", real_replace)
    moved = {p.name for p in root.iterdir()} - {".extract-val2017"}
    assert len(moved) == 1 and not (root / ".val2017.extracted").exists()  # half done
    extract(zip_path, root)
    assert (root / ".val2017.extracted").exists() and not (root / ".extract-val2017").exists()
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) == \
        [".val2017.extracted", "annotations/instances_val2017.json", "val2017/1.jpg", "val2017/2.jpg"]
    for name, data in members.items():
        assert (root / name).read_bytes() == data, name
