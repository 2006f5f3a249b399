import itertools

import pytest
import torch

from effdetr.utils.box_ops import box_cxcywh_to_xyxy, box_iou, box_xyxy_to_cxcywh, generalized_box_iou


def random_boxes(n, gen):
    xy = torch.rand(n, 2, generator=gen, dtype=torch.float64) * 10
    wh = torch.rand(n, 2, generator=gen, dtype=torch.float64) * 5 + 0.01
    return torch.cat([xy, xy + wh], 1)


def brute_giou(a, b):
    """Pixel-free reference: scalar formulas on one pair of boxes."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    area_a = (a[2] - a[0]) * (a[3] - a[1])
    area_b = (b[2] - b[0]) * (b[3] - b[1])
    union = area_a + area_b - inter
    hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    return inter / union, inter / union - (hull - union) / hull


def test_giou_and_iou_match_brute_force():
    gen = torch.Generator().manual_seed(0)
    a, b = random_boxes(7, gen), random_boxes(5, gen)
    giou = generalized_box_iou(a, b)
    iou, _ = box_iou(a, b)
    for i, j in itertools.product(range(7), range(5)):
        ref_iou, ref_giou = brute_giou(a[i].tolist(), b[j].tolist())
        assert iou[i, j].item() == pytest.approx(ref_iou, abs=1e-12)
        assert giou[i, j].item() == pytest.approx(ref_giou, abs=1e-12)


def test_giou_bounds_and_identity():
    gen = torch.Generator().manual_seed(1)
    a = random_boxes(6, gen)
    g = generalized_box_iou(a, a)
    assert torch.allclose(torch.diag(g), torch.ones(6, dtype=torch.float64))
    assert (g >= -1).all() and (g <= 1).all()
    far = torch.tensor([[100.0, 100.0, 101.0, 101.0]], dtype=torch.float64)
    assert generalized_box_iou(a[:1], far).item() < 0


def test_giou_rejects_inverted_boxes():
    with pytest.raises(ValueError, match="x1>=x0"):
        generalized_box_iou(torch.tensor([[2.0, 0, 1, 1]]), torch.tensor([[0.0, 0, 1, 1]]))


def test_format_round_trip():
    gen = torch.Generator().manual_seed(2)
    b = random_boxes(9, gen)
    assert torch.allclose(box_cxcywh_to_xyxy(box_xyxy_to_cxcywh(b)), b)


def test_paired_giou_is_the_diagonal_of_the_pairwise_matrix_with_its_gradients():
    """Same floats and same gradients as diag(generalized_box_iou(a, b)), which the losses used
    to build as an N x N matrix; including identical, nested and disjoint pairs."""
    from effdetr.utils.box_ops import generalized_box_iou, paired_generalized_box_iou
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(40, 2, generator=g)
    a = torch.cat([xy, xy + torch.rand(40, 2, generator=g) * 0.5 + 0.01], 1)
    b = a.clone()
    b[10:] = torch.cat([xy[10:] + 0.1, xy[10:] + 0.3], 1)  # shifted; the first ten identical
    b[30:] = torch.cat([xy[30:] + 2.0, xy[30:] + 2.5], 1)  # disjoint: GIoU < 0
    grads = []
    for fn in (lambda x, y: torch.diag(generalized_box_iou(x, y)), paired_generalized_box_iou):
        x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
        out = fn(x, y)
        (out * torch.linspace(-1, 1, 40)).sum().backward()
        grads.append((out.detach(), x.grad, y.grad))
    for new, old in zip(grads[1], grads[0]):
        assert torch.equal(new, old)
    assert (grads[1][0][30:] < 0).all() and torch.allclose(grads[1][0][:10], torch.ones(10))
