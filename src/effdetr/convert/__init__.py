"""Released checkpoints of the official repositories -> effdetr model files.

Each format module maps an official ``ckpt["model"]`` state dict onto effdetr's parameter
names (``mapping.StrictMapping``); loading is strict, so every tensor is accounted for.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where a checkpoint is read: params validation reads
    from torch import nn  # the releases table of this package and must not pay for torch


def load_official(path: str | Path) -> dict:
    """An official checkpoint file, read without running pickled code: tensors, plain
    containers and the ``argparse.Namespace`` of training args the official main.py saves."""
    import torch
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the file name
        raise ValueError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path}: expected a dict with a 'model' state dict, got {type(ckpt).__name__}")
    return ckpt


def convert_official(ckpt: dict, fmt: str, model: nn.Module, file: str | Path, model_cfg) -> dict:
    """``ckpt`` in the official layout of ``fmt`` -> ``model``'s state dict (strict), built
    from ``model_cfg``; configurations no official model has are refused first."""
    if fmt == "detr":
        from .detr import convert_detr, detr_mapping
        detr_mapping(model_cfg)  # refuses e.g. a stride-8 trunk whose tensors would still fit
        return convert_detr(ckpt, model, str(file))
    if fmt in ("deformable_detr", "sparse_detr"):
        from .deformable import convert_deformable
        if model_cfg.arch != "deformable":
            raise ValueError(f"{file}: {fmt} checkpoints load into model.arch 'deformable', not {model_cfg.arch!r}")
        return convert_deformable(ckpt, model, str(file), fmt, model_cfg)
    raise ValueError(f"unknown checkpoint format {fmt!r}")
