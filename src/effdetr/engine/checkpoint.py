"""Atomic checkpoint files: write to a temporary name in the same folder, then rename.

Loaded weights are checked to be finite: a NaN model would otherwise train or evaluate
to the end and only show up as AP 0 (or a box-ops assert far from its cause).
"""
from __future__ import annotations

import errno
import os
from pathlib import Path

import torch

from ..utils.process import pid_alive


class NonFiniteError(ValueError):
    """A tensor holds NaN/Inf (a ValueError, so the CLI reports it as an error)."""


class DiskFullError(RuntimeError):
    """A save ran out of disk space; the previous file at that path was kept."""


def first_nonfinite(obj, prefix: str = "") -> str | None:
    """Key (dotted path) of the first floating tensor in ``obj`` with a NaN/Inf, or None.

    Walks nested dicts/lists/tuples, so optimizer state dicts are covered too; integer
    tensors (step counts, RNG states) cannot be non-finite and are skipped."""
    if isinstance(obj, torch.Tensor):
        if (obj.is_floating_point() or obj.is_complex()) and not bool(torch.isfinite(obj).all()):
            return prefix or "<tensor>"
        return None
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return None
    for k, v in items:
        bad = first_nonfinite(v, f"{prefix}.{k}" if prefix else str(k))
        if bad is not None:
            return bad
    return None


def check_finite(obj, where: str | Path, what: str = "") -> None:
    """Raise :class:`NonFiniteError` naming ``where`` and the first non-finite tensor."""
    bad = first_nonfinite(obj, what)
    if bad is not None:
        raise NonFiniteError(f"{where}: tensor '{bad}' has NaN/Inf values")


def _is_disk_full(e: BaseException) -> bool:
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return True
    # torch's zip writer reports a short write as "enforce fail at inline_container.cc ... unexpected pos"
    return isinstance(e, RuntimeError) and ("unexpected pos" in str(e) or "No space left" in str(e))


def remove_stale_temps(path: Path) -> None:
    """Delete ``.<name>.tmp.<pid>`` files that a killed writer of ``path`` left behind.

    Only those whose pid is not a live process (or is ours: we are about to rewrite it)
    are removed, so a concurrent writer's file on this host is never pulled from under it.
    On a shared file system a writer on another host is not visible here; its dead temp
    files stay (harmless) until a save from a host where the pid is free."""
    prefix = f".{path.name}.tmp."
    for tmp in path.parent.glob(f"{prefix}*"):
        pid = tmp.name[len(prefix):]
        if pid.isdigit() and (int(pid) == os.getpid() or not pid_alive(int(pid))):
            tmp.unlink(missing_ok=True)


def save_atomic(obj, path: str | Path, previous: str | Path | None = None) -> None:
    """``torch.save`` to a temporary file, fsync, then rename over ``path``: a crash or a
    full disk never leaves a truncated ``path``. With ``previous``, the old ``path`` is
    renamed to it first (after the new file is safely written), so two good copies exist.

    A full disk raises :class:`DiskFullError` ("no space left on ...") with the old file
    untouched and the temporary file removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        torch.save(obj, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if _is_disk_full(e):
            kept = f"; the previous {path.name} is unchanged" if path.exists() else ""
            raise DiskFullError(f"no space left on {path.parent} to write {path}{kept}") from e
        raise
    if previous is not None and path.exists():
        _keep_as_previous(path, Path(previous))
    os.replace(tmp, path)


def _keep_as_previous(path: Path, previous: Path) -> None:
    """Make ``previous`` a second name of the current ``path`` (hard link, then rename), so a
    kill at any moment still leaves a complete ``path``; file systems without hard links
    fall back to a rename (a kill right then leaves ``previous`` only, which resume accepts)."""
    link = previous.with_name(f".{previous.name}.tmp.{os.getpid()}")
    link.unlink(missing_ok=True)
    try:
        os.link(path, link)
    except OSError:
        os.replace(path, previous)
        return
    os.replace(link, previous)


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
    """A final model file: {'model': state_dict, 'model_config': dict, ...}; checked keys
    and finite weights (a NaN model would otherwise evaluate to AP 0 without an error)."""
    ckpt = load_checkpoint(path)
    for key in ("model", "model_config"):
        if not isinstance(ckpt, dict) or key not in ckpt:
            raise ValueError(f"{path}: checkpoint field '{key}' is missing (not an effdetr model file?)")
    check_finite(ckpt["model"], path, "model")
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
