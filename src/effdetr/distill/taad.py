"""DETRDistill's teacher-assisted assignment distillation (TAAD).

Early in training a student's Hungarian assignment flips between objects from step to step
(the instability DN-DETR describes). The trained teacher's query embeddings and its
assignment of them to the ground truth are stable, so they are fed through the student's
own decoder as an extra stream -- projected to the student's width, sharing every student
parameter, no interaction with the student's own queries -- and supervised with the
student's usual set loss under the teacher's assignment instead of a fresh matching: per
decoder stage, the teacher's stage-k matching (the official ``pseudo_loss``), or its last
stage's for every stage. Training only: inference runs the student's own queries and is
unchanged.
"""
from __future__ import annotations

from torch import Tensor, nn

from .detrdistill import decoder_stages


def teacher_queries(teacher: nn.Module) -> tuple[Tensor, Tensor | None]:
    """The teacher's decoder query embeddings [Q,C] and (DETR with a spatial prior) their
    per-query prior widths [Q,1]."""
    if not hasattr(teacher, "query_embed"):
        raise ValueError(f"{type(teacher).__name__} has no learned decoder queries (two-stage models draw "
                         "them from the image); teacher-assisted assignment needs learned queries")
    return teacher.query_embed.weight.detach(), getattr(teacher, "log_scale", None)


class TeacherAssistedAssignment(nn.Module):
    def __init__(self, teacher_dim: int, student_dim: int, per_stage: bool = True):
        super().__init__()
        self.proj = nn.Linear(teacher_dim, student_dim)
        self.per_stage = per_stage

    def forward(self, student: nn.Module, student_out: dict, teacher: nn.Module, teacher_out: dict,
                targets: list[dict], criterion: nn.Module) -> dict[str, Tensor]:
        """The student's unweighted set losses on the teacher-query stream."""
        queries, log_scale = teacher_queries(teacher)
        if log_scale is None and getattr(student, "log_scale", None) is not None:
            if len(queries) != len(student.log_scale):
                raise ValueError("the student has a per-query spatial prior and the teacher has none for its "
                                 f"{len(queries)} queries (student: {len(student.log_scale)})")
        if log_scale is not None and getattr(student, "log_scale", None) is None:
            log_scale = None  # the student has no spatial prior to use it with
        stream = student.decode(student_out["context"], self.proj(queries.to(self.proj.weight.dtype)),
                                log_scale.detach() if log_scale is not None else None)
        if not self.per_stage:
            return criterion(stream, targets, indices=criterion.matcher(teacher_out, targets))
        s_stages, t_stages = decoder_stages(stream), decoder_stages(teacher_out)
        t_stages = [t_stages[0]] * (len(s_stages) - len(t_stages)) + t_stages[-len(s_stages):]  # align the last
        losses = {}
        for k, (s, t) in enumerate(zip(s_stages, t_stages)):
            suffix = "" if k == len(s_stages) - 1 else f"_{k}"
            stage = {"pred_logits": s["pred_logits"], "pred_boxes": s["pred_boxes"]}
            losses.update({name + suffix: v for name, v in
                           criterion(stage, targets, indices=criterion.matcher(t, targets)).items()})
        return losses
