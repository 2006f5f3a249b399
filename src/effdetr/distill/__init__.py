"""Knowledge distillation: ACT's MTKD and DETRDistill."""
from __future__ import annotations

from torch import nn


def _width(model: nn.Module) -> int:
    return model.transformer.dim if hasattr(model, "transformer") else model.dim


def build_distiller(distill_cfg, teacher: nn.Module, student: nn.Module) -> nn.Module:
    """The distillation loss module of ``distill_cfg.method`` for this teacher/student pair."""
    if distill_cfg.method == "mtkd":
        from .mtkd import MTKDLoss
        return MTKDLoss(distill_cfg.ce, distill_cfg.l1, distill_cfg.giou, distill_cfg.temperature)
    if distill_cfg.method == "detrdistill":
        from .detrdistill_loss import DETRDistillLoss
        if type(teacher) is not type(student):
            raise ValueError(f"DETRDistill needs teacher and student of one family (class scores must mean the "
                             f"same): teacher {type(teacher).__name__}, student {type(student).__name__}")
        sigmoid = not hasattr(student, "transformer")  # Deformable family: sigmoid (focal) classes
        q_dim = lambda m: m.query_embed.weight.shape[1] if hasattr(m, "query_embed") else None  # noqa: E731
        dd = distill_cfg.detrdistill
        return DETRDistillLoss(dd, _width(teacher), _width(student), sigmoid, q_dim(teacher), q_dim(student))
    raise ValueError(f"unknown distillation method {distill_cfg.method!r}")
