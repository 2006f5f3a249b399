"""Key-aware deformable attention against a per-query, per-head loop."""
import contextlib
import math

import torch

from effdetr.ops.kda import KeyAwareDeformAttn
from effdetr.ops.msda import msda_reference

SHAPES = [(5, 7), (3, 4), (1, 1)]


def bilinear(vmap, x, y):
    """vmap [H,W,D] at continuous pixel coords (x, y), zeros outside."""
    h, w, d = vmap.shape
    out = torch.zeros(d, dtype=torch.float64)
    x0, y0 = math.floor(x), math.floor(y)
    for xi in (x0, x0 + 1):
        for yi in (y0, y0 + 1):
            if 0 <= xi < w and 0 <= yi < h:
                out += (1 - abs(x - xi)) * (1 - abs(y - yi)) * vmap[yi, xi].double()
    return out


def hand_locations(attn: KeyAwareDeformAttn, query, ref):
    """Deformable DETR's sampling locations, element by element and independently of
    ``attn.locations``: location (m, l, k) = reference point + offset / (W_l, H_l), where
    the offset's coordinate c (0 = x, 1 = y) is output ((m*L + l)*K + k)*2 + c of the
    ``sampling_offsets`` linear (the official [.., n_heads, n_levels, n_points, 2] view)."""
    b, q, _ = query.shape
    m, nl, k = attn.heads, attn.levels, attn.points
    weight, bias = attn.sampling_offsets.weight.double(), attn.sampling_offsets.bias.double()
    loc = torch.zeros(b, q, m, nl, k, 2, dtype=torch.float64)
    for bi in range(b):
        for qi in range(q):
            for mi in range(m):
                for li, (h, w) in enumerate(SHAPES):
                    for pi in range(k):
                        for c, extent in ((0, w), (1, h)):
                            row = ((mi * nl + li) * k + pi) * 2 + c
                            offset = float(weight[row] @ query[bi, qi].double() + bias[row])
                            loc[bi, qi, mi, li, pi, c] = float(ref[bi, qi, li, c]) + offset / extent
    return loc


def kda_loop(attn: KeyAwareDeformAttn, query, ref, values_in):
    b, q, _ = query.shape
    m, d = attn.heads, attn.dim // attn.heads
    loc = hand_locations(attn, query, ref)
    v = attn.value_proj(values_in).view(b, -1, m, d)
    k = v if attn.key_proj is None else attn.key_proj(values_in).view(b, -1, m, d)
    qp = attn.query_proj(query).view(b, q, m, d)
    starts = [0, 35, 47]
    out = torch.zeros(b, q, m, d, dtype=torch.float64)
    for bi in range(b):
        for qi in range(q):
            for mi in range(m):
                ks, vs = [], []
                for li, (h, w) in enumerate(SHAPES):
                    vmap = v[bi, starts[li]:starts[li] + h * w, mi].view(h, w, d)
                    kmap = k[bi, starts[li]:starts[li] + h * w, mi].view(h, w, d)
                    for pi in range(attn.points):
                        x = float(loc[bi, qi, mi, li, pi, 0]) * w - 0.5
                        y = float(loc[bi, qi, mi, li, pi, 1]) * h - 0.5
                        vs.append(bilinear(vmap, x, y))
                        ks.append(bilinear(kmap, x, y))
                scores = torch.stack(ks) @ qp[bi, qi, mi].double() / math.sqrt(d)
                out[bi, qi, mi] = scores.softmax(0) @ torch.stack(vs)
    return attn.output_proj(out.view(b, q, m * d).float())


def setup(proj_key, seed=0):
    torch.manual_seed(seed)
    attn = KeyAwareDeformAttn(dim=12, heads=3, levels=3, points=2, proj_key=proj_key)
    with torch.no_grad():
        attn.sampling_offsets.weight.normal_(0, 0.3)
    query, values = torch.randn(2, 4, 12), torch.randn(2, 48, 12)
    return attn, query, torch.rand(2, 4, 3, 2), values


def test_kda_matches_a_per_query_loop_with_and_without_key_projection():
    """KDA against a loop that samples keys and values bilinearly at hand-computed
    Deformable DETR locations and softmaxes q.k/sqrt(d) over the L*K samples. Catches a wrong
    offset normaliser ((H, W) for (W, H)), offset layout, score scale or key/value mix-up."""
    for proj_key in (False, True):
        attn, query, ref, values = setup(proj_key)
        with torch.no_grad():
            torch.testing.assert_close(attn(query, ref, values, SHAPES), kda_loop(attn, query, ref, values),
                                       rtol=1e-4, atol=1e-5)


def test_constant_scores_reduce_kda_to_uniform_deformable_attention():
    attn, query, ref, values = setup(False, seed=1)
    with torch.no_grad():
        attn.query_proj.weight.zero_()
        attn.query_proj.bias.zero_()
        got, (loc, weights) = attn(query, ref, values, SHAPES, return_sampling=True)
        v = attn.value_proj(values).view(2, 48, 3, 4)
        uniform = torch.full((2, 4, 3, 3, 2), 1 / 6)
        expected = attn.output_proj(msda_reference(v, SHAPES, loc, uniform))
    torch.testing.assert_close(weights, uniform)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_kda_has_no_query_only_weight_layer_and_trains():
    attn, query, ref, values = setup(True, seed=2)
    assert not hasattr(attn, "attention_weights")
    attn(query, ref, values, SHAPES).pow(2).sum().backward()
    for name in ("query_proj", "key_proj", "value_proj", "sampling_offsets"):
        assert getattr(attn, name).weight.grad.abs().sum() > 0, name


def test_kda_flops_count_the_key_and_value_products():
    """Counted MACs of KDA minus MSDA's (same sizes): + query projection (Q*C*C) + q.k and
    weights.v (2 * Q*M*L*K*D) - the attention-weight linear (Q*C*M*L*K)."""
    from torch.utils.flop_counter import FlopCounterMode

    from effdetr.evaluation.flops import register_extra_formulas
    from effdetr.ops.msda import MSDeformAttn, reference_mode
    register_extra_formulas()
    c, m, l, k, q = 16, 2, 3, 2, 5
    s = sum(h * w for h, w in SHAPES)
    query, ref, vals = torch.randn(1, q, c), torch.rand(1, q, l, 2), torch.randn(1, s, c)
    counts = {}
    for name, mod in (("msda", MSDeformAttn(c, m, l, k)), ("kda", KeyAwareDeformAttn(c, m, l, k))):
        counter = FlopCounterMode(display=False)
        with counter, reference_mode(), torch.no_grad():
            mod(query, ref, vals, SHAPES)
        counts[name] = counter.get_total_flops() / 2
    d = c // m
    assert counts["kda"] - counts["msda"] == q * c * c + 2 * q * m * l * k * d - q * c * m * l * k


def test_broadcast_products_equal_the_counted_matmul_form_with_gradients():
    """Training runs q.k and weights.v as broadcast products; the FLOPs counter (reference
    mode) as the batched matmuls it counts. Outputs and input gradients agree to ~1e-6: the
    two only sum the D (or L*K) products in another order."""
    from effdetr.ops import msda
    from effdetr.ops.kda import key_aware_weights_and_values
    g = torch.Generator().manual_seed(3)
    qh = torch.randn(6, 40, 16, generator=g, dtype=torch.float64).float()
    samples = torch.randn(6, 16, 40, 12, generator=g)
    results = []
    for counted in (False, True):
        q, s = qh.clone().requires_grad_(), samples.clone().requires_grad_()
        with msda.reference_mode() if counted else contextlib.nullcontext():
            w, out = key_aware_weights_and_values(q, s, s)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append((w, out, q.grad, s.grad))
    for fast, counted in zip(*results):
        torch.testing.assert_close(fast, counted, rtol=1e-5, atol=1e-6)
