"""Where a released checkpoint comes from, and how it is checked (data: releases.yaml)."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import yaml

RELEASES_FILE = Path(__file__).with_name("releases.yaml")
FORMATS = ("detr", "deformable_detr", "sparse_detr")


@lru_cache(maxsize=1)
def releases() -> dict[str, dict]:
    return yaml.safe_load(RELEASES_FILE.read_text())


def _recorded_sums(path: Path) -> dict[str, str]:
    if not path.exists():
        return {}
    return {name: digest for digest, name in (line.split(maxsplit=1) for line in path.read_text().splitlines()
                                              if line.strip())}


def resolve_source(spec, releases_dir: str | Path) -> tuple[Path, str]:
    """The local file of an experiment's ``import_checkpoint`` and its SHA-256: its ``file``
    when given, else the release downloaded (resumable, verified) into ``releases_dir``. A
    release file is checked on every use, also one put there by hand: against the published
    prefix, or against the digest pinned on first use in ``releases_dir/SHA256SUMS``."""
    from ..data.download import DownloadError, fetch_checked, sha256sum
    if spec.file:
        path = Path(spec.file)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: checkpoint not found (import_checkpoint.file)")
        return path, sha256sum(path)
    rel = releases()[spec.release]
    releases_dir = Path(releases_dir)
    dest = releases_dir / rel["file"]
    if not dest.exists() and rel.get("manual"):
        raise FileNotFoundError(f"{dest}: release {spec.release!r} must be downloaded by hand from {rel['url']} "
                                f"({rel['source']}); put it there or set import_checkpoint.file")
    fetch_checked(rel["url"], dest, rel.get("sha256"), rel.get("size"))
    digest = sha256sum(dest)
    if rel.get("sha256"):
        if not digest.startswith(rel["sha256"]):
            raise DownloadError(f"{dest}: SHA-256 {digest} does not start with the published {rel['sha256']} "
                                f"(release {spec.release!r}); delete it to download again")
        return dest, digest
    sums_file = releases_dir / "SHA256SUMS"
    sums = _recorded_sums(sums_file)
    if rel["file"] in sums and sums[rel["file"]] != digest:
        raise DownloadError(f"{dest}: SHA-256 {digest} differs from the one recorded on first download in "
                            f"{sums_file} ({sums[rel['file']]}); the file changed")
    if rel["file"] not in sums:
        with open(sums_file, "a") as f:
            f.write(f"{digest}  {rel['file']}\n")
    return dest, digest
