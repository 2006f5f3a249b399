"""2-process torchrun (gloo on CPU, NCCL on GPUs) vs 1-process training throughput at the
same global batch: the same ``effdetr train`` command twice on a copy of a params file,
images per second of the training loop read from each run's epoch time (model building,
data checks and process start-up are excluded, so the figure is the step cost alone)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from ..utils.dist import steps_per_epoch


def _variant(raw: dict, batch: int, iters: int) -> dict:
    raw = json.loads(json.dumps(raw))
    t = raw["profiles"][raw["profile"]]["train"]
    t.update(batch_size=batch, epochs=1, max_iters_per_epoch=iters, checkpoint_every_iters=10 ** 6)
    return raw


def _train_images(params: Path, experiment: str, data: Path) -> int:
    from ..config import experiment_config
    from ..data.coco import split_paths
    ann = split_paths(experiment_config(params, experiment)[0].data, "train", str(data))[1]
    return len(json.loads(Path(ann).read_text())["images"])


def run_ddp_benchmark(params: Path, experiment: str, data: Path, nproc: int = 2, iters: int = 6) -> dict:
    """Train ``iters`` steps at global batch ``batch_size x nproc``: once in ``nproc`` processes,
    once in one; returns images/s of each and their ratio. Runs in a scratch folder (its own
    MLflow store and work root), so it never resumes or touches a real run."""
    raw = yaml.safe_load(Path(params).read_text())
    b = raw["profiles"][raw["profile"]]["train"]["batch_size"]
    bindir = Path(sys.executable).parent
    scratch = Path(tempfile.mkdtemp(prefix="effdetr-ddp-bench-"))
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{scratch}/mlruns/mlflow.db"}
    results = {}
    try:
        for label, procs, batch in (("ddp", nproc, b), ("single", 1, b * nproc)):
            p = scratch / f"{label}.yaml"
            p.write_text(yaml.safe_dump(_variant(raw, batch, iters)))
            head = ([str(bindir / "torchrun"), "--standalone", f"--nproc_per_node={procs}", "-m", "effdetr.cli"]
                    if procs > 1 else [str(bindir / "effdetr")])
            cmd = head + ["train", "--params", str(p), "--experiment", experiment, "--data", str(Path(data).resolve()),
                          "--out", str(scratch / label / "model.pt"), "--metrics", str(scratch / label / "m.json"),
                          "--work-root", str(scratch / "work")]
            r = subprocess.run(cmd, cwd=scratch, env=env, capture_output=True, text=True, check=False)
            if r.returncode != 0:
                raise RuntimeError(f"{label} benchmark run failed ({' '.join(cmd)}):\n{r.stderr[-2000:]}")
            hist = json.loads((scratch / label / "m.json").read_text())["history"]
            seconds = sum(e["epoch_seconds"] for e in hist)
            steps = min(iters, steps_per_epoch(_train_images(p, experiment, data), batch, procs))
            results[label] = {"processes": procs, "batch_per_process": batch, "global_batch": b * nproc,
                              "steps": steps, "loop_s": seconds, "images_per_s": steps * b * nproc / seconds}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {"experiment": experiment, "params": str(params), "results": results,
            "speedup": results["ddp"]["images_per_s"] / results["single"]["images_per_s"]}
