"""Fail before compute: the data a command reads matches its manifest, its annotations pass
their checks and every image was decoded once (effdetr.data.images), not first met mid-epoch."""
from __future__ import annotations

from pathlib import Path

from .coco import AnnotationError, load_annotations, split_paths
from .images import verify_images
from .manifest import require_current, split_digest

SHOWN = 10  # failing images quoted in one error


def verify_splits(cfg, root: str | Path, splits) -> dict[str, dict]:
    """Annotation and image checks of ``splits``; an error names the file and each image id."""
    out = {}
    for split in splits:
        img_dir, ann = split_paths(cfg.data, split, root)
        data = load_annotations(ann, img_dir, cfg.model.num_classes)
        failures, decoded = verify_images(root, img_dir, data["images"])
        if failures:
            lines = [f"images[id={im['id']}] {path}: {why}" for im, path, why in failures[:SHOWN]]
            if len(failures) > SHOWN:
                lines.append(f"... and {len(failures) - SHOWN} more")
            raise AnnotationError(ann, "images", f"{len(failures)} of {len(data['images'])} images cannot be "
                                  "used:\n  " + "\n  ".join(lines))
        out[split] = {"annotations": str(ann), "images": len(data["images"]), "decoded": decoded,
                      "boxes": len(data["_kept"]), "dropped": data["_dropped"]}
    return out


def check_data(cfg, root: str | Path, splits=("train", "val")) -> dict[str, str]:
    """Everything above for the splits a command reads; returns {split: digest of its files}."""
    current = require_current(cfg.data.dataset, root)
    verify_splits(cfg, root, splits)
    return {split: split_digest(current, split) for split in splits}
