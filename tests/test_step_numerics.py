"""The training step's batched forms against the per-image / per-layer loops they replaced.

Each reference below is the straightforward loop (one matcher call per image, one scatter per
layer and corner, one index write per image). The batched code must give the *same floats*:
every entry is computed by the same arithmetic, only in fewer, larger ops. That is also what
keeps tests/test_ddp.py's golden single-process runs (recorded before any of this) bitwise.
"""
from __future__ import annotations

import pytest
import torch
from scipy.optimize import linear_sum_assignment

from effdetr.models.criterion import SetCriterion
from effdetr.models.focal_criterion import FocalSetCriterion, sigmoid_focal_loss
from effdetr.models.matcher import HungarianMatcher
from effdetr.models.sparse_detr import attention_map


def per_image_matching(matcher: HungarianMatcher, outputs, targets):
    """The matcher as one cost matrix per image."""
    result = []
    for i, tgt in enumerate(targets):
        if len(tgt["labels"]) == 0:
            result.append((torch.empty(0, dtype=torch.int64),) * 2)
            continue
        cost = matcher.cost_matrix(outputs["pred_logits"][i], outputs["pred_boxes"][i], tgt)
        rows, cols = linear_sum_assignment(cost.numpy())
        result.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
    return result


def random_batch(seed: int, b: int = 5, q: int = 12, classes: int = 7, sizes=(3, 0, 1, 5, 2)):
    g = torch.Generator().manual_seed(seed)
    outputs = {"pred_logits": torch.randn(b, q, classes, generator=g) * 2,
               "pred_boxes": torch.rand(b, q, 4, generator=g) * 0.4 + 0.2}
    targets = [{"labels": torch.randint(0, classes - 1, (n,), generator=g),
                "boxes": torch.rand(n, 4, generator=g) * 0.4 + 0.2} for n in sizes[:b]]
    return outputs, targets


@pytest.mark.parametrize("focal_alpha", [None, 0.25])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batched_matcher_equals_per_image_matching(focal_alpha, seed):
    """Every image's block of the batch's cost matrix is its per-image matrix: to the bit for
    DETR's softmax cost; within 1 ulp for the focal cost, whose vectorised log and pow kernels
    round an element's last bit by its SIMD lane (where it falls in the larger tensor). The
    assignments are identical."""
    m = HungarianMatcher(2.0, 5.0, 2.0, focal_alpha=focal_alpha)
    outputs, targets = random_batch(seed)
    tgt = {k: torch.cat([t[k] for t in targets]) for k in ("labels", "boxes")}
    full = m.cost_matrix(outputs["pred_logits"].flatten(0, 1), outputs["pred_boxes"].flatten(0, 1), tgt)
    start = 0
    for i, t in enumerate(targets):
        n = len(t["labels"])
        block = full[i * 12:(i + 1) * 12, start:start + n]
        ref = m.cost_matrix(outputs["pred_logits"][i], outputs["pred_boxes"][i], t)
        if focal_alpha is None:
            assert torch.equal(block, ref)
        else:
            torch.testing.assert_close(block, ref, rtol=4e-7, atol=0)
        start += n
    for (r, c), (r0, c0) in zip(m(outputs, targets), per_image_matching(m, outputs, targets), strict=True):
        assert torch.equal(r, r0) and torch.equal(c, c0)


def test_matcher_with_no_targets_in_the_batch():
    m = HungarianMatcher()
    outputs, targets = random_batch(0, b=2, sizes=(0, 0))
    assert [(len(r), len(c)) for r, c in m(outputs, targets)] == [(0, 0), (0, 0)]


def test_detr_criterion_losses_equal_the_per_image_target_loop():
    outputs, targets = random_batch(3)
    outputs["pred_logits"] = torch.cat([outputs["pred_logits"], torch.randn(5, 12, 1)], -1)  # no-object
    crit = SetCriterion(7, HungarianMatcher(), {"loss_ce": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0})
    indices = crit.matcher(outputs, targets)
    got = crit.loss_labels(outputs, targets, indices, 11.0)["loss_ce"]
    classes = torch.full((5, 12), 7, dtype=torch.int64)
    for i, (src, tgt) in enumerate(indices):
        classes[i, src] = targets[i]["labels"][tgt]
    want = torch.nn.functional.cross_entropy(outputs["pred_logits"].transpose(1, 2), classes, crit.empty_weight)
    assert torch.equal(got, want)
    boxes = crit.loss_boxes(outputs, targets, indices, 11.0)
    pred = torch.cat([outputs["pred_boxes"][i, src] for i, (src, _) in enumerate(indices)])
    gt = torch.cat([t["boxes"][tgt] for t, (_, tgt) in zip(targets, indices)])
    assert torch.equal(boxes["loss_bbox"], torch.nn.functional.l1_loss(pred, gt, reduction="none").sum() / 11.0)


def test_focal_criterion_onehot_equals_the_per_image_loop():
    outputs, targets = random_batch(4)
    crit = FocalSetCriterion(HungarianMatcher(focal_alpha=0.25), {"loss_ce": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0})
    indices = crit.matcher(outputs, targets)
    got = crit.set_loss(outputs, targets, 11.0, "", indices=indices)["loss_ce"]
    onehot = torch.zeros_like(outputs["pred_logits"])
    for i, (src, tgt) in enumerate(indices):
        onehot[i, src, targets[i]["labels"][tgt]] = 1.0
    want = sigmoid_focal_loss(outputs["pred_logits"], onehot, 0.25, 2.0).sum() / 11.0
    assert torch.equal(got, want)


def attention_map_per_layer(sampling, spatial_shapes):
    """The DAM as one scatter per level, layer and bilinear corner."""
    b = sampling[0][0].shape[0]
    out = sampling[0][0].new_zeros(b, sum(h * w for h, w in spatial_shapes))
    start = 0
    for lvl, (h, w) in enumerate(spatial_shapes):
        for loc, weight in sampling:
            xy = loc[:, :, :, lvl].float().reshape(b, -1, 2)
            a = weight[:, :, :, lvl].float().reshape(b, -1)
            x, y = xy[..., 0] * w - 0.5, xy[..., 1] * h - 0.5
            x0, y0 = x.floor(), y.floor()
            fx, fy = x - x0, y - y0
            for dx, dy, cw in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)),
                               (0, 1, (1 - fx) * fy), (1, 1, fx * fy)):
                xi, yi = (x0 + dx).long(), (y0 + dy).long()
                inside = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
                out.scatter_add_(1, start + yi.clamp(0, h - 1) * w + xi.clamp(0, w - 1), a * cw * inside)
        start += h * w
    return out


def test_attention_map_equals_one_scatter_per_layer_and_corner():
    g = torch.Generator().manual_seed(5)
    shapes = [(12, 10), (6, 5), (3, 3)]
    # six decoder layers, 20 queries, 4 heads, 3 levels, 4 points; locations spill off the map
    sampling = [(torch.rand(2, 20, 4, 3, 4, 2, generator=g) * 1.2 - 0.1,
                 torch.rand(2, 20, 4, 3, 4, generator=g)) for _ in range(6)]
    assert torch.equal(attention_map(sampling, shapes), attention_map_per_layer(sampling, shapes))


@pytest.mark.parametrize("sigmoid", [False, True])
def test_batched_teacher_student_matching_equals_per_image_matching(sigmoid):
    """DETRDistill's teacher-student matching as one [B,T,S] cost: each image's block equals its
    per-image cost (within 1e-6: a batched matmul may sum the class products in another order)
    and the assignments are identical."""
    from effdetr.distill.detrdistill import class_divergence, match_predictions
    from effdetr.utils.box_ops import box_cxcywh_to_xyxy, generalized_box_iou
    g = torch.Generator().manual_seed(7)
    k = 6 if sigmoid else 7
    t = {"pred_logits": torch.randn(4, 20, k, generator=g), "pred_boxes": torch.rand(4, 20, 4, generator=g) * 0.4 + 0.2}
    s = {"pred_logits": torch.randn(4, 12, k, generator=g), "pred_boxes": torch.rand(4, 12, 4, generator=g) * 0.4 + 0.2}
    got = match_predictions(t, s, sigmoid)
    for b in range(4):
        tl, sl, tb, sb = t["pred_logits"][b], s["pred_logits"][b], t["pred_boxes"][b], s["pred_boxes"][b]
        cost = (class_divergence(tl, sl, sigmoid) + 5 * torch.cdist(tb, sb, p=1)
                - 2 * generalized_box_iou(box_cxcywh_to_xyxy(tb), box_cxcywh_to_xyxy(sb)))
        ti, si = linear_sum_assignment(cost.numpy())
        assert torch.equal(got[b][0], torch.as_tensor(ti)) and torch.equal(got[b][1], torch.as_tensor(si))
        batched = class_divergence(t["pred_logits"], s["pred_logits"], sigmoid)[b]
        torch.testing.assert_close(batched, class_divergence(tl, sl, sigmoid), rtol=1e-6, atol=1e-6)
