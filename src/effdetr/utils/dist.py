"""torchrun (env://) data parallelism: the process group, the global batch's shards and the
few collectives training and evaluation need.

Without torchrun's environment (or with ``WORLD_SIZE=1``) no process group is created and
every helper here is the identity, so a single-process run takes exactly the code path and
the numbers it had before DDP existed. ``train.batch_size`` is per process: the global batch
is ``batch_size x world size``, and global step ``s`` is the same list of (index, seed) items
a one-process run with the global batch would take at step ``s``, split across the ranks in
rank order. Resuming at step ``s`` therefore replays the same global batches.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int


def launch_env() -> DistEnv | None:
    """torchrun's RANK/WORLD_SIZE/LOCAL_RANK, or None for a plain (or one-process) launch."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    return DistEnv(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", os.environ["RANK"])))


def init_from_env(device_type: str) -> DistEnv | None:
    """Join the torchrun process group (NCCL on CUDA, gloo on CPU); None when not launched by
    torchrun with more than one process. Idempotent (a second call reuses the group)."""
    env = launch_env()
    if env is None:
        return None
    if device_type == "cuda":
        torch.cuda.set_device(env.local_rank)
    if not tdist.is_initialized():
        tdist.init_process_group("nccl" if device_type == "cuda" else "gloo", init_method="env://")
    return env


def shutdown() -> None:
    if tdist.is_initialized():
        tdist.destroy_process_group()


def is_distributed() -> bool:
    return tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1


def world_size() -> int:
    return tdist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return tdist.get_rank() if is_distributed() else 0


def is_main() -> bool:
    """Rank 0, the only process that writes files, MLflow runs and progress lines."""
    return rank() == 0


def local_device(device: torch.device) -> torch.device:
    """This rank's GPU (torchrun's LOCAL_RANK) for a CUDA device; the CPU unchanged."""
    if device.type == "cuda" and is_distributed():
        return torch.device("cuda", torch.cuda.current_device())
    return device


def barrier() -> None:
    if is_distributed():
        tdist.barrier()


def mean_over_ranks(value: float, device: torch.device | None = None) -> float:
    """The mean of a per-rank number (DETR's ``num_boxes``: all-reduced, / world size)."""
    if not is_distributed():
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    tdist.all_reduce(t)
    return float(t.item()) / tdist.get_world_size()


def mean_tensor(t: torch.Tensor) -> torch.Tensor:
    """Element-wise mean of ``t`` over the ranks (a detached copy; ``t`` itself without DDP)."""
    if not is_distributed():
        return t
    t = t.detach().clone()
    tdist.all_reduce(t)
    return t / tdist.get_world_size()


def average_gradients(params) -> None:
    """All-reduce the gradients of parameters outside the DDP module (distillation adapters).

    A parameter with no gradient on some rank (unused by its share of the batch) counts as a
    zero there; one with no gradient on any rank keeps none, so the optimizer skips it exactly
    as a single process would. Every rank makes the same calls in the same order."""
    if not is_distributed():
        return
    params = list(params)
    if not params:
        return
    world = tdist.get_world_size()
    device = params[0].device
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=device)
    tdist.all_reduce(has, op=tdist.ReduceOp.MAX)
    for p, any_rank in zip(params, has.tolist()):
        if not any_rank:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        tdist.all_reduce(p.grad)
        p.grad /= world


def gather_to_main(obj) -> list | None:
    """Every rank's ``obj`` in rank order on rank 0 (None elsewhere); ``[obj]`` without a group."""
    if not is_distributed():
        return [obj]
    out = [None] * tdist.get_world_size() if is_main() else None
    tdist.gather_object(obj, out, dst=0)
    return out


def steps_per_epoch(n: int, batch_size: int, world: int) -> int:
    """Global steps in an epoch of ``n`` samples: a trailing global batch with fewer samples
    than ranks is dropped (a rank with no sample would hang the gradient all-reduce)."""
    gb = batch_size * world
    steps = -(-n // gb)
    if world > 1 and n % gb and n % gb < world:
        steps -= 1
    return steps


def shard(batch: list, rank_: int, world: int) -> list:
    """Rank ``rank_``'s contiguous share of one global batch: equal shares of a full batch, and
    shares differing by at most one of a short trailing one."""
    q, r = divmod(len(batch), world)
    start = rank_ * q + min(rank_, r)
    return batch[start:start + q + (rank_ < r)]


def eval_shard(n: int, batch_size: int, rank_: int, world: int) -> list[int]:
    """Rank ``rank_``'s images for a distributed evaluation: a contiguous run of the 1-process
    run's *whole* batches, so every batch -- and its padding to the batch's largest image,
    which changes the predictions -- is the one a single process would have made."""
    batches = [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]
    return [i for b in shard(batches, rank_, world) for i in b]


class ShardedBatches(torch.utils.data.Sampler):
    """Batch sampler over one epoch's (index, seed) items: global batches of ``batch_size x
    world`` items in stream order, each cut into the ranks' shares (world 1: plain batches)."""

    def __init__(self, items: list, batch_size: int, rank_: int = 0, world: int = 1):
        gb = batch_size * world
        # a global batch with fewer items than ranks is dropped: see steps_per_epoch
        self.batches = [shard(items[i:i + gb], rank_, world) for i in range(0, len(items), gb)
                        if len(items[i:i + gb]) >= world]

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)
