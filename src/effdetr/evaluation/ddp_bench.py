"""What data parallelism costs, measured side by side in one run (`effdetr bench ddp`).

``procs``: 2-process torchrun (gloo on CPU, NCCL on GPUs) vs 1-process training throughput at
the same global batch: the same ``effdetr train`` command twice on a copy of a params file,
images per second of the training loop read from each run's epoch time (model building,
data checks and process start-up are excluded, so the figure is the step cost alone).

``step``: one device, one training step with random weights, plain vs wrapped in DDP (a
one-process group), fp32 and bf16: the wrapper's own overhead, on a paper-scale model.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml

from ..utils.dist import steps_per_epoch
from ..utils.records import history_path


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
    from .step_bench import train_stage_weights
    raw = yaml.safe_load(Path(params).read_text())
    b = raw["profiles"][raw["profile"]]["train"]["batch_size"]
    # the weights its train stage starts from (pre-trained backbone, init, teacher), where the
    # DAG has made them; without a backbone file the run starts from random weights
    weights = {flag: str(Path(f).resolve()) for flag, f in train_stage_weights(Path(params), experiment).items()
               if Path(f).exists()}
    backbone = raw["profiles"][raw["profile"]].setdefault("model", {}).setdefault("backbone", {})
    if "--backbone" not in weights:
        backbone["pretrained"] = "none"
    # several processes need frozen batch norm (train refuses per-process batch statistics);
    # both runs use it, so they time the same model
    backbone["freeze_bn"] = True
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
                          "--work-root", str(scratch / "work")] + [x for kv in weights.items() for x in kv]
            r = subprocess.run(cmd, cwd=scratch, env=env, capture_output=True, text=True, check=False)
            if r.returncode != 0:
                raise RuntimeError(f"{label} benchmark run failed ({' '.join(cmd)}):\n{r.stdout[-1500:]}\n{r.stderr[-3000:]}")
            hist = json.loads(history_path(scratch / label / "m.json").read_text())
            seconds = sum(e["epoch_seconds"] for e in hist)
            # every epoch the run trained (an experiment's own schedule may keep more than one)
            steps = len(hist) * min(iters, steps_per_epoch(_train_images(p, experiment, data), batch, procs))
            results[label] = {"processes": procs, "batch_per_process": batch, "global_batch": b * nproc,
                              "steps": steps, "loop_s": seconds, "images_per_s": steps * b * nproc / seconds}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {"experiment": experiment, "params": str(params), "results": results,
            "speedup": results["ddp"]["images_per_s"] / results["single"]["images_per_s"]}


def _random_batch(cfg, batch: int, device, gen: torch.Generator):
    """``batch`` images at the profile's eval size (val_scale x max_size, the largest a
    training batch pads to) with a few random boxes each: random weights need no data."""
    h, w = cfg.input.val_scale, cfg.input.max_size
    images = torch.randn(batch, 3, h, w, generator=gen).to(device)
    masks = torch.zeros(batch, h, w, dtype=torch.bool, device=device)
    targets = []
    for _ in range(batch):
        n = 6
        cxcy = torch.rand(n, 2, generator=gen) * 0.6 + 0.2
        wh = torch.rand(n, 2, generator=gen) * 0.3 + 0.05
        targets.append({"labels": torch.randint(0, cfg.model.num_classes, (n,), generator=gen).to(device),
                        "boxes": torch.cat([cxcy, wh], 1).to(device)})
    return images, masks, targets


def _one_process_group(device: torch.device, scratch: Path) -> None:
    """A world-1 group (NCCL on CUDA, gloo on the CPU), so DDP's wrapper and its bucketed
    gradient all-reduce run exactly as on each rank of a real launch."""
    import torch.distributed as tdist
    tdist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                             init_method=f"file://{scratch / 'store'}", rank=0, world_size=1)


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_step_benchmark(params: Path, experiment: str, profile: str | None = None, device: str = "cuda",
                       batch: int | None = None, warmup: int = 3, iters: int = 10,
                       precisions: tuple[str, ...] = ("fp32", "bf16")) -> dict:
    """One training step (forward, loss, backward, AdamW) of ``experiment`` with random weights
    on random images: plain, and wrapped in DDP in a one-process group, for each precision.
    The ratio is DDP's own overhead on one device (gradient buckets, the all-reduce call).
    Also returns each variant's first-step loss and gradient norm: the same weights and batch
    must give the same numbers with and without the wrapper."""
    import time

    import torch.distributed as tdist

    from ..config import experiment_config
    from ..models import build_model
    from ..models.criterion import build_criterion
    raw = yaml.safe_load(Path(params).read_text())
    if profile:
        raw["profile"] = profile
    scratch = Path(tempfile.mkdtemp(prefix="effdetr-step-bench-"))
    try:
        p = scratch / "params.yaml"
        p.write_text(yaml.safe_dump(raw))
        cfg = experiment_config(p, experiment)[0]
        # random weights: never download pretrained ones
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(
            cfg.model, backbone=dataclasses.replace(cfg.model.backbone, pretrained="none")))
        dev = torch.device(device)
        b = batch or cfg.train.batch_size
        num_aux = cfg.model.dec_layers - 1 if cfg.model.aux_loss else 0
        _one_process_group(dev, scratch)
        results = {}
        try:
            for precision in precisions:
                for wrapped in (False, True):
                    torch.manual_seed(0)
                    model = build_model(cfg.model).to(dev).train()
                    criterion = build_criterion(cfg.model, cfg.loss).to(dev)
                    net = model
                    if wrapped:
                        net = torch.nn.parallel.DistributedDataParallel(
                            model, device_ids=[dev.index or 0] if dev.type == "cuda" else None,
                            find_unused_parameters=getattr(model, "ddp_find_unused_parameters", False))
                    groups = [g for g in model.param_groups(cfg.train.lr, cfg.train.lr_backbone,
                                                            cfg.train.weight_decay) if g["params"]]
                    opt = torch.optim.AdamW(groups, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
                    images, masks, targets = _random_batch(cfg, b, dev, torch.Generator().manual_seed(1))
                    times, first = [], None
                    for i in range(warmup + iters):
                        _sync(dev)
                        t0 = time.perf_counter()
                        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                            out = net(images, masks)
                        loss = criterion.total(criterion(out, targets), num_aux)
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        if first is None:
                            norm = torch.sqrt(sum((q.grad.double() ** 2).sum() for q in model.parameters()
                                                  if q.grad is not None))
                            first = {"loss": float(loss.item()), "grad_norm": float(norm.item())}
                        opt.step()
                        _sync(dev)
                        if i >= warmup:
                            times.append(time.perf_counter() - t0)
                    times.sort()
                    results[f"{'ddp' if wrapped else 'plain'}_{precision}"] = {
                        "median_ms": 1000 * times[len(times) // 2], "min_ms": 1000 * times[0],
                        "images_per_s": b / times[len(times) // 2], "first_step": first}
                    del net, model, opt
        finally:
            tdist.destroy_process_group()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    return {"experiment": experiment, "profile": raw["profile"], "device": name, "batch": b,
            "image_size": [cfg.input.val_scale, cfg.input.max_size], "warmup": warmup, "iters": iters,
            "results": results,
            "ddp_over_plain": {pr: results[f"ddp_{pr}"]["median_ms"] / results[f"plain_{pr}"]["median_ms"]
                               for pr in precisions}}
