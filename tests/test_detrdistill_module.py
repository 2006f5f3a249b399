"""DETRDistill wired to real DETR / Deformable DETR teacher-student pairs."""
import copy
import dataclasses
import re

import pytest
import torch

from effdetr import config as C
from effdetr.distill import build_distiller
from effdetr.models import build_model
from effdetr.models.criterion import build_criterion
from tests.test_deformable import loss_cfg as focal_loss_cfg
from tests.test_deformable import model_cfg as deformable_cfg


pytestmark = pytest.mark.one_thread  # see conftest.one_thread


def distill_cfg(**parts):
    return C.build(C.DistillConfig, {"teacher": "t", "method": "detrdistill", "detrdistill": parts}, "test", "distill")


def batch():
    images, mask = torch.randn(2, 3, 64, 80), torch.zeros(2, 64, 80, dtype=torch.bool)
    mask[1, :, 60:] = True
    targets = [{"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.5, 0.5, 0.3, 0.4], [0.2, 0.3, 0.1, 0.2]])},
               {"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}]  # one image without objects
    return images, mask, targets


def pair(family, tiny_cfg):
    torch.manual_seed(0)
    if family == "detr":
        t_cfg = tiny_cfg.model
        s_cfg = dataclasses.replace(t_cfg, hidden_dim=16, ffn_dim=32, nheads=4)
        crit = build_criterion(s_cfg, tiny_cfg.loss)
    else:
        t_cfg = deformable_cfg()
        s_cfg = deformable_cfg(hidden_dim=16, ffn_dim=32, num_queries=6)
        crit = build_criterion(s_cfg, focal_loss_cfg())
    teacher = build_model(t_cfg).eval().requires_grad_(False)
    return teacher, build_model(s_cfg).train(), crit


def distill_with_trainable_teacher(family, tiny_cfg, **parts):
    """One forward of every part on a pair whose teacher is left trainable (requires_grad,
    run with autograd on), then backward of the distillation total -> (teacher, student, distiller, losses)."""
    teacher, student, crit = pair(family, tiny_cfg)
    teacher.requires_grad_(True)
    distiller = build_distiller(distill_cfg(**parts), teacher, student)
    images, mask, targets = batch()
    t_out, s_out = teacher(images, mask), student(images, mask)
    losses = distiller(s_out, t_out, targets=targets, student=student, teacher=teacher, criterion=crit,
                       num_aux=len(s_out["aux_outputs"]))
    distiller.total(losses).backward()
    return teacher, student, distiller, losses


def with_gradient(model):
    return sorted(n for n, p in model.named_parameters() if p.grad is not None and p.grad.any())


@pytest.mark.parametrize("family", ["detr", "deformable"])
def test_every_part_trains_the_student_and_its_adapters(family, tiny_cfg):
    _, student, distiller, losses = distill_with_trainable_teacher(family, tiny_cfg)
    stems = {re.sub(r"_\d+$", "", k) for k in losses}
    assert stems == {"loss_pid_class", "loss_pid_l1", "loss_pid_giou", "loss_pid_relation", "loss_feature",
                     "loss_taad"}
    assert all(torch.isfinite(v) and v >= 0 for v in losses.values()), losses
    assert with_gradient(distiller) == sorted(n for n, _ in distiller.named_parameters())
    assert student.query_embed.weight.grad.any()


@pytest.mark.parametrize("family", ["detr", "deformable"])
def test_distillation_gives_a_trainable_teacher_no_gradient(family, tiny_cfg):
    """The teacher is a fixed target: the distillation loss itself must not train it, even
    when the caller forgets to freeze it or to run it under no_grad."""
    teacher, _, _, _ = distill_with_trainable_teacher(family, tiny_cfg)
    assert with_gradient(teacher) == []


@pytest.mark.parametrize("family", ["detr", "deformable"])
def test_teacher_assisted_assignment_gives_a_trainable_teacher_no_gradient(family, tiny_cfg):
    """TAAD feeds the teacher's query embeddings through the student's decoder: they must enter
    detached, or the student's set loss would move the teacher's queries."""
    teacher, _, distiller, losses = distill_with_trainable_teacher(family, tiny_cfg, instance=0, relation=0,
                                                                   feature=0)
    assert set(losses) == {"loss_taad"}
    assert with_gradient(teacher) == []
    assert with_gradient(distiller) == ["taad.proj.bias", "taad.proj.weight"]  # it does train the projection


@pytest.mark.parametrize("stages", ["per_stage", "final"])
@pytest.mark.parametrize("family", ["detr", "deformable"])
def test_self_distillation_with_identity_adapters_is_lossless(family, stages, tiny_cfg):
    """Student = the teacher, adapters = identity: the instance, relation and feature terms
    vanish and the teacher-query stream's loss equals the teacher's own set loss under its
    per-stage assignment (official) or its final-layer one for every stage."""
    teacher, _, _ = pair(family, tiny_cfg)
    student = copy.deepcopy(teacher)
    crit = (build_criterion(tiny_cfg.model, tiny_cfg.loss) if family == "detr"
            else build_criterion(deformable_cfg(), focal_loss_cfg()))
    distiller = build_distiller(distill_cfg(assignment_stages=stages), teacher, student)
    for lin in (distiller.adapt, distiller.taad.proj):
        torch.nn.init.eye_(lin.weight)
        torch.nn.init.zeros_(lin.bias)
    images, mask, targets = batch()
    with torch.no_grad():
        out = teacher(images, mask)
        losses = distiller(out, out, targets=targets, student=student, teacher=teacher, criterion=crit,
                           num_aux=len(out["aux_outputs"]))
        fixed = crit.matcher(out, targets) if stages == "final" else None  # None: each stage matched itself
        own = crit.total(crit(out, targets, indices=fixed), len(out["aux_outputs"]))
    for k, v in losses.items():
        if k != "loss_taad":
            assert v.abs() < 1e-4, (k, v)
    torch.testing.assert_close(losses["loss_taad"], own, rtol=1e-5, atol=1e-6)


def encoder_inputs_ref(model, images, mask):
    """The projected backbone maps the encoder reads, [B,N,C], and the tokens per level."""
    if hasattr(model, "multiscale_inputs"):
        src, _, _, shapes, _ = model.multiscale_inputs(images, mask)
        return src, [h * w for h, w in shapes]
    src = model.input_proj(model.backbone(images, mask)[0]).flatten(2).transpose(1, 2)
    return src, [src.shape[1]]


@pytest.mark.parametrize("family", ["detr", "deformable"])
def test_encoder_inputs_reach_the_outputs(family, tiny_cfg):
    """The models return what the encoder reads (after input_proj): the official code's
    imitation target, recomputed here from the model's own parts."""
    teacher, student, _ = pair(family, tiny_cfg)
    images, mask, _ = batch()
    with torch.no_grad():
        for model in (teacher, student):
            want = encoder_inputs_ref(model, images, mask)[0]
            torch.testing.assert_close(model(images, mask)["encoder_inputs"], want)


@pytest.mark.parametrize("family", ["detr", "deformable"])
def test_default_feature_term_is_the_official_per_stage_masked_mse(family, tiny_cfg):
    """Encoder inputs imitated under each teacher stage's cosine mask (weights from that
    stage's own top-k scores x IoU), one MSE per stage; the total sums them at weight
    ``feature``."""
    from tests.test_detrdistill import cosine_mask_ref, masked_mse_ref, topk_quality_ref
    teacher, student, crit = pair(family, tiny_cfg)
    distiller = build_distiller(distill_cfg(instance=0, relation=0, assignment=0, feature=0.5, feature_topk=7),
                                teacher, student)
    images, mask, targets = batch()
    with torch.no_grad():
        t_out, s_out = teacher(images, mask), student(images, mask)
        losses = distiller(s_out, t_out, targets=targets, student=student, teacher=teacher, criterion=crit)
        t_feat, sizes = encoder_inputs_ref(teacher, images, mask)
        s_feat = distiller.adapt(encoder_inputs_ref(student, images, mask)[0])
    stages = t_out["aux_outputs"] + [t_out]
    assert set(losses) == {"loss_feature"} | {f"loss_feature_{k}" for k in range(len(stages) - 1)}
    sigmoid = family == "deformable"
    want = []
    for k, stage in enumerate(stages):
        weights = topk_quality_ref(stage["pred_logits"], stage["pred_boxes"], targets, sigmoid, 7)
        m = cosine_mask_ref(t_out["hs"][k], t_feat, weights, t_out["padding"], sizes)
        want.append(masked_mse_ref(t_feat, s_feat, m, sizes))
        got = losses["loss_feature" if k == len(stages) - 1 else f"loss_feature_{k}"]
        assert got.item() == pytest.approx(want[-1], rel=1e-4)
    assert distiller.total(losses).item() == pytest.approx(0.5 * sum(want), rel=1e-4)


def test_first_reading_stays_selectable(tiny_cfg):
    """feature_source memory + feature_mask sigmoid_last: effdetr's first reading, unchanged."""
    from effdetr.distill.detrdistill import feature_loss, feature_mask, query_quality
    teacher, student, crit = pair("detr", tiny_cfg)
    distiller = build_distiller(distill_cfg(instance=0, relation=0, assignment=0, feature_source="memory",
                                            feature_mask="sigmoid_last"), teacher, student)
    images, mask, targets = batch()
    with torch.no_grad():
        t_out, s_out = teacher(images, mask), student(images, mask)
        losses = distiller(s_out, t_out, targets=targets, student=student, teacher=teacher, criterion=crit)
        quality = query_quality(t_out["pred_logits"], t_out["pred_boxes"], targets, sigmoid=False)
        m = feature_mask(t_out["hs"][-1], t_out["memory"], quality, t_out["padding"])
        want = feature_loss(t_out["memory"], distiller.adapt(s_out["memory"]), m)
    assert set(losses) == {"loss_feature"}
    torch.testing.assert_close(losses["loss_feature"], want)


def test_parts_switch_off_at_weight_zero(tiny_cfg):
    teacher, student, crit = pair("detr", tiny_cfg)
    distiller = build_distiller(distill_cfg(instance=0, relation=0, assignment=0), teacher, student)
    assert distiller.taad is None and distiller.adapt is not None
    images, mask, targets = batch()
    with torch.no_grad():
        t_out = teacher(images, mask)
    losses = distiller(student(images, mask), t_out, targets=targets, student=student, teacher=teacher,
                       criterion=crit)
    assert {re.sub(r"_\d+$", "", k) for k in losses} == {"loss_feature"}


def test_mismatched_pairs_fail_with_a_clear_message(tiny_cfg):
    detr, _, _ = pair("detr", tiny_cfg)
    deform, _, _ = pair("deformable", tiny_cfg)
    with pytest.raises(ValueError, match="one family"):
        build_distiller(distill_cfg(), detr, deform)
    two_stage = build_model(deformable_cfg(deformable={"num_points": 2, "two_stage": True}))
    with pytest.raises(ValueError, match="learned decoder queries"):
        distiller = build_distiller(distill_cfg(instance=0, relation=0, feature=0), two_stage, two_stage)
        images, mask, targets = batch()
        out = two_stage(images, mask)
        distiller(out, out, targets=targets, student=two_stage, teacher=two_stage,
                  criterion=build_criterion(deformable_cfg(), focal_loss_cfg()))


@pytest.fixture(scope="module")
def distilled_run(tiny_cfg, tiny_data, tmp_path_factory):
    """A few engine steps with every part on (adapters in the optimizer), keeping hold of the
    in-memory teacher and student the engine trained with, and the student's initial weights."""
    from effdetr.engine import train as engine
    from effdetr.engine.checkpoint import save_atomic
    tmp = tmp_path_factory.mktemp("distilled")
    backbone = dataclasses.replace(tiny_cfg.model.backbone, pretrained="none")
    t_model_cfg = dataclasses.replace(tiny_cfg.model, backbone=backbone)
    torch.manual_seed(0)
    save_atomic({"model": build_model(t_model_cfg).state_dict(), "model_config": dataclasses.asdict(t_model_cfg),
                 "params_hash": "t", "epochs": 0}, tmp / "teacher.pt")
    s_model_cfg = dataclasses.replace(t_model_cfg, hidden_dim=16, ffn_dim=32, nheads=4)
    cfg = dataclasses.replace(tiny_cfg, model=s_model_cfg,
                              train=dataclasses.replace(tiny_cfg.train, epochs=1, max_iters_per_epoch=2))
    seen = {}

    def builder(model_cfg):
        seen["student"] = build_model(model_cfg)
        seen["initial"] = copy.deepcopy(seen["student"].state_dict())
        return seen["student"]

    def capture(dcfg, teacher, student):
        seen["teacher"] = teacher
        return build_distiller(dcfg, teacher, student)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("effdetr.distill.build_distiller", capture)  # train() imports it where it distils
        result = engine.train(cfg, str(tiny_data), str(tmp / "student.pt"), str(tmp / "work"), "h",
                              model_builder=builder, teacher=str(tmp / "teacher.pt"), distill_cfg=distill_cfg())
    assert seen["student"] is not seen["teacher"]
    return {"tmp": tmp, "result": result, "s_model_cfg": s_model_cfg, **seen}


def test_distilled_training_saves_only_the_trained_student(distilled_run):
    """The model file is the student alone: exactly the keys and shapes of a student built
    from its config (no adapter / TAAD projection leaks in), its own config (not the
    teacher's), and the weights training ended with; the adapters live in the resumable state."""
    run = distilled_run
    assert {"train_loss_pid_class", "train_loss_feature", "train_loss_taad"} <= set(run["result"]["final"])
    ckpt = torch.load(run["tmp"] / "student.pt", weights_only=True)
    fresh = build_model(run["s_model_cfg"]).state_dict()
    assert {k: v.shape for k, v in ckpt["model"].items()} == {k: v.shape for k, v in fresh.items()}
    assert ckpt["model_config"] == dataclasses.asdict(run["s_model_cfg"])
    trained = run["student"].state_dict()
    assert [k for k in trained if not torch.equal(ckpt["model"][k], trained[k])] == []
    assert any(not torch.equal(trained[k], run["initial"][k]) for k in trained)  # it did train
    state = torch.load(run["tmp"] / "work" / "last.pt", weights_only=False)
    assert set(state["distiller"]) == {"adapt.weight", "adapt.bias", "taad.proj.weight", "taad.proj.bias"}


def test_distillation_leaves_nothing_on_the_student_at_inference(distilled_run):
    """FLOPs depend on code and config only, so counting two students built from one config
    cannot fail; what distillation can break is the student object it trained with (a
    feature hook, a swapped submodule). That in-memory student must count the FLOPs of a
    student that never met a distiller, and give the outputs its saved file gives."""
    from effdetr.engine.checkpoint import build_trained_model
    from effdetr.evaluation.flops import count_flops
    run = distilled_run
    images, mask = torch.randn(1, 3, 64, 80), torch.zeros(1, 64, 80, dtype=torch.bool)
    trained, baseline = run["student"].eval(), build_model(run["s_model_cfg"])
    assert count_flops(trained, images, mask, trained.flops_parts) == count_flops(baseline, images, mask,
                                                                                  baseline.flops_parts)
    reloaded, _ = build_trained_model(run["tmp"] / "student.pt")
    with torch.no_grad():
        got, want = trained(images, mask), reloaded.eval()(images, mask)
    for key in ("pred_logits", "pred_boxes"):
        assert torch.equal(got[key], want[key]), key


def test_engine_never_trains_the_teacher(distilled_run):
    """The engine's teacher (frozen and run under no_grad) ends the run with no gradient and
    the weights of its file."""
    teacher = distilled_run["teacher"]
    assert with_gradient(teacher) == [] and all(p.grad is None for p in teacher.parameters())
    saved = torch.load(distilled_run["tmp"] / "teacher.pt", weights_only=True)["model"]
    assert [k for k, v in teacher.state_dict().items() if not torch.equal(v, saved[k])] == []
