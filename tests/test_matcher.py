import itertools
import math

import pytest
import torch

from effdetr.models.matcher import HungarianMatcher


def giou_xyxy(a, b):
    """GIoU of two (x0, y0, x1, y1) boxes, from the definition (Rezatofighi et al. 2019)."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    return inter / union - (hull - union) / hull


def detr_cost(logits, boxes, labels, tboxes, w_class, w_l1, w_giou):
    """DETR's matching cost, written out per (query, target) pair in plain Python:
    w_class * -softmax(logits)[label] + w_l1 * |box - tbox|_1 (cxcywh) + w_giou * -GIoU (xyxy)."""
    def xyxy(b):
        cx, cy, w, h = b
        return (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)

    cost = []
    for lg, bx in zip(logits.tolist(), boxes.tolist()):
        z = sum(math.exp(v) for v in lg)
        row = []
        for lab, tb in zip(labels.tolist(), tboxes.tolist()):
            p = math.exp(lg[lab]) / z
            l1 = sum(abs(u - v) for u, v in zip(bx, tb))
            row.append(-w_class * p + w_l1 * l1 - w_giou * giou_xyxy(xyxy(bx), xyxy(tb)))
        cost.append(row)
    return cost


def exhaustive(cost):
    """Minimum-cost assignment by trying every injective map targets -> queries."""
    q, t = len(cost), len(cost[0])
    best, best_rows = float("inf"), None
    for rows in itertools.permutations(range(q), t):
        c = sum(cost[r][j] for j, r in enumerate(rows))
        if c < best:
            best, best_rows = c, rows
    return best, best_rows


@pytest.mark.parametrize("q,t,seed", [(3, 2, 0), (4, 4, 1), (5, 3, 2), (6, 2, 3)])
def test_matches_exhaustive_search(q, t, seed):
    """Catches a wrong matching cost (e.g. the L1 and GIoU weights swapped, a sign flipped,
    probabilities instead of -probabilities) as well as a wrong solver: the reference cost
    is DETR's, written out independently of HungarianMatcher.cost_matrix, and the reference
    assignment is the brute-force minimum of that cost."""
    g = torch.Generator().manual_seed(seed)
    w_class, w_l1, w_giou = 1.0, 5.0, 2.0
    m = HungarianMatcher(w_class, w_l1, w_giou)
    out = {"pred_logits": torch.randn(1, q, 5, generator=g) * 2,
           "pred_boxes": torch.rand(1, q, 4, generator=g) * 0.5 + 0.25}
    tgt = [{"labels": torch.randint(0, 4, (t,), generator=g), "boxes": torch.rand(t, 4, generator=g) * 0.4 + 0.3}]
    ref = detr_cost(out["pred_logits"][0], out["pred_boxes"][0], tgt[0]["labels"], tgt[0]["boxes"],
                    w_class, w_l1, w_giou)
    torch.testing.assert_close(m.cost_matrix(out["pred_logits"][0], out["pred_boxes"][0], tgt[0]),
                               torch.tensor(ref), atol=1e-5, rtol=1e-5)
    (rows, cols), = m(out, tgt)
    best, best_rows = exhaustive(ref)
    assert sorted(zip(cols.tolist(), rows.tolist())) == list(enumerate(best_rows))
    assert sum(ref[r][c] for r, c in zip(rows.tolist(), cols.tolist())) == pytest.approx(best, abs=1e-6)


def test_assignment_follows_the_cost_weights():
    """Catches the L1 and GIoU weights applied to each other's terms, from the assignment
    alone. Target (0.5, 0.5, 0.2, 0.2) cxcywh = (0.4, 0.4, 0.6, 0.6) xyxy, area 0.04; equal
    class costs (zero logits).
      query 0, concentric (0.5, 0.5, 0.16, 0.16): L1 = 0.08, GIoU = IoU = 0.0256/0.04 = 0.64
      query 1, shifted (0.55, 0.5, 0.2, 0.2):     L1 = 0.05, GIoU = IoU = 0.03/0.05 = 0.60
    (L1 5, GIoU 2): 0.40 - 1.28 = -0.88 vs 0.25 - 1.20 = -0.95 -> query 1;
    (L1 2, GIoU 5): 0.16 - 3.20 = -3.04 vs 0.10 - 3.00 = -2.90 -> query 0."""
    tgt = [{"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    out = {"pred_logits": torch.zeros(1, 2, 3),
           "pred_boxes": torch.tensor([[[0.5, 0.5, 0.16, 0.16], [0.55, 0.5, 0.2, 0.2]]])}
    for (w_l1, w_giou), query in (((5.0, 2.0), 1), ((2.0, 5.0), 0)):
        (rows, cols), = HungarianMatcher(1.0, w_l1, w_giou)(out, tgt)
        assert (rows.tolist(), cols.tolist()) == ([query], [0]), (w_l1, w_giou)


def test_empty_targets_give_empty_matches():
    m = HungarianMatcher()
    out = {"pred_logits": torch.randn(2, 4, 3), "pred_boxes": torch.rand(2, 4, 4) * 0.5 + 0.25}
    tgt = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)},
           {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    res = m(out, tgt)
    assert len(res[0][0]) == 0 and len(res[1][0]) == 1


def test_all_zero_costs_rejected():
    with pytest.raises(ValueError):
        HungarianMatcher(0, 0, 0)
