import itertools

import pytest
import torch

from effdetr.models.matcher import HungarianMatcher


def exhaustive(cost):
    """Minimum-cost assignment by trying every injective map targets -> queries."""
    q, t = cost.shape
    best, best_rows = float("inf"), None
    for rows in itertools.permutations(range(q), t):
        c = sum(cost[r, j].item() for j, r in enumerate(rows))
        if c < best:
            best, best_rows = c, rows
    return best, best_rows


@pytest.mark.parametrize("q,t,seed", [(3, 2, 0), (4, 4, 1), (5, 3, 2), (6, 2, 3)])
def test_matches_exhaustive_search(q, t, seed):
    g = torch.Generator().manual_seed(seed)
    m = HungarianMatcher(1.0, 5.0, 2.0)
    out = {"pred_logits": torch.randn(1, q, 5, generator=g),
           "pred_boxes": torch.rand(1, q, 4, generator=g) * 0.5 + 0.25}
    tgt = [{"labels": torch.randint(0, 4, (t,), generator=g), "boxes": torch.rand(t, 4, generator=g) * 0.4 + 0.3}]
    (rows, cols), = m(out, tgt)
    cost = m.cost_matrix(out["pred_logits"][0], out["pred_boxes"][0], tgt[0])
    got = cost[rows, cols].sum().item()
    best, _ = exhaustive(cost)
    assert got == pytest.approx(best, abs=1e-5)
    assert len(rows) == t and len(set(rows.tolist())) == t


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
