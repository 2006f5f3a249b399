"""Training loop with exact resume.

Resumable state (model, optimizer, epoch, iteration, RNG states, running meters) lives in
``work_dir/last.pt`` -- outside anything Snakemake/DVC declare, so a killed job's rerun
picks it up. ``work_dir`` is keyed by the params hash and the package source hash (see
cli.cmd_train), so neither a params edit nor a code edit resumes a stale run. The snapshot
before it is kept as ``work_dir/prev.pt``: a ``last.pt`` that cannot be read or holds
NaN/Inf is moved aside (``last.pt.bad-<n>``) and the run resumes from ``prev.pt``.
Augmentation randomness is seeded per sample from (seed, epoch, position), and
the shuffle order from (seed, epoch), so skipping the first k batches of an epoch after a
restart reproduces exactly what an uninterrupted run would have seen (bitwise on CPU).

Under torchrun (see utils.dist) each rank trains its share of every global batch
(``batch_size x world size``) in a DistributedDataParallel wrapper; rank 0 alone writes the
state, the model and the progress lines. The state records the world size and every rank's
RNG state: it resumes only at the world size that wrote it (the global batches would differ).
"""
from __future__ import annotations

import dataclasses
import random
import re
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..data.coco import CocoDetection, collate, split_paths
from ..data.transforms import build_transforms
from ..models import build_model
from ..models.backbone import load_backbone_weights
from ..models.criterion import build_criterion
from ..utils import dist
from ..utils.progress import Progress, format_epoch
from ..utils.repro import resolve_device, rng_state, seed_everything, set_rng_state
from .checkpoint import (
    build_trained_model,
    check_finite,
    first_nonfinite,
    load_checkpoint,
    load_compatible_checkpoint,
    save_atomic,
)
from .step import TrainingDiverged, TrainStep

STATE_KEYS = ("model", "optimizer", "epoch", "iter", "step", "history", "meters", "rng")


def _read_state(path: Path) -> dict:
    """A resumable state file, or ValueError naming it (unreadable, incomplete, non-finite)."""
    st = load_checkpoint(path, trusted=True)
    missing = [k for k in STATE_KEYS if not isinstance(st, dict) or k not in st]
    if missing:
        raise ValueError(f"{path}: not a complete resumable state (missing {missing})")
    for key in ("model", "optimizer", "distiller"):
        check_finite(st.get(key, {}), path, key)
    return st


def _move_aside(path: Path) -> Path:
    n = 1
    while path.with_name(f"{path.name}.bad-{n}").exists():
        n += 1
    bad = path.with_name(f"{path.name}.bad-{n}")
    path.rename(bad)
    return bad


def load_resumable(work: Path) -> tuple[dict | None, Path | None]:
    """(state, its file) from ``work/last.pt``, else the older ``work/prev.pt``; (None, None)
    for a fresh run. A bad ``last.pt`` is kept as ``last.pt.bad-<n>`` (never deleted, for
    inspection) with a warning; if no snapshot is good the error names both files."""
    last, prev = work / "last.pt", work / "prev.pt"
    if not last.exists() and not prev.exists():
        return None, None
    problems = []
    for path in (last, prev):
        try:
            st = _read_state(path)
        except FileNotFoundError:  # no last.pt: killed between the two renames of a snapshot
            problems.append(f"{path} is missing")
            continue
        except ValueError as e:
            problems.append(str(e))
            continue
        if path == prev and last.exists():
            bad = _move_aside(last)
            print(f"[train] warning: {problems[0]}\n[train] warning: moved it to {bad}; resuming from "
                  f"the older snapshot {prev} instead", file=sys.stderr, flush=True)
        return st, path
    raise RuntimeError(f"cannot resume: {problems[0]}; and the older snapshot: {problems[1]}. "
                       f"Move {last} and {prev} aside to start this run over")


def _load_resumable_ranked(work: Path) -> tuple[dict | None, Path | None]:
    """:func:`load_resumable` on rank 0 first (it may move a bad ``last.pt`` aside), then on
    the other ranks, which then read the same snapshot."""
    if dist.world_size() == 1:
        return load_resumable(work)
    found = load_resumable(work) if dist.is_main() else None
    dist.barrier()
    return found if dist.is_main() else load_resumable(work)


class SeededSamples(Dataset):
    """Wraps a dataset; items are requested as (index, seed) so augmentation is replayable."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, item):
        index, seed = item
        random.seed(seed)
        torch.manual_seed(seed)
        return self.dataset[index]


class EpochSampler(Sampler):
    """The (index, seed) stream of one epoch, starting after ``skip`` samples."""

    def __init__(self, n: int, seed: int, epoch: int, skip: int = 0):
        g = torch.Generator().manual_seed(seed * 100003 + epoch)
        order = torch.randperm(n, generator=g).tolist()
        self.items = [(idx, seed * 1000003 + epoch * 10007 + pos) for pos, idx in enumerate(order)][skip:]

    def __iter__(self):
        return iter(self.items)

    def __len__(self):
        return len(self.items)


def lr_factor(cfg, epoch: int, step: int) -> float:
    """Linear warm-up over ``warmup_iters`` global steps, x0.1 from epoch ``lr_drop``."""
    warm = min(1.0, (step + 1) / cfg.warmup_iters) if cfg.warmup_iters else 1.0
    return warm * (0.1 if epoch >= cfg.lr_drop else 1.0)


VAL_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def validate(model, dataset, device, cfg, epoch: int) -> dict:
    """COCO AP on the val split in the middle of training (every rank takes part under DDP;
    rank 0 gets the numbers). The model is back in training mode afterwards, and the global
    RNG is untouched, so the run trains exactly as without it."""
    from .evaluate import evaluate_dataset
    model.eval()
    stats = evaluate_dataset(model, dataset, device, cfg.eval.batch_size, 0, cfg.data.area_ranges,
                             amp=cfg.eval.amp, generator=torch.Generator().manual_seed(epoch))
    model.train()
    if stats is None:  # another rank's share
        return {}
    return {f"val_{k}": stats[k] for k in VAL_KEYS if k in stats}


def train_dataset(cfg, data_root: str) -> CocoDetection:
    """The train split with its training transforms; ValueError naming the annotation file
    when it has nothing to train on."""
    img_dir, ann = split_paths(cfg.data, "train", data_root)
    dataset = CocoDetection(img_dir, ann, build_transforms(cfg.input, train=True), cfg.model.num_classes)
    if dataset.dropped:
        print(f"[data] {ann}: dropped {dataset.dropped} boxes with no area inside their image")
    # an empty split would "train" zero steps and write an untrained model
    if not len(dataset):
        raise ValueError(f"{ann}: the train split has no images")
    if not any(not a.get("iscrowd", 0) for im in dataset.images for a in dataset.by_image.get(im["id"], ())):
        raise ValueError(f"{ann}: the train split has no usable annotations (every box is crowd, "
                         "dropped or absent): nothing to train on")
    return dataset


def build_parts(cfg, device, model_builder=build_model, backbone_weights: str | None = None,
                init: str | None = None, teacher: str | None = None, distill_cfg=None):
    """The model (initialised as the run asks), criterion, frozen teacher and distiller (None
    without distillation) and AdamW over the parameter groups, all on ``device``."""
    t = cfg.train
    model = model_builder(cfg.model)
    if init:
        # weights only: the ACT student keeps its own (parameter-free) kernels
        model.load_state_dict(load_compatible_checkpoint(init, cfg.model)[0]["model"])
    elif cfg.model.backbone.pretrained == "pipeline":
        if not backbone_weights:
            raise ValueError("model.backbone.pretrained is 'pipeline' but no --backbone weights were given")
        load_backbone_weights(model.backbone.body, backbone_weights)
    if t.lr_backbone == 0:  # DETR's rule: no backbone LR means a frozen backbone
        model.backbone.requires_grad_(False)
    model.to(device)
    criterion = build_criterion(cfg.model, cfg.loss).to(device)
    teacher_model, distiller = None, None
    if distill_cfg is not None:
        if not teacher:
            raise ValueError("distillation is configured but no --teacher model file was given")
        from ..distill import build_distiller  # distillation's code is only its stages'
        teacher_model = build_trained_model(teacher)[0].to(device).eval().requires_grad_(False)
        distiller = build_distiller(distill_cfg, teacher_model, model).to(device)
    groups = [g for g in model.param_groups(t.lr, t.lr_backbone, t.weight_decay) if g["params"]]
    if distiller is not None and any(True for _ in distiller.parameters()):  # adaptation layers (training only)
        groups.append({"params": list(distiller.parameters()), "lr": t.lr, "weight_decay": t.weight_decay})
    optimizer = torch.optim.AdamW(groups, lr=t.lr, weight_decay=t.weight_decay)
    return model, criterion, teacher_model, distiller, optimizer


def train(cfg, data_root: str, out_path: str, work_dir: str, phash: str, run=None,
          model_builder=build_model, backbone_weights: str | None = None, init: str | None = None,
          teacher: str | None = None, distill_cfg=None, val_dataset=None) -> dict:
    """Train ``cfg`` (a ProfileConfig); returns the final epoch's metrics.

    ``backbone_weights``: the pretrain stage's file, for ``backbone.pretrained: pipeline``.
    ``init``: a trained model file whose weights this run starts from (same architecture).
    ``teacher`` + ``distill_cfg``: a frozen teacher model file and how to distil it.
    ``val_dataset``: evaluated every ``train.val_every`` epochs (val_AP, ... in the history).
    """
    t = cfg.train
    device = dist.local_device(resolve_device(t.device))
    world, rank = dist.world_size(), dist.rank()
    seed_everything(t.seed)  # the same initial weights on every rank
    dataset = train_dataset(cfg, data_root)
    model, criterion, teacher_model, distiller, optimizer = build_parts(
        cfg, device, model_builder, backbone_weights, init, teacher, distill_cfg)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    iters_per_epoch = dist.steps_per_epoch(len(dataset), t.batch_size, world)
    if t.max_iters_per_epoch:
        iters_per_epoch = min(iters_per_epoch, t.max_iters_per_epoch)

    work = Path(work_dir)
    state_path = work / "last.pt"
    start_epoch, start_iter, step, history, meters = 0, 0, 0, [], {}
    trained_s = 0.0
    st, resumed_from = _load_resumable_ranked(work)
    if world > 1:
        seed_everything(t.seed + 1000003 * rank)  # each rank its own dropout stream
    if st is not None:
        if st.get("params_hash") != phash:
            raise RuntimeError(f"{resumed_from}: written for params hash {st.get('params_hash')}, not {phash}")
        if st.get("world_size", 1) != world:
            raise RuntimeError(f"{resumed_from}: written by a run of {st.get('world_size', 1)} process(es), this "
                               f"one has {world}: its global batches (batch_size x processes) would differ. "
                               f"Rerun with {st.get('world_size', 1)} processes, or move {work} aside to start over")
        model.load_state_dict(st["model"])
        if distiller is not None:
            distiller.load_state_dict(st.get("distiller", {}))
        optimizer.load_state_dict(st["optimizer"])
        start_epoch, start_iter, step = st["epoch"], st["iter"], st["step"]
        history, meters = st["history"], st["meters"]
        trained_s = st.get("trained_seconds", 0.0)
        set_rng_state(st["rng_ranks"][rank] if world > 1 else st["rng"])
        if dist.is_main():
            print(f"[train] resuming from {resumed_from}: epoch {start_epoch} iter {start_iter}")
    resumed = f" (resumed from {resumed_from})" if resumed_from else ""
    segment_start = time.time()

    def trained_seconds() -> float:
        """This run's training time so far, the sessions before a resume included (up to their
        last snapshot: the work after it is redone, and counted, once)."""
        return trained_s + time.time() - segment_start

    def check_weights(where):
        """Never snapshot or write non-finite weights: they would replace the last good state."""
        for name, sd in (("model", model.state_dict()), ("optimizer", optimizer.state_dict()),
                         ("distiller", distiller.state_dict() if distiller is not None else {})):
            bad = first_nonfinite(sd, name)
            if bad is not None:
                raise TrainingDiverged(f"training diverged{resumed}: tensor '{bad}' has NaN/Inf values "
                                       f"{where}; not writing it")

    def snapshot(epoch, it):
        check_weights(f"before writing {state_path}")
        rngs = dist.gather_to_main(rng_state())  # a collective: every rank snapshots at the same step
        if dist.is_main():
            extra = {"world_size": world, "rng_ranks": rngs} if world > 1 else {}
            save_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                         "distiller": distiller.state_dict() if distiller is not None else {},
                         "iter": it, "step": step, "history": history, "meters": meters, "rng": rngs[0],
                         "trained_seconds": trained_seconds(),
                         "params_hash": phash, **extra}, state_path, previous=work / "prev.pt")

    num_aux = cfg.model.dec_layers - 1 if cfg.model.aux_loss else 0
    progress = Progress(t.log_every_s)
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=getattr(model, "ddp_find_unused_parameters", False))
    amp = t.amp and device.type == "cuda"
    stepper = TrainStep(net, model, criterion, optimizer, num_aux, t.clip_max_norm, amp, device,
                        distiller=distiller, teacher=teacher_model, where=resumed)
    for epoch in range(start_epoch, t.epochs):
        skip = start_iter * t.batch_size * world if epoch == start_epoch else 0
        batches = dist.ShardedBatches(EpochSampler(len(dataset), t.seed, epoch, skip).items, t.batch_size,
                                      rank, world)
        # The loader's own generator: its iterator draws a base seed at creation, which from the
        # global RNG would shift the dropout stream of a run resumed mid-epoch (not bitwise).
        loader = DataLoader(SeededSamples(dataset), batch_sampler=batches,
                            num_workers=t.num_workers, collate_fn=collate,
                            generator=torch.Generator().manual_seed(t.seed * 100003 + epoch))
        model.train()
        t_epoch, seen = time.time(), 0
        it = start_iter if epoch == start_epoch else 0
        if dist.is_main():
            progress.start_epoch(epoch, it, iters_per_epoch)
        if it == 0:
            meters = {}
        for images, masks, targets in loader:
            if it >= iters_per_epoch:
                break
            for g, base in zip(optimizer.param_groups, base_lrs):
                g["lr"] = base * lr_factor(t, epoch, step)
            images, masks = images.to(device), masks.to(device)
            targets = [{k: v.to(device) for k, v in tg.items()} for tg in targets]
            total_g, losses_g = stepper.run(images, masks, targets, epoch, it)
            it += 1
            step += 1
            seen += len(images) * world
            for k, v in [("loss", total_g.item())] + [(k, v.item()) for k, v in losses_g.items()
                                                      if not re.search(r"_\d+$", k)]:
                s, n = meters.get(k, (0.0, 0))
                meters[k] = (s + v, n + 1)
            if dist.is_main():
                progress.update(it, total_g.item(), optimizer.param_groups[0]["lr"],
                                seen / max(time.time() - t_epoch, 1e-9))
            if it % t.checkpoint_every_iters == 0 and it < iters_per_epoch:
                snapshot(epoch, it)
        epoch_metrics = {f"train_{k}": s / max(n, 1) for k, (s, n) in meters.items()}
        epoch_metrics.update(epoch=epoch, lr=optimizer.param_groups[0]["lr"], epoch_seconds=time.time() - t_epoch)
        if val_dataset is not None and t.val_every and ((epoch + 1) % t.val_every == 0 or epoch + 1 == t.epochs):
            epoch_metrics.update(validate(model, val_dataset, device, cfg, epoch))
        history.append(epoch_metrics)
        if dist.is_main():
            progress.close()
            print(f"[train] epoch {epoch}: {format_epoch(epoch_metrics)}", flush=True)
        if run is not None:
            run.log_metrics({k: v for k, v in epoch_metrics.items() if k != "epoch"}, step=epoch)
        start_iter, meters = 0, {}
        snapshot(epoch + 1, 0)

    check_weights(f"before writing the final model {out_path}")
    if dist.is_main():
        save_atomic({"model": model.state_dict(), "model_config": dataclasses.asdict(cfg.model),
                     "params_hash": phash, "epochs": t.epochs}, out_path)
    return {"final": history[-1] if history else {}, "history": history, "train_seconds": trained_seconds()}
