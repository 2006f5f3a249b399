"""Where a training step's time goes (`effdetr bench step --experiment NAME`).

Builds the experiment exactly as its train stage does (the stage table's --backbone, --init
and --teacher files; a missing one is replaced by random weights, and the result says so),
takes its real training batches, and times a few warm steps of :class:`TrainStep` phase by
phase: wall time and process CPU time (all threads of this process), so a run at N threads
shows what the extra threads cost. Data loading is timed apart, per batch.

Nothing is written: the weights are trained in memory and dropped. The figures are
machine- and load-dependent; compare two code versions by running both side by side.
"""
from __future__ import annotations

import contextlib
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

PHASES = ("forward", "teacher", "loss", "backward", "optimizer")


class PhaseTimer:
    """Accumulates wall and CPU seconds per phase name (the ``phase`` hook of TrainStep)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.wall: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def __call__(self, name: str):
        self._sync()
        w, c = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self._sync()
            self.wall[name] += time.perf_counter() - w
            self.cpu[name] += time.process_time() - c


def train_stage_weights(params: Path, experiment: str) -> dict[str, str]:
    """The train stage's weight inputs, {"--backbone" | "--init" | "--teacher": path}: what `bench
    step` and `bench ddp` start from, as the DAG's training does."""
    from ..stages import build_stages, load_raw, stage_command
    stages = {s.name: s for s in build_stages(load_raw(str(params)), str(params))}
    stage = stages.get(f"train_{experiment}")
    if stage is None:
        raise ValueError(f"{params}: experiment '{experiment}' has no train stage in this profile")
    cmd = stage_command(stage.cmd)
    return {flag: cmd[i + 1] for i, flag in enumerate(cmd[:-1]) if flag in ("--backbone", "--init", "--teacher")}


def _random_teacher(params: Path, exp, scratch: Path) -> str:
    """A teacher file with random weights, built from the teacher experiment's own config."""
    import dataclasses

    from ..config import experiment_config
    from ..models import build_model
    tcfg = experiment_config(params, exp.distill.teacher)[0]
    torch.manual_seed(0)
    out = scratch / "teacher.pt"
    torch.save({"model": build_model(tcfg.model).state_dict(), "model_config": dataclasses.asdict(tcfg.model)}, out)
    return str(out)


def run_step_bench(params: Path, experiment: str, data: str | None = None, warmup: int = 2, iters: int = 8,
                   threads: int | None = None, batch: int | None = None) -> dict:
    """Per-phase wall/CPU milliseconds per step (mean over ``iters`` steps after ``warmup``)."""
    import dataclasses

    from ..config import experiment_config
    from ..data.coco import collate
    from ..engine.step import TrainStep
    from ..engine.train import EpochSampler, SeededSamples, build_parts, train_dataset
    from ..utils.repro import resolve_device, seed_everything

    cfg, exp = experiment_config(params, experiment)
    if batch:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=batch))
    t = cfg.train
    n_threads = threads or t.threads or torch.get_num_threads()
    torch.set_num_threads(n_threads)
    device = resolve_device(t.device)
    root = data or cfg.data.root
    files = train_stage_weights(params, experiment)
    substituted = []
    with tempfile.TemporaryDirectory(prefix="effdetr-step-bench-") as tmp:
        for flag in list(files):
            if not Path(files[flag]).exists():
                substituted.append(f"{flag} {files[flag]} (missing: random weights)")
                if flag == "--teacher":
                    files[flag] = _random_teacher(params, exp, Path(tmp))
                else:
                    del files[flag]
        if "--backbone" not in files and not files.get("--init") and cfg.model.backbone.pretrained == "pipeline":
            cfg = dataclasses.replace(cfg, model=dataclasses.replace(
                cfg.model, backbone=dataclasses.replace(cfg.model.backbone, pretrained="none")))
        seed_everything(t.seed)
        dataset = train_dataset(cfg, root)
        model, criterion, teacher, distiller, optimizer = build_parts(
            cfg, device, backbone_weights=files.get("--backbone"), init=files.get("--init"),
            teacher=files.get("--teacher"), distill_cfg=exp.distill)
    model.train()
    num_aux = cfg.model.dec_layers - 1 if cfg.model.aux_loss else 0
    step = TrainStep(model, model, criterion, optimizer, num_aux, t.clip_max_norm,
                     t.amp and device.type == "cuda", device, distiller=distiller, teacher=teacher)
    items = EpochSampler(len(dataset), t.seed, 0).items
    samples = SeededSamples(dataset)
    timer, load_s = PhaseTimer(device), 0.0
    b = t.batch_size
    for i in range(warmup + iters):
        t0 = time.perf_counter()
        images, masks, targets = collate([samples[it] for it in items[i * b:(i + 1) * b]])
        images, masks = images.to(device), masks.to(device)
        targets = [{k: v.to(device) for k, v in tg.items()} for tg in targets]
        if i == warmup:
            timer, load_s = PhaseTimer(device), 0.0
        load_s += time.perf_counter() - t0
        step.run(images, masks, targets, 0, i, phase=timer)
    phases = {p: {"wall_ms": 1000 * timer.wall[p] / iters, "cpu_ms": 1000 * timer.cpu[p] / iters}
              for p in PHASES if p in timer.wall}
    step_wall = sum(v["wall_ms"] for v in phases.values())
    step_cpu = sum(v["cpu_ms"] for v in phases.values())
    return {"experiment": experiment, "params": str(params), "device": str(device), "threads": n_threads,
            "batch": b, "warmup": warmup, "iters": iters, "phases": phases,
            "step_wall_ms": step_wall, "step_cpu_ms": step_cpu, "images_per_s": 1000 * b / step_wall,
            "data_ms_per_batch": 1000 * load_s / iters, "substituted": substituted,
            "torch": torch.__version__}


def format_result(r: dict) -> str:
    head = (f"[bench step] {r['experiment']} on {r['device']}, {r['threads']} thread(s), batch {r['batch']}, "
            f"{r['iters']} steps after {r['warmup']} warm-up")
    rows = [f"  {'phase':<10} {'wall ms':>9} {'cpu ms':>9}"]
    for p, v in r["phases"].items():
        rows.append(f"  {p:<10} {v['wall_ms']:9.1f} {v['cpu_ms']:9.1f}")
    rows.append(f"  {'step':<10} {r['step_wall_ms']:9.1f} {r['step_cpu_ms']:9.1f}   "
                f"{r['images_per_s']:.1f} img/s; data {r['data_ms_per_batch']:.1f} ms/batch")
    rows += [f"  note: {s}" for s in r["substituted"]]
    return "\n".join([head] + rows)


def _tree_of(rev: str, dest: Path) -> Path:
    """``src/`` of git revision ``rev`` extracted under ``dest`` (no checkout is touched)."""
    import io
    import subprocess
    import tarfile
    top = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True, check=True).stdout.strip()
    blob = subprocess.run(["git", "-C", top, "archive", rev, "src"], capture_output=True, check=False)
    if blob.returncode != 0:
        raise ValueError(f"bench step --baseline {rev}: not a revision of {top} ({blob.stderr.decode().strip()})")
    with tarfile.open(fileobj=io.BytesIO(blob.stdout)) as tar:
        tar.extractall(dest, filter="data")
    if not (dest / "src/effdetr/evaluation/step_bench.py").exists():
        raise ValueError(f"bench step --baseline {rev}: that revision has no `effdetr bench step`; compare "
                         "against a revision that has it (the one that added it, or later)")
    return dest / "src"


def compare(params: Path, experiments: list[str], baseline: str, data: str | None = None, rounds: int = 2,
            warmup: int = 2, iters: int = 8, threads: int | None = None) -> dict:
    """The step of each experiment under ``baseline``'s code and this checkout's, in alternating
    subprocesses (``rounds`` each, the same params and data), so load drifts hit both alike.
    Ratios are baseline / current of the median CPU ms per step (> 1: the current code is cheaper)."""
    import json
    import os
    import statistics
    import subprocess
    import sys
    here = Path(__file__).resolve().parents[2]
    out: dict = {"baseline": baseline, "params": str(params), "rounds": rounds, "experiments": {}}
    with tempfile.TemporaryDirectory(prefix="effdetr-step-baseline-") as tmp:
        trees = {"baseline": _tree_of(baseline, Path(tmp)), "current": here}
        for exp in experiments:
            runs = {"baseline": [], "current": []}
            for _ in range(rounds):
                for label, src in trees.items():
                    res = Path(tmp) / f"{exp}-{label}.json"
                    cmd = [sys.executable, "-m", "effdetr.cli", "bench", "step", "--experiment", exp, "--params",
                           str(params), "--warmup", str(warmup), "--repeats", str(iters), "--out", str(res)]
                    cmd += ["--data", data] if data else []
                    cmd += ["--threads", str(threads)] if threads else []
                    r = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": str(src)}, capture_output=True, text=True)
                    if r.returncode != 0:
                        raise RuntimeError(f"bench step of {exp} under the {label} code failed:\n{r.stderr[-2000:]}")
                    runs[label].append(json.loads(res.read_text()))
            med = {label: {k: statistics.median(r[k] for r in rs) for k in ("step_cpu_ms", "step_wall_ms", "images_per_s")}
                   for label, rs in runs.items()}
            out["experiments"][exp] = {**med, "cpu_ratio": med["baseline"]["step_cpu_ms"] / med["current"]["step_cpu_ms"],
                                       "phases": {label: rs[-1]["phases"] for label, rs in runs.items()},
                                       "threads": runs["current"][-1]["threads"], "batch": runs["current"][-1]["batch"]}
    return out


def format_compare(r: dict) -> str:
    rows = [f"[bench step] {r['baseline']} -> this checkout, median of {r['rounds']} alternating runs each",
            f"  {'experiment':<34} {'base cpu ms':>11} {'now cpu ms':>10} {'ratio':>6} {'base img/s':>10} {'now img/s':>9}"]
    for exp, v in r["experiments"].items():
        rows.append(f"  {exp:<34} {v['baseline']['step_cpu_ms']:11.1f} {v['current']['step_cpu_ms']:10.1f} "
                    f"{v['cpu_ratio']:6.2f} {v['baseline']['images_per_s']:10.1f} {v['current']['images_per_s']:9.1f}")
    return "\n".join(rows)
