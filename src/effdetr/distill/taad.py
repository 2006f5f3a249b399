"""DETRDistill's teacher-assisted assignment distillation (TAAD).

Early in training a student's Hungarian assignment flips between objects from step to step
(the instability DN-DETR describes). The trained teacher's query embeddings and its
assignment of them to the ground truth are stable, so they are fed through the student's
own decoder as an extra stream -- projected to the student's width, sharing every student
parameter, no interaction with the student's own queries -- and supervised with the
student's usual set loss under the teacher's assignment instead of a fresh matching.
Training only: inference runs the student's own queries and is unchanged.
"""
from __future__ import annotations

from torch import Tensor, nn


def teacher_queries(teacher: nn.Module) -> tuple[Tensor, Tensor | None]:
    """The teacher's decoder query embeddings [Q,C] and (DETR with a spatial prior) their
    per-query prior widths [Q,1]."""
    if not hasattr(teacher, "query_embed"):
        raise ValueError(f"{type(teacher).__name__} has no learned decoder queries (two-stage models draw "
                         "them from the image); teacher-assisted assignment needs learned queries")
    return teacher.query_embed.weight.detach(), getattr(teacher, "log_scale", None)


class TeacherAssistedAssignment(nn.Module):
    def __init__(self, teacher_dim: int, student_dim: int):
        super().__init__()
        self.proj = nn.Linear(teacher_dim, student_dim)

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
        indices = criterion.matcher(teacher_out, targets)  # the teacher's own assignment
        stream = student.decode(student_out["context"], self.proj(queries.to(self.proj.weight.dtype)),
                                log_scale.detach() if log_scale is not None else None)
        return criterion(stream, targets, indices=indices)
