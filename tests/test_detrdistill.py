"""DETRDistill's losses against plain per-element references on small tensors."""
import itertools
import math

import pytest
import torch

from effdetr.distill.detrdistill import (class_divergence, cosine_feature_mask, feature_loss, feature_mask,
                                         instance_terms, masked_mse, match_predictions, query_quality, relation_loss,
                                         topk_query_quality)
from effdetr.utils.box_ops import box_cxcywh_to_xyxy, generalized_box_iou


def preds(b, q, k, seed):
    g = torch.Generator().manual_seed(seed)
    boxes = torch.cat([0.2 + 0.6 * torch.rand(b, q, 2, generator=g), 0.05 + 0.3 * torch.rand(b, q, 2, generator=g)], -1)
    return {"pred_logits": 2 * torch.randn(b, q, k, generator=g), "pred_boxes": boxes}


def kl_ref(t, s, sigmoid):
    if sigmoid:
        tot = 0.0
        for a, c in zip(t.tolist(), s.tolist()):
            p, q = 1 / (1 + math.exp(-a)), 1 / (1 + math.exp(-c))
            tot += p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))
        return tot
    pt, ps = t.softmax(-1).tolist(), s.softmax(-1).tolist()
    return sum(p * math.log(p / q) for p, q in zip(pt, ps))


@pytest.mark.parametrize("sigmoid", [False, True])
def test_class_divergence_matches_the_definition_and_vanishes_on_equal_logits(sigmoid):
    t, s = preds(1, 4, 5, 0)["pred_logits"][0], preds(1, 3, 5, 1)["pred_logits"][0]
    got = class_divergence(t, s, sigmoid)
    for i, j in itertools.product(range(4), range(3)):
        assert got[i, j].item() == pytest.approx(kl_ref(t[i], s[j], sigmoid), rel=1e-4, abs=1e-5)
    assert torch.diagonal(class_divergence(t, t, sigmoid)).abs().max() < 1e-5


def brute_force_cost(t, s, sigmoid, w=(1.0, 5.0, 2.0)):
    tl, tb, sl, sb = t["pred_logits"][0], t["pred_boxes"][0], s["pred_logits"][0], s["pred_boxes"][0]
    best = None
    for perm in itertools.permutations(range(len(tl)), len(sl)):  # teacher index per student query
        c = 0.0
        for j, i in enumerate(perm):
            giou = generalized_box_iou(box_cxcywh_to_xyxy(tb[i:i + 1]), box_cxcywh_to_xyxy(sb[j:j + 1]))[0, 0]
            c += w[0] * kl_ref(tl[i], sl[j], sigmoid) + w[1] * (tb[i] - sb[j]).abs().sum().item() - w[2] * giou.item()
        best = c if best is None else min(best, c)
    return best


@pytest.mark.parametrize("sigmoid,seed", [(False, 0), (True, 1), (False, 2)])
def test_teacher_student_matching_is_optimal(sigmoid, seed):
    t, s = preds(1, 5, 4, seed), preds(1, 3, 4, seed + 10)
    (ti, si), = match_predictions(t, s, sigmoid)
    assert sorted(si.tolist()) == [0, 1, 2] and len(set(ti.tolist())) == 3  # every student query, once
    got = 0.0
    for i, j in zip(ti.tolist(), si.tolist()):
        giou = generalized_box_iou(box_cxcywh_to_xyxy(t["pred_boxes"][0, i:i + 1]),
                                   box_cxcywh_to_xyxy(s["pred_boxes"][0, j:j + 1]))[0, 0]
        got += (kl_ref(t["pred_logits"][0, i], s["pred_logits"][0, j], sigmoid)
                + 5 * (t["pred_boxes"][0, i] - s["pred_boxes"][0, j]).abs().sum().item() - 2 * giou.item())
    assert got == pytest.approx(brute_force_cost(t, s, sigmoid), rel=1e-5)


def test_matching_recovers_a_permuted_copy_and_instance_terms_vanish_there():
    t = preds(2, 6, 4, 3)
    perm = torch.tensor([4, 0, 5, 2, 1, 3])
    s = {k: v[:, perm] for k, v in t.items()}
    indices = match_predictions(t, s, sigmoid=True)
    for ti, si in indices:
        assert torch.equal(perm[si], ti)
    terms = instance_terms(t, s, indices, sigmoid=True)
    assert all(v.abs() < 1e-5 for v in terms.values()), terms


@pytest.mark.parametrize("sigmoid", [False, True])
def test_instance_terms_against_a_loop(sigmoid):
    t, s = preds(2, 5, 4, 4), preds(2, 3, 4, 5)
    indices = match_predictions(t, s, sigmoid)
    got = instance_terms(t, s, indices, sigmoid)
    cls = l1 = giou = 0.0
    n = 0
    for b, (ti, si) in enumerate(indices):
        for i, j in zip(ti.tolist(), si.tolist()):
            cls += kl_ref(t["pred_logits"][b, i], s["pred_logits"][b, j], sigmoid)
            l1 += (t["pred_boxes"][b, i] - s["pred_boxes"][b, j]).abs().sum().item()
            giou += 1 - generalized_box_iou(box_cxcywh_to_xyxy(s["pred_boxes"][b, j:j + 1]),
                                            box_cxcywh_to_xyxy(t["pred_boxes"][b, i:i + 1]))[0, 0].item()
            n += 1
    assert got["loss_pid_class"].item() == pytest.approx(cls / n, rel=1e-4)
    assert got["loss_pid_l1"].item() == pytest.approx(l1 / n, rel=1e-5)
    assert got["loss_pid_giou"].item() == pytest.approx(giou / n, rel=1e-5)


def test_relation_loss_against_a_loop_and_its_scale_invariance():
    g = torch.Generator().manual_seed(6)
    tq, sq = torch.randn(2, 5, 8, generator=g), torch.randn(2, 4, 3, generator=g)
    indices = [(torch.tensor([3, 0, 4]), torch.tensor([1, 2, 0])), (torch.tensor([1, 2]), torch.tensor([3, 0]))]

    def norm_dists(x):
        n = len(x)
        d = [[math.dist(x[i].tolist(), x[j].tolist()) for j in range(n)] for i in range(n)]
        mean = sum(d[i][j] for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
        return [[v / mean for v in row] for row in d]

    tot, pairs = 0.0, 0
    for b, (ti, si) in enumerate(indices):
        dt, ds = norm_dists(tq[b, ti]), norm_dists(sq[b, si])
        n = len(ti)
        tot += sum(abs(dt[i][j] - ds[i][j]) for i in range(n) for j in range(n))
        pairs += n * (n - 1)
    assert relation_loss(tq, sq, indices).item() == pytest.approx(tot / pairs, rel=1e-4)
    # a scaled, rotated copy of the teacher's queries has the same relations
    rot = torch.linalg.qr(torch.randn(8, 8, generator=g))[0]
    assert relation_loss(tq, 3.0 * tq @ rot, [(i, i) for i, _ in indices]).item() < 1e-5
    assert relation_loss(tq, sq, [(torch.tensor([0]), torch.tensor([1]))] * 2).item() == 0.0  # no pairs


def test_query_quality_is_score_times_best_iou_and_zero_without_objects():
    logits = torch.tensor([[[0.0, 2.0, -1.0], [1.0, 1.0, 3.0]]])  # softmax, last = no object
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.2, 0.2, 0.1, 0.1]]])
    targets = [{"boxes": torch.tensor([[0.5, 0.5, 0.2, 0.4], [0.8, 0.8, 0.1, 0.1]]), "labels": torch.tensor([0, 1])}]
    q = query_quality(logits, boxes, targets, sigmoid=False)
    p = logits.softmax(-1)[0]
    assert q[0, 0].item() == pytest.approx(p[0, 1].item() * 0.5, rel=1e-5)  # IoU of a half-covering box
    assert q[0, 1].item() == pytest.approx(0.0, abs=1e-7)  # overlaps nothing
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}]
    assert query_quality(logits, boxes, empty, sigmoid=True).abs().max() == 0


def test_feature_mask_and_loss_against_a_loop():
    g = torch.Generator().manual_seed(7)
    tq, tf, sf = torch.randn(2, 3, 4, generator=g), torch.randn(2, 5, 4, generator=g), torch.randn(2, 5, 4, generator=g)
    quality = torch.rand(2, 3, generator=g)
    padding = torch.zeros(2, 5, dtype=torch.bool)
    padding[1, 3:] = True
    mask = feature_mask(tq, tf, quality, padding)
    num = den = 0.0
    for b in range(2):
        for n in range(5):
            m = 0.0 if padding[b, n] else sum(
                quality[b, j].item() / (1 + math.exp(-(tq[b, j] @ tf[b, n]).item() / 2)) for j in range(3))
            assert mask[b, n].item() == pytest.approx(m, rel=1e-5, abs=1e-7)
            num += m * ((tf[b, n] - sf[b, n]) ** 2).sum().item()
            den += m * 4
    assert feature_loss(tf, sf, mask).item() == pytest.approx(num / den, rel=1e-5)
    assert feature_loss(tf, tf, mask).item() == 0.0


def iou_ref(a, b):
    """IoU of two (cx, cy, w, h) boxes, plain floats."""
    ax0, ay0, ax1, ay1 = a[0] - a[2] / 2, a[1] - a[3] / 2, a[0] + a[2] / 2, a[1] + a[3] / 2
    bx0, by0, bx1, by1 = b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2
    inter = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * max(0.0, min(ay1, by1) - max(ay0, by0))
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def topk_quality_ref(logits, boxes, targets, sigmoid, k):
    """Per image: sort every (query, class) foreground score, keep the top k, and credit
    each pair's query with score x its best IoU with the ground truth (score alone
    without ground truth)."""
    out = []
    for b, tgt in enumerate(targets):
        probs = logits[b].sigmoid() if sigmoid else logits[b].softmax(-1)[:, :-1]
        pairs = sorted(((probs[q, c].item(), q) for q in range(probs.shape[0]) for c in range(probs.shape[1])),
                       reverse=True)[:k]
        weights = [0.0] * probs.shape[0]
        for score, q in pairs:
            gts = tgt["boxes"].tolist()
            weights[q] += score * (max(iou_ref(boxes[b, q].tolist(), g) for g in gts) if gts else 1.0)
        out.append(weights)
    return torch.tensor(out)


def cosine_mask_ref(tq, tf, weights, padding, sizes):
    """sum_j w_j cos(q_j, f_n), clamped at 0.01, zero on padding, / the image-level max."""
    mask = torch.zeros(tf.shape[:2])
    for b in range(tf.shape[0]):
        start = 0
        for size in sizes:
            cells = range(start, start + size)
            for n in cells:
                if padding is None or not padding[b, n]:
                    raw = sum(w * (q @ tf[b, n]).item() / (q.norm() * tf[b, n].norm()).item()
                              for w, q in zip(weights[b].tolist(), tq[b]))
                    mask[b, n] = max(raw, 0.01)
            top = max(mask[b, n].item() for n in cells)
            for n in cells:
                mask[b, n] /= top
            start += size
    return mask


def masked_mse_ref(tf, sf, mask, sizes):
    """Per level: mean over images, tokens and channels of (m * (f_t - f_s))^2; summed."""
    total, start = 0.0, 0
    for size in sizes:
        sq = sum(((mask[b, n] * (tf[b, n, c] - sf[b, n, c])) ** 2).item() for b in range(tf.shape[0])
                 for n in range(start, start + size) for c in range(tf.shape[2]))
        total += sq / (tf.shape[0] * size * tf.shape[2])
        start += size
    return total


@pytest.mark.parametrize("sigmoid", [False, True])
def test_topk_quality_credits_the_top_query_class_pairs_against_a_loop(sigmoid):
    """Official weights: the top-k (query, class) pairs, not every query's best class; a
    query in several pairs is credited for each; an image without objects keeps the score."""
    t = preds(2, 6, 4, 8)
    targets = [{"boxes": torch.tensor([[0.5, 0.5, 0.3, 0.4], [0.3, 0.4, 0.2, 0.2]]), "labels": torch.tensor([0, 2])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}]
    got = topk_query_quality(t["pred_logits"], t["pred_boxes"], targets, sigmoid, k=7)
    want = topk_quality_ref(t["pred_logits"], t["pred_boxes"], targets, sigmoid, 7)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert (got[1] > 0).sum() < 6  # top-k: some queries get nothing
    # the first reading (best class x IoU, 0 without objects) differs
    assert not torch.allclose(got, query_quality(t["pred_logits"], t["pred_boxes"], targets, sigmoid))


def test_cosine_mask_and_per_level_mse_against_a_loop():
    """Normalised queries and features, quality weighting, clamp at 0.01, / the max of each
    image's level, zero on padding; the loss is MSE(M*Ft, M*Fs) per level, summed."""
    g = torch.Generator().manual_seed(9)
    tq, tf, sf = torch.randn(2, 3, 4, generator=g), torch.randn(2, 7, 4, generator=g), torch.randn(2, 7, 4, generator=g)
    weights = torch.rand(2, 3, generator=g)
    padding = torch.zeros(2, 7, dtype=torch.bool)
    padding[1, 2:4] = padding[1, 6] = True
    sizes = [4, 3]
    mask = cosine_feature_mask(3.0 * tq, 0.5 * tf, weights, padding, sizes)  # scale-free
    want = cosine_mask_ref(tq, tf, weights, padding, sizes)
    torch.testing.assert_close(mask, want, rtol=1e-5, atol=1e-6)
    raw = (weights[..., None] * torch.nn.functional.cosine_similarity(tq[:, :, None], tf[:, None], dim=-1)).sum(1)
    assert (raw[~padding] < 0.01).any()  # the clamp is exercised
    for b in range(2):  # each image's level peaks at 1
        assert want[b, :4].max() == pytest.approx(1.0) and want[b, 4:].max() == pytest.approx(1.0)
    assert masked_mse(tf, sf, mask, sizes).item() == pytest.approx(masked_mse_ref(tf, sf, want, sizes), rel=1e-5)
    assert masked_mse(tf, tf, mask, sizes).item() == 0.0
