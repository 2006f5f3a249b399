"""The data manifest: what a dataset root held when the stages that read it last ran.

Workflow engines see a dataset as a folder: Snakemake compares the folder's timestamp only,
and a resumable training run keyed by params and code alone "resumes" its finished state
after the annotations or images were edited in place, writing the old weights. The
manifest, ``<root>.manifest.json``, records per split the SHA-256 of the annotation file
and every image file's size and mtime, hashed into one ``digest``; every stage that reads
the data depends on it and training keys its resumable state by the digest. It lies beside
the root, not inside it, because a ``data.coco.existing`` copy is a symlink to a folder
that may be read-only. It is rewritten only when that content changes, so its mtime moves
only on a real edit. Annotation hashes are cached by (size, mtime_ns) in
``<root>.cache.json`` (a cache, no stage's dep; safe to delete), so a refresh costs one
stat per file. No torch here: Snakemake calls :func:`refresh_if_present` while parsing.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .download import sha256sum

SPLITS = ("train", "val")
FORMAT = 1


class DataChanged(ValueError):
    """The data under a root no longer matches its manifest."""


def layout(kind: str, root: str | Path, split: str) -> tuple[Path, Path]:
    """(image folder, annotation file) of a split for either dataset kind."""
    root = Path(root)
    if kind == "coco":
        return root / f"{split}2017", root / "annotations" / f"instances_{split}2017.json"
    return root / "images" / split, root / "annotations" / f"instances_{split}.json"


def available_splits(kind: str, root: str | Path) -> list[str]:
    """Splits with both an annotation file and an image folder (an eval-only COCO copy has val alone)."""
    return [s for s in SPLITS if layout(kind, root, s)[0].is_dir() and layout(kind, root, s)[1].is_file()]


def _beside(root: str | Path, suffix: str) -> Path:
    root = Path(root)
    return root.with_name(root.name + suffix)


def manifest_path(root: str | Path) -> Path:
    return _beside(root, ".manifest.json")


def cache_path(root: str | Path) -> Path:
    return _beside(root, ".cache.json")


def read_json(path: Path) -> dict | None:
    """The parsed file, or None when it is missing or unreadable (then it is rebuilt)."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def write_json(path: Path, obj: dict) -> None:
    """Atomic (temp file + rename; the pid keeps concurrent writers apart); a failed write
    (full disk, read-only folder) leaves no temp file behind."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(obj, sort_keys=True, separators=(",", ":")) + "\n", encoding="utf-8")
        tmp.replace(path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


def load_cache(root: str | Path) -> dict:
    return read_json(cache_path(root)) or {}


def save_cache(root: str | Path, cache: dict) -> None:
    """Best effort: a cache that cannot be written only costs time on the next check."""
    try:
        write_json(cache_path(root), cache)
    except OSError:
        pass


def _files(folder: Path) -> dict[str, list[int]]:
    """{relative posix name: [size, mtime_ns]} of every file below folder (dotfiles skipped)."""
    out, stack = {}, [(folder, "")]
    while stack:
        here, prefix = stack.pop()
        try:
            entries = list(os.scandir(here))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for e in entries:
            if e.name.startswith("."):
                continue
            if e.is_dir():
                stack.append((Path(e.path), f"{prefix}{e.name}/"))
            elif e.is_file():
                st = e.stat()
                out[prefix + e.name] = [st.st_size, st.st_mtime_ns]
    return dict(sorted(out.items()))


def scan(kind: str, root: str | Path) -> dict:
    """The manifest the data under root has now: stats every file, hashes changed annotations."""
    root = Path(root)
    cache = load_cache(root)
    hashes = cache.setdefault("annotations", {})
    dirty = False
    splits = {}
    for split in SPLITS:
        img_dir, ann = layout(kind, root, split)
        rel = ann.relative_to(root).as_posix()
        entry = None
        try:
            st = ann.stat()
        except FileNotFoundError:
            st = None
        if st is not None:
            stamp = [st.st_size, st.st_mtime_ns]
            cached = hashes.get(rel)
            if not (isinstance(cached, list) and len(cached) == 3 and cached[:2] == stamp):
                hashes[rel], dirty = stamp + [sha256sum(ann)], True
            entry = {"file": rel, "sha256": hashes[rel][2]}
        splits[split] = {"annotations": entry, "images_dir": img_dir.relative_to(root).as_posix(),
                         "images": _files(img_dir)}
    if dirty:
        save_cache(root, cache)
    body = {"format": FORMAT, "dataset": kind, "splits": splits}
    digest = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    return {"digest": digest, **body}


def split_digest(manifest: dict, split: str) -> str:
    """Digest of one split's entry: training is keyed by the train split alone, so fixing a
    val annotation does not make a finished training start over."""
    entry = manifest["splits"][split]
    return hashlib.sha256(json.dumps(entry, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def changes(old: dict, new: dict, limit: int = 5) -> list[str]:
    """What differs between two manifests, file by file (the first ``limit``, then a count)."""
    out = []
    if old.get("dataset") != new["dataset"]:
        out.append(f"dataset kind {old.get('dataset')} -> {new['dataset']}")
    for split, cur in new["splits"].items():
        prev = (old.get("splits") or {}).get(split) or {}
        a, b = prev.get("annotations"), cur["annotations"]
        if a != b:
            what = "added" if a is None else "removed" if b is None else "content changed"
            out.append(f"{(b or a)['file']} ({what})")
        before, now = prev.get("images") or {}, cur["images"]
        for name in sorted(set(before) | set(now)):
            if before.get(name) != now.get(name):
                what = "added" if name not in before else "removed" if name not in now else "size/mtime changed"
                out.append(f"{cur['images_dir']}/{name} ({what})")
    if len(out) > limit:
        out = out[:limit] + [f"{len(out) - limit} more"]
    return out


def refresh(kind: str, root: str | Path) -> list[str]:
    """Rewrite the manifest if the data changed; returns what changed ([] = untouched)."""
    current, path = scan(kind, root), manifest_path(root)
    recorded = read_json(path)
    if recorded == current:
        return []
    write_json(path, current)
    return changes(recorded, current) if recorded else ["no manifest yet: first record"]


def refresh_if_present(kind: str, root: str | Path) -> list[str]:
    """At DAG parse time: an in-place edit moves the manifest's mtime, so the stages that read
    the data rerun. A root not made yet is the data stage's job."""
    return refresh(kind, root) if Path(root).is_dir() else []


def require_current(kind: str, root: str | Path) -> dict:
    """The data's manifest as it is now, after checking it matches the one on disk (a missing
    manifest is written: nothing recorded can disagree). Raises :class:`DataChanged` naming the files."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no dataset here (make it with `effdetr data synth|coco --out {root}`)")
    current, path = scan(kind, root), manifest_path(root)
    recorded = read_json(path)
    if recorded is None:
        write_json(path, current)
        print(f"[data] {path}: written (there was none)")
    elif recorded.get("digest") != current["digest"]:
        raise DataChanged(
            f"{root} changed since {path} was written: {'; '.join(changes(recorded, current))}. "
            f"Record it with `effdetr data manifest --out {root}` (rerunning the DAG does that too), then "
            f"rerun: every stage that reads this data reruns and training starts over instead of resuming")
    return current
