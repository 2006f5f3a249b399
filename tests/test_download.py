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
