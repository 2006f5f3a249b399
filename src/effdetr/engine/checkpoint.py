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


def load_compatible_checkpoint(path: str | Path, model_cfg=None):
    """(checkpoint, config to build): ``model_cfg`` (an experiment's ModelConfig, e.g. with
    ACT kernels) after checking it has the checkpoint's architecture, or the stored config;
    errors name the file and the first differing field."""
    import dataclasses

    from ..config import ModelConfig, architecture, build, first_difference
    ckpt = load_model_checkpoint(path)
    stored = build(ModelConfig, ckpt["model_config"], path, "model_config")
    if model_cfg is None:
        return ckpt, stored
    diff = first_difference(architecture(dataclasses.asdict(model_cfg)), architecture(dataclasses.asdict(stored)))
    if diff:
        key, a, b = diff
        raise ValueError(f"{path}: model_config.{key} is {b!r} but the experiment needs {a!r} "
                         "(this checkpoint was trained with another architecture)")
    return ckpt, model_cfg


def build_trained_model(path: str | Path, model_cfg=None):
    """The model stored in ``path``, built from ``model_cfg`` when given (see
    :func:`load_compatible_checkpoint`) with the checkpoint's weights."""
    import dataclasses

    from ..models import build_model
    ckpt, model_cfg = load_compatible_checkpoint(path, model_cfg)
    model_cfg = dataclasses.replace(model_cfg, backbone=dataclasses.replace(model_cfg.backbone, pretrained="none"))
    model = build_model(model_cfg)
    missing, unexpected = model.load_state_dict(ckpt["model"], strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: model weights do not fit model_config "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model, ckpt
