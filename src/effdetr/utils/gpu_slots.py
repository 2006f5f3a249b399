"""Pin a job to GPUs no other job on this machine holds, then run it.

Snakemake's ``gpu`` resource (the local-gpus profile) counts GPUs but does not say *which*
ones a job gets, so two 1-GPU jobs side by side would both run on ``cuda:0`` (and each
one's FPS would be measured on a shared GPU). ``effdetr gpus N -- CMD`` takes N per-GPU lock
files (``flock``, so a job killed outright frees its GPUs), sets ``CUDA_VISIBLE_DEVICES`` to
them and replaces itself with CMD, which inherits the locks and holds them until it exits.

Where a scheduler already chose the GPUs (inside a SLURM job, which confines it to its own) or
the user did (``CUDA_VISIBLE_DEVICES`` set), the job runs as it is and nothing is locked.
"""
from __future__ import annotations

import fcntl
import os
import sys
import tempfile
import time
from pathlib import Path

LOCK_DIR_ENV = "EFFDETR_GPU_LOCKS"
COUNT_ENV = "EFFDETR_GPU_COUNT"  # overrides the detected count (tests, a GPU left out on purpose)


def lock_dir() -> Path:
    """Per user (another user's jobs are not this Snakemake's to queue behind)."""
    return Path(os.environ.get(LOCK_DIR_ENV) or Path(tempfile.gettempdir()) / f"effdetr-gpus-{os.getuid()}")


def gpu_count() -> int:
    if os.environ.get(COUNT_ENV):
        return int(os.environ[COUNT_ENV])
    import torch
    return torch.cuda.device_count()


def try_acquire(n: int, count: int, where: Path) -> list[tuple[int, int]] | None:
    """``n`` (GPU index, locked fd) pairs, lowest free indices first, or None (nothing held)."""
    where.mkdir(parents=True, exist_ok=True)
    held: list[tuple[int, int]] = []
    for i in range(count):
        fd = os.open(where / f"gpu{i}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        held.append((i, fd))
        if len(held) == n:
            return held
    for _, fd in held:
        os.close(fd)
    return None


def acquire(n: int, count: int, where: Path, poll_s: float = 2.0, report_every_s: float = 300.0):
    """Wait until ``n`` of the ``count`` GPUs are free and lock them (see try_acquire)."""
    if n > count:
        raise ValueError(f"the stage asks for {n} GPU(s) but this machine has {count} "
                         f"(CUDA devices seen by torch; set {COUNT_ENV} to override)")
    start, last = time.time(), 0.0
    while (held := try_acquire(n, count, where)) is None:
        if time.time() - last >= report_every_s:
            print(f"[gpus] waiting for {n} free GPU(s) of {count} (locks in {where}; held by another "
                  f"job on this machine)", file=sys.stderr, flush=True)
            last = time.time()
        time.sleep(poll_s)
    if last:
        print(f"[gpus] got GPUs after {time.time() - start:.0f} s", file=sys.stderr, flush=True)
    return held


def run_pinned(n: int, cmd: list[str]) -> None:
    """Replace this process with ``cmd`` on ``n`` GPUs of its own (never returns)."""
    if not cmd:
        raise ValueError("effdetr gpus: no command given after --")
    if n < 0:
        raise ValueError(f"effdetr gpus: the GPU count {n} is negative")
    env = dict(os.environ)
    if n > 0 and "CUDA_VISIBLE_DEVICES" not in env and "SLURM_JOB_ID" not in env:
        held = acquire(n, gpu_count(), lock_dir())
        for _, fd in held:
            os.set_inheritable(fd, True)  # CMD keeps the locks for its lifetime
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i, _ in held)
    os.execvpe(cmd[0], cmd, env)
