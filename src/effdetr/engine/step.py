"""One optimisation step of any experiment, split into the phases a profile reads.

``effdetr train`` and ``effdetr bench step`` call the same :meth:`TrainStep.run`, so the
benchmark times exactly what the DAG trains. The phases, in the order they run: ``forward``
(the student), ``loss`` (criterion and distillation terms, Hungarian matching included;
timed as one phase), ``teacher`` (a distillation run's frozen teacher, run between the
criterion and the distillation terms, as training always has), ``backward`` and ``optimizer`` (gradient
all-reduce of adapters, clipping, AdamW). ``phase`` is a context-manager factory called with
each name; the default does nothing, so training pays nothing for the split.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch

from ..utils import dist


def _no_phase(name: str):
    return contextlib.nullcontext()


class TrainingDiverged(RuntimeError):
    """NaN/Inf loss or weights during training (a RuntimeError: the CLI reports it)."""


@dataclass
class TrainStep:
    net: torch.nn.Module  # the module called: the model, or its DDP wrapper
    model: torch.nn.Module
    criterion: torch.nn.Module
    optimizer: torch.optim.Optimizer
    num_aux: int
    clip_max_norm: float
    amp: bool
    device: torch.device
    distiller: torch.nn.Module | None = None
    teacher: torch.nn.Module | None = None
    where: str = ""  # appended to a divergence message (e.g. " (resumed from ...)")

    def run(self, images, masks, targets, epoch: int = 0, it: int = 0,
            phase: Callable[[str], contextlib.AbstractContextManager] = _no_phase):
        """One step on a batch already on the device; returns the global batch's (total, losses)
        (rank means under DDP), detached. Raises TrainingDiverged on a non-finite loss, before
        the weights change."""
        dev = self.device.type
        with phase("forward"), torch.autocast(dev, dtype=torch.bfloat16, enabled=self.amp):
            outputs = self.net(images, masks)
        with phase("loss"):
            losses = self.criterion(outputs, targets)
            total = self.criterion.total(losses, self.num_aux)
        if self.distiller is not None:
            with phase("teacher"), torch.no_grad(), torch.autocast(dev, dtype=torch.bfloat16, enabled=self.amp):
                teacher_out = self.teacher(images, masks)
            with phase("loss"):
                kd = self.distiller(outputs, teacher_out, targets=targets, student=self.model, teacher=self.teacher,
                                    criterion=self.criterion, num_aux=self.num_aux)
                total = total + self.distiller.total(kd)
                losses.update(kd)
        with phase("loss"):
            # the global batch's losses (rank means; a single process's own): every rank logs,
            # and stops on a non-finite loss, together
            values = [total] + list(losses.values())
            if dist.world_size() > 1:
                values = list(dist.mean_tensor(torch.stack([v.detach().float() for v in values])).unbind())
            total_g, losses_g = values[0], dict(zip(losses, values[1:]))
            if not torch.isfinite(total_g):
                raise TrainingDiverged(f"training diverged{self.where}: loss is {total_g.item()} at epoch {epoch} "
                                       f"iter {it}; components: { {k: v.item() for k, v in losses_g.items()} }")
        with phase("backward"):
            self.optimizer.zero_grad(set_to_none=True)
            total.backward()
        with phase("optimizer"):
            if self.distiller is not None:
                dist.average_gradients(self.distiller.parameters())  # outside the DDP module
            if self.clip_max_norm > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_max_norm)
            self.optimizer.step()
        return total_g, losses_g
