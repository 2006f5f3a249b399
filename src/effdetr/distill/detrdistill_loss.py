"""DETRDistill as one training-time module: its three parts over a frozen teacher.

Holds the only trainable pieces DETRDistill adds -- the feature adaptation layer (student ->
teacher width) and the TAAD query projection (teacher -> student width). They are saved with
the training state, never with the student's model file, so the distilled student has the
baseline student's architecture and inference cost.
"""
from __future__ import annotations

from torch import Tensor, nn

from .detrdistill import (cosine_feature_mask, decoder_stages, feature_loss, feature_mask, instance_terms,
                          masked_mse, match_predictions, query_quality, relation_loss, topk_query_quality)
from .taad import TeacherAssistedAssignment


def detached(obj):
    """The teacher's outputs as fixed targets: every tensor in nested dicts/lists/tuples
    detached, so no distillation term can train the teacher, frozen or not."""
    if isinstance(obj, Tensor):
        return obj.detach()
    if isinstance(obj, dict):
        return {k: detached(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(detached(v) for v in obj)
    return obj


def _level_sizes(out: dict, tokens: int) -> list[int]:
    shapes = out.get("context", {}).get("shapes")
    return [h * w for h, w in shapes] if shapes else [tokens]


class DETRDistillLoss(nn.Module):
    def __init__(self, cfg, teacher_dim: int, student_dim: int, sigmoid: bool, teacher_query_dim: int | None = None,
                 student_query_dim: int | None = None):
        super().__init__()
        self.cfg, self.sigmoid = cfg, sigmoid
        self.adapt = nn.Linear(student_dim, teacher_dim) if cfg.feature > 0 else None
        self.taad = (TeacherAssistedAssignment(teacher_query_dim or teacher_dim, student_query_dim or student_dim,
                                               cfg.assignment_stages == "per_stage")
                     if cfg.assignment > 0 else None)

    def forward(self, student_out: dict, teacher_out: dict, *, targets: list[dict], student: nn.Module,
                teacher: nn.Module, criterion: nn.Module, num_aux: int = 0, **_) -> dict[str, Tensor]:
        c, losses = self.cfg, {}
        teacher_out = detached(teacher_out)
        if c.instance > 0 or c.relation > 0:
            s_stages, t_stages = decoder_stages(student_out), decoder_stages(teacher_out)
            t_stages = t_stages[len(t_stages) - len(s_stages):]  # deeper teacher: align the last stages
            t_hs = teacher_out["hs"][len(teacher_out["hs"]) - len(s_stages):]
            for k, (s, t) in enumerate(zip(s_stages, t_stages)):
                suffix = "" if k == len(s_stages) - 1 else f"_{k}"  # earlier stages as the aux losses
                indices = match_predictions(t, s, self.sigmoid, c.cost_class, c.cost_l1, c.cost_giou)
                if c.instance > 0:
                    losses.update({name + suffix: v for name, v in instance_terms(t, s, indices, self.sigmoid).items()})
                if c.relation > 0:
                    losses["loss_pid_relation" + suffix] = relation_loss(t_hs[k], student_out["hs"][k], indices)
        if c.feature > 0:
            losses.update(self.feature_terms(student_out, teacher_out, targets))
        if self.taad is not None:
            stream = self.taad(student, student_out, teacher, teacher_out, targets, criterion)
            losses["loss_taad"] = criterion.total(stream, num_aux)
        return losses

    def feature_terms(self, student_out: dict, teacher_out: dict, targets: list[dict]) -> dict[str, Tensor]:
        c = self.cfg
        key = "encoder_inputs" if c.feature_source == "encoder_input" else "memory"
        if key not in teacher_out or key not in student_out:
            raise ValueError(f"feature_source {c.feature_source!r} needs {key!r} in both models' outputs")
        t_feat, s_feat = teacher_out[key], student_out[key]
        if t_feat.shape[:2] != s_feat.shape[:2]:
            raise ValueError(f"feature distillation needs the same feature tokens in teacher and student: "
                             f"teacher {key} {tuple(t_feat.shape)}, student {tuple(s_feat.shape)} (use the same "
                             "backbone strides and levels)")
        # under autocast DETR's input_proj (a conv) returns bf16; the adapter runs outside it
        s_adapted, padding = self.adapt(s_feat.to(self.adapt.weight.dtype)), teacher_out.get("padding")
        if c.feature_mask == "sigmoid_last":
            quality = query_quality(teacher_out["pred_logits"], teacher_out["pred_boxes"], targets, self.sigmoid)
            mask = feature_mask(teacher_out["hs"][-1], t_feat, quality, padding)
            return {"loss_feature": feature_loss(t_feat, s_adapted, mask.detach())}
        sizes, stages = _level_sizes(teacher_out, t_feat.shape[1]), decoder_stages(teacher_out)
        t_hs, out = teacher_out["hs"][len(teacher_out["hs"]) - len(stages):], {}
        for k, stage in enumerate(stages):  # every teacher stage, summed (official)
            weights = topk_query_quality(stage["pred_logits"], stage["pred_boxes"], targets, self.sigmoid,
                                         c.feature_topk)
            mask = cosine_feature_mask(t_hs[k], t_feat, weights, padding, sizes)
            suffix = "" if k == len(stages) - 1 else f"_{k}"
            out["loss_feature" + suffix] = masked_mse(t_feat, s_adapted, mask.detach(), sizes)
        return out

    def total(self, losses: dict[str, Tensor]) -> Tensor:
        c = self.cfg
        weights = {"loss_pid_class": c.instance * c.instance_class, "loss_pid_l1": c.instance * c.instance_l1,
                   "loss_pid_giou": c.instance * c.instance_giou, "loss_pid_relation": c.relation,
                   "loss_feature": c.feature, "loss_taad": c.assignment}
        return sum(v * weights[k.rsplit("_", 1)[0] if k not in weights else k] for k, v in losses.items())
