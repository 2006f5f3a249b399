"""Atomic checkpoint files: write to a temporary name in the same folder, then rename."""
from __future__ import annotations

import os
from pathlib import Path

import torch


def save_atomic(obj, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    torch.save(obj, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: str | Path, trusted: bool = False) -> dict:
    """Load a checkpoint; errors name the file. ``trusted`` allows pickled RNG state."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=not trusted)
    except Exception as e:  # noqa: BLE001 - re-raised with the file name
        raise ValueError(f"{path}: not a readable effdetr checkpoint ({type(e).__name__}: {e})") from None


def load_model_checkpoint(path: str | Path) -> dict:
    """A final model file: {'model': state_dict, 'model_config': dict, ...}; checked keys."""
    ckpt = load_checkpoint(path)
    for key in ("model", "model_config"):
        if key not in ckpt:
            raise ValueError(f"{path}: checkpoint field '{key}' is missing (not an effdetr model file?)")
    return ckpt
