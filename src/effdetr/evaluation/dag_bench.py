"""Benchmark of the whole workflow on a small params file (default: the test suite's tiny
profile): a cold `snakemake all` in a scratch checkout, then the up-to-date dry run.

The test suite checks what the DAG produces, never how long it takes (shared machines);
this prints the figures instead, so a slowdown shows up as a number, not a red CI run.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_FILES = ("workflow", ".dvcignore")


def _snakemake(args: list[str], cwd: Path, cores: int, env: dict) -> tuple[float, str]:
    exe = Path(sys.executable).parent / "snakemake"
    t0 = time.perf_counter()
    r = subprocess.run([str(exe), "--snakefile", "workflow/Snakefile", "--cores", str(cores), *args],
                       cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"snakemake {' '.join(args)} failed in {cwd} ({r.returncode}):\n{r.stderr[-3000:]}")
    return seconds, r.stdout + r.stderr


def run_dag_benchmark(repo: Path, params: Path, cores: int, keep: bool = False) -> dict:
    """Seconds for a cold full run and for the following no-op dry run, and the job count."""
    repo, params = Path(repo).resolve(), Path(params).resolve()
    if not params.is_file():
        raise FileNotFoundError(f"{params}: params file not found")
    scratch = Path(tempfile.mkdtemp(prefix="effdetr-bench-dag-"))
    try:
        for name in REPO_FILES:
            src = repo / name
            (shutil.copytree if src.is_dir() else shutil.copy)(src, scratch / name)
        shutil.copy(params, scratch / "params.yaml")
        (scratch / "src").symlink_to(repo / "src")
        env = os.environ | {"MLFLOW_TRACKING_URI": f"sqlite:///{scratch}/mlruns/mlflow.db",
                            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        full, log = _snakemake(["all"], scratch, cores, env)
        done = [line for line in log.splitlines() if "steps (100%) done" in line]
        jobs = int(done[-1].split(" of ")[1].split()[0]) if done else None
        dry, _ = _snakemake(["-n", "all"], scratch, cores, env)
        return {"params": str(params), "cores": cores, "jobs": jobs, "full_run_s": full, "dry_run_s": dry,
                "scratch": str(scratch) if keep else None}
    finally:
        if not keep:
            shutil.rmtree(scratch, ignore_errors=True)
