"""Every image decoded once, before training samples it.

Otherwise a corrupt file, a size that disagrees with the JSON's width/height or an image
PIL refuses as a decompression bomb shows up only when the sampler first reaches it, up to
an epoch into training. :func:`verify_images` decodes a split's images in a process pool and
remembers each one that passed by (size, mtime_ns, width, height) in ``<root>.cache.json``,
so the next check decodes only what changed. No torch here: pool workers import this module.
"""
from __future__ import annotations

import os
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from PIL import Image

from .manifest import load_cache, save_cache

# modes that convert("RGB") keeps faithfully; 16-bit and float images would be clipped to 0..255
RGB_MODES = frozenset({"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr"})
MIN_POOL = 32  # below this many images a pool costs more to start than it saves


class ImageProblem(Exception):
    """Why an image cannot be used; callers add the annotation file and the image id."""


def _bomb(e: Exception) -> str:
    return f"refused as a possible decompression bomb ({e}); the limit is PIL's Image.MAX_IMAGE_PIXELS"


def open_rgb(path: str | Path) -> Image.Image:
    """The image as RGB, or :class:`ImageProblem` for an unreadable file or a decompression
    bomb (PIL only warns between MAX_IMAGE_PIXELS and twice that: the warning counts too)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as f:
                return f.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageProblem(_bomb(e)) from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageProblem(f"cannot read image ({e})") from None


def check_image(path: str, width: int, height: int, max_pixels: int | None) -> str | None:
    """None if the file decodes fully, in a mode RGB keeps, at the JSON's size; else why not."""
    Image.MAX_IMAGE_PIXELS = max_pixels  # a pool worker does not inherit the parent's setting
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as f:
                mode, size = f.mode, f.size
                f.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        return _bomb(e)
    except Exception as e:  # noqa: BLE001 - whatever the decoder raises, the file is at fault
        return f"cannot decode ({type(e).__name__}: {e})"
    if mode not in RGB_MODES:
        return f"mode {mode} does not convert to 8-bit RGB faithfully (use one of {', '.join(sorted(RGB_MODES))})"
    if size != (width, height):
        return f"is {size[1]}x{size[0]} (height x width) but the annotation says {height}x{width}"
    return None


def workers() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count() or 1
    return max(1, min(n, 8))


def _check_all(jobs: list[tuple], n_workers: int) -> list[str | None]:
    if n_workers <= 1 or len(jobs) < MIN_POOL:
        return [check_image(*j) for j in jobs]
    # the platform's default start method, as DataLoader workers use (fork on Linux: nothing is
    # re-imported, so this works from scripts without a __main__ guard too)
    with ProcessPoolExecutor(n_workers) as pool:
        return list(pool.map(check_image, *zip(*jobs), chunksize=max(1, len(jobs) // (n_workers * 16))))


def _key(root: Path, path: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def verify_images(root: str | Path, img_dir: str | Path, images: list[dict],
                  n_workers: int | None = None) -> tuple[list[tuple[dict, Path, str]], int]:
    """Decode every image entry of one split not verified unchanged before. Returns the
    failures as (image entry, path, problem) and how many images were decoded."""
    root, img_dir = Path(root), Path(img_dir)
    limit = Image.MAX_IMAGE_PIXELS
    seen = load_cache(root).get("verified")
    done = seen.get("images", {}) if isinstance(seen, dict) and seen.get("max_pixels") == limit else {}
    todo, failures = [], []
    for im in images:
        path = img_dir / im["file_name"]
        try:
            st = path.stat()
        except FileNotFoundError:
            failures.append((im, path, "does not exist"))
            continue
        stamp = [st.st_size, st.st_mtime_ns, im["width"], im["height"]]
        if done.get(_key(root, path)) != stamp:
            todo.append((path, stamp, im))
    problems = _check_all([(str(p), im["width"], im["height"], limit) for p, _, im in todo], n_workers or workers())
    passed = {}
    for (path, stamp, im), problem in zip(todo, problems):
        if problem is None:
            passed[_key(root, path)] = stamp
        else:
            failures.append((im, path, problem))
    if passed:  # re-read first: another stage may have verified other images meanwhile
        cache = load_cache(root)
        old = cache.get("verified")
        kept = old.get("images", {}) if isinstance(old, dict) and old.get("max_pixels") == limit else {}
        cache["verified"] = {"max_pixels": limit, "images": {**kept, **passed}}
        save_cache(root, cache)
    return failures, len(todo)
