"""Reproducibility helpers: seeds, RNG state capture, git provenance, environment."""
from __future__ import annotations

import os
import platform
import random
import subprocess

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def git_info(cwd: str | None = None) -> dict:
    """{'sha', 'dirty'}; sha 'unknown' outside a git checkout. Dirty means tracked files
    differ from HEAD *other than the pipeline's own outputs* (reports/, dvc.lock), which
    every DAG run rewrites -- otherwise every stage after the first report write is dirty."""
    def run(*args):
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
    try:
        sha = run("rev-parse", "HEAD")
        if sha.returncode != 0:
            return {"sha": "unknown", "dirty": True}
        dirty = run("status", "--porcelain", "--untracked-files=no", "--", ".",
                    ":(exclude)reports", ":(exclude)dvc.lock").stdout.strip() != ""
        return {"sha": sha.stdout.strip(), "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"sha": "unknown", "dirty": True}


def source_hash(root=None) -> str:
    """Hash of the package's Python sources: resumable state is only valid for the code
    that wrote it (a rerun after a code edit must start over, not resume)."""
    import hashlib
    from pathlib import Path
    root = Path(root) if root is not None else Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        h.update(str(f.relative_to(root)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


def files_hash(paths) -> str:
    """Content hash of input weight files (backbone, init, teacher): a retrained teacher
    must not let a student resume state distilled from the old one."""
    import hashlib
    h = hashlib.sha256()
    for p in paths:
        if p:
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()[:8]


def environment() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "host": platform.node(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
            "threads": torch.get_num_threads(), "pid": os.getpid()}


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA device is available")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
