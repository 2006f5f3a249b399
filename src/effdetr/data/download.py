"""COCO 2017: resumable, verified download and atomic extraction (or checking a local copy).

Each archive goes to ``<name>.zip.part``; an interrupted transfer resumes with an HTTP
Range request. Only after the size, then the MD5, then the zip's own CRCs check out is the
file renamed to ``<name>.zip``. A file that fails a check is renamed ``*.bad`` (``*.bad.1``,
``*.bad.2``, ... on later failures: kept, never overwritten or deleted) and the error names it
with expected vs. found values; a rerun downloads it again from scratch. Extraction goes to a
temporary folder beside the target and is moved into place with renames.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Archive:
    path: str  # path under base_url
    size: int
    md5: str


COCO2017 = {
    "train2017": Archive("zips/train2017.zip", 19_336_861_798, "cced6f7f71b7629ddf16f17bbcfab6b2"),
    "val2017": Archive("zips/val2017.zip", 815_585_330, "442b8da7639aecaf257c1dceb8ba8c80"),
    "annotations_trainval2017": Archive("annotations/annotations_trainval2017.zip", 252_907_541,
                                        "f4bbac642086de4f52a3fdda2de5fa2c"),
}
CHUNK = 1 << 20


class DownloadError(RuntimeError):
    pass


def file_digest(path: Path, algorithm: str) -> str:
    """Hex digest of a file, read in chunks (archives and checkpoints are large)."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def md5sum(path: Path) -> str:
    return file_digest(path, "md5")


def sha256sum(path: Path) -> str:
    return file_digest(path, "sha256")


def _quarantine(path: Path, why: str) -> DownloadError:
    """Move a failed file aside as ``.bad``, ``.bad.1``, ``.bad.2``, ...: a repeated failure
    (e.g. a mirror serving a broken file) must not overwrite the evidence of the first."""
    bad, n = path.with_name(path.name + ".bad"), 0
    while bad.exists():
        n += 1
        bad = path.with_name(f"{path.name}.bad.{n}")
    os.replace(path, bad)
    return DownloadError(f"{path}: {why}; moved to {bad}, kept for inspection (delete it when done). "
                         f"A rerun downloads the file again from scratch")


def _transfer(url: str, part: Path, size: int | None, timeout: float) -> None:
    """Append the rest of ``url`` to ``part`` (HTTP Range from its current length)."""
    have = part.stat().st_size if part.exists() else 0
    if size is not None and have > size:
        raise _quarantine(part, f"partial file is {have} bytes, larger than the expected {size}")
    if size is not None and have == size:
        return
    req = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            if have and resp.status == 416 and size is None:
                return  # already complete: nothing left in range
            if have and resp.status != 206:
                print(f"[download] {url}: server ignored the range request; restarting")
                have = 0
            length = resp.headers.get("Content-Length")
            expected = size if size is not None else (have + int(length) if length else None)
            with open(part, "ab" if have else "wb") as f:
                while block := resp.read(CHUNK):
                    f.write(block)
            got = part.stat().st_size
            if expected is not None and got < expected:  # the connection closed early
                raise DownloadError(f"{url}: transfer truncated at {got} of {expected} bytes (the connection closed); "
                                    f"rerun to resume from {part}")
    except urllib.error.HTTPError as e:
        if have and e.code == 416 and size is None:
            return
        raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        got = part.stat().st_size if part.exists() else 0
        raise DownloadError(f"{url}: transfer failed after {got} of {size or '?'} bytes ({e}); "
                            f"rerun to resume from {part}") from None


def fetch(url: str, dest: Path, archive: Archive, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest`` (resuming ``dest.part``) and verify it. Idempotent."""
    dest = Path(dest)
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    _transfer(url, part, archive.size, timeout)
    size = part.stat().st_size
    if size != archive.size:
        if size < archive.size:
            raise DownloadError(f"{part}: size {size} bytes, expected {archive.size} (truncated); rerun to resume")
        raise _quarantine(part, f"size {size} bytes, expected {archive.size}")
    digest = md5sum(part)
    if digest != archive.md5:
        raise _quarantine(part, f"MD5 {digest}, expected {archive.md5}")
    try:
        with zipfile.ZipFile(part) as z:
            broken = z.testzip()
    except zipfile.BadZipFile as e:
        raise _quarantine(part, f"not a valid zip ({e})") from None
    if broken is not None:
        raise _quarantine(part, f"zip member {broken} fails its CRC check")
    os.replace(part, dest)
    return dest


def fetch_checked(url: str, dest: Path, sha256: str | None = None, size: int | None = None,
                  timeout: float = 60.0) -> Path:
    """A single file (a released checkpoint): resumable download to ``dest.part``; the size
    and the SHA-256 (or its prefix, as torch.hub file names carry) are checked where known,
    then the file is renamed into place. A failing file is kept as ``*.bad`` (numbered, never overwritten)."""
    dest = Path(dest)
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    _transfer(url, part, size, timeout)
    got = part.stat().st_size
    if size is not None and got != size:
        if got < size:
            raise DownloadError(f"{part}: size {got} bytes, expected {size} (truncated); rerun to resume")
        raise _quarantine(part, f"size {got} bytes, expected {size}")
    if sha256:
        digest = sha256sum(part)
        if not digest.startswith(sha256.lower()):
            raise _quarantine(part, f"SHA-256 {digest}, expected {sha256}{'...' if len(sha256) < 64 else ''}")
    os.replace(part, dest)
    return dest


def extract(zip_path: Path, root: Path) -> None:
    """Unpack into a temp folder under root, then rename each top-level entry into place."""
    marker = root / f".{zip_path.stem}.extracted"
    if marker.exists():
        return
    tmp = root / f".extract-{zip_path.stem}"
    if tmp.exists():
        shutil.rmtree(tmp)
    with zipfile.ZipFile(zip_path) as z:
        z.extractall(tmp)
    for entry in tmp.iterdir():
        target = root / entry.name
        if target.exists():
            if entry.is_dir():  # e.g. annotations/ shared by several archives: merge files
                for f in entry.rglob("*"):
                    dst = target / f.relative_to(entry)
                    if f.is_file() and not dst.exists():
                        dst.parent.mkdir(parents=True, exist_ok=True)
                        os.replace(f, dst)
            continue
        os.replace(entry, target)
    shutil.rmtree(tmp)
    marker.write_text("ok\n")


def check_layout(root: Path, splits: tuple[str, ...] = ("train", "val")) -> None:
    """An existing/extracted copy must have the folders and annotation files we read."""
    from .coco import load_annotations
    for split in splits:
        img_dir, ann = root / f"{split}2017", root / "annotations" / f"instances_{split}2017.json"
        if not img_dir.is_dir():
            raise DownloadError(f"{img_dir}: image folder missing (data.coco.existing = {root})")
        load_annotations(ann, img_dir)


def prepare_coco(cfg, root: str | Path, archives: dict[str, Archive] = COCO2017) -> Path:
    """Download + verify + extract the configured splits into root, or check cfg.existing."""
    root = Path(root)
    if cfg.existing:
        src = Path(cfg.existing)
        # eval-only targets (released checkpoints) need val2017 + annotations alone, about 1 GB
        check_layout(src, ("train", "val") if "train2017" in cfg.splits else ("val",))
        root.parent.mkdir(parents=True, exist_ok=True)
        if not root.exists():
            root.symlink_to(src.resolve(), target_is_directory=True)
        return root
    for name in cfg.splits:
        if name not in archives:
            raise DownloadError(f"data.coco.splits: unknown archive '{name}' (known: {', '.join(archives)})")
        arc = archives[name]
        url = f"{cfg.base_url.rstrip('/')}/{arc.path}"
        zip_path = fetch(url, root / "zips" / Path(arc.path).name, arc)
        extract(zip_path, root)
    return root
