"""MTKD loss against a plain per-query loop, and the ACT model swap on a whole DETR."""
import math

import torch

from effdetr.distill.mtkd import MTKDLoss, kd_terms
from effdetr.models import build_model
from effdetr.models.detr import set_encoder_attention


def _giou(a, b):
    """One pair of cxcywh boxes, written out."""
    ax0, ay0, ax1, ay1 = a[0] - a[2] / 2, a[1] - a[3] / 2, a[0] + a[2] / 2, a[1] + a[3] / 2
    bx0, by0, bx1, by1 = b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2
    iw, ih = max(0.0, min(ax1, bx1) - max(ax0, bx0)), max(0.0, min(ay1, by1) - max(ay0, by0))
    inter = iw * ih
    union = a[2] * a[3] + b[2] * b[3] - inter
    hull = (max(ax1, bx1) - min(ax0, bx0)) * (max(ay1, by1) - min(ay0, by0))
    return inter / union - (hull - union) / hull


def reference(student, teacher, t):
    sl, tl = student["pred_logits"].double(), teacher["pred_logits"].double()
    sb, tb = student["pred_boxes"].double(), teacher["pred_boxes"].double()
    b, q, k = sl.shape
    kl, weights, l1, giou = 0.0, [], [], []
    for i in range(b):
        for j in range(q):
            p = [math.exp(x / t) for x in tl[i, j].tolist()]
            z = sum(p)
            ps = [math.exp(x / t) for x in sl[i, j].tolist()]
            zs = sum(ps)
            kl += sum((pi / z) * (math.log(pi / z) - math.log(qi / zs)) for pi, qi in zip(p, ps))
            pr = [math.exp(x) for x in tl[i, j].tolist()]
            weights.append(1 - pr[-1] / sum(pr))
            l1.append(sum(abs(x - y) for x, y in zip(sb[i, j].tolist(), tb[i, j].tolist())))
            giou.append(1 - _giou(sb[i, j].tolist(), tb[i, j].tolist()))
    w = sum(weights)
    return (kl / (b * q) * t * t, sum(a * c for a, c in zip(weights, l1)) / w,
            sum(a * c for a, c in zip(weights, giou)) / w)


def _outputs(b, q, k, seed):
    g = torch.Generator().manual_seed(seed)
    boxes = torch.cat([torch.rand(b, q, 2, generator=g) * 0.6 + 0.2, torch.rand(b, q, 2, generator=g) * 0.3 + 0.05], -1)
    return {"pred_logits": torch.randn(b, q, k, generator=g) * 2, "pred_boxes": boxes}


def test_kd_terms_match_reference():
    for t in (1.0, 2.5):
        s, te = _outputs(2, 5, 4, 0), _outputs(2, 5, 4, 1)
        got = kd_terms(s, te, t)
        ce, l1, giou = reference(s, te, t)
        assert math.isclose(got["loss_kd_ce"].item(), ce, rel_tol=1e-5)
        assert math.isclose(got["loss_kd_l1"].item(), l1, rel_tol=1e-5)
        assert math.isclose(got["loss_kd_giou"].item(), giou, rel_tol=1e-5)


def test_identical_outputs_give_zero_and_aux_layers_are_covered():
    s = _outputs(2, 3, 4, 0)
    s["aux_outputs"] = [_outputs(2, 3, 4, 5)]
    loss = MTKDLoss(1.0, 5.0, 2.0, 1.0)
    same = loss(s, s)
    assert set(same) == {"loss_kd_ce", "loss_kd_l1", "loss_kd_giou", "loss_kd_ce_0", "loss_kd_l1_0", "loss_kd_giou_0"}
    assert all(abs(v.item()) < 1e-6 for v in same.values())
    te = _outputs(2, 3, 4, 9)
    te["aux_outputs"] = [_outputs(2, 3, 4, 7)]
    diff = loss(s, te)
    assert all(v.item() > 0 for v in diff.values())
    # the engine passes every distiller the same keywords (DETRDistill needs them; MTKD not)
    engine_call = loss(s, te, targets=[], student=None, teacher=None, criterion=None, num_aux=1)
    assert all(torch.equal(engine_call[k], diff[k]) for k in diff)
    want = sum(diff[k] * w for k, w in [("loss_kd_ce", 1), ("loss_kd_l1", 5), ("loss_kd_giou", 2),
                                         ("loss_kd_ce_0", 1), ("loss_kd_l1_0", 5), ("loss_kd_giou_0", 2)])
    assert torch.isclose(loss.total(diff), want)


def test_act_swap_on_a_detr_keeps_weights_and_equals_dense_at_tiny_width(tiny_cfg):
    import dataclasses
    torch.manual_seed(0)
    model = build_model(tiny_cfg.model).eval()
    keys = set(model.state_dict())
    x = torch.randn(2, 3, 64, 80), torch.zeros(2, 64, 80, dtype=torch.bool)
    x[1][1, :, 60:] = True
    with torch.no_grad():
        dense = model(*x)
        act_cfg = dataclasses.replace(tiny_cfg.model.act, rounds=8, bucket_width=1e-7)
        set_encoder_attention(model.transformer, "act", act_cfg)
        act = model(*x)
    assert set(model.state_dict()) == keys
    torch.testing.assert_close(act["pred_boxes"], dense["pred_boxes"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(act["pred_logits"], dense["pred_logits"], atol=1e-4, rtol=1e-4)
