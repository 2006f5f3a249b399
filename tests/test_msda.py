"""MSDeformAttn core: the grid_sample reference against a per-sample bilinear loop, its
gradients, the Triton kernel (GPU, or Triton's interpreter on CPU) against the reference,
and the FLOPs convention."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from effdetr.ops.msda import MSDeformAttn, ms_deform_attn, msda_reference, reference_mode

SHAPES = [(5, 7), (3, 4), (1, 1)]


def bilinear_loop(value, shapes, loc, weights):
    """out[b,q,m*D+d] = sum_l,k w * bilinear(value_l, x*W-0.5, y*H-0.5), zeros outside."""
    b, _, m, d = value.shape
    q, k = loc.shape[1], loc.shape[4]
    out = torch.zeros(b, q, m, d, dtype=torch.float64)
    starts = [0]
    for h, w in shapes:
        starts.append(starts[-1] + h * w)
    for bi in range(b):
        for qi in range(q):
            for mi in range(m):
                for li, (h, w) in enumerate(shapes):
                    for ki in range(k):
                        x = float(loc[bi, qi, mi, li, ki, 0]) * w - 0.5
                        y = float(loc[bi, qi, mi, li, ki, 1]) * h - 0.5
                        x0, y0 = int(torch.floor(torch.tensor(x))), int(torch.floor(torch.tensor(y)))
                        for xi, yi in ((x0, y0), (x0 + 1, y0), (x0, y0 + 1), (x0 + 1, y0 + 1)):
                            if 0 <= xi < w and 0 <= yi < h:
                                cw = (1 - abs(x - xi)) * (1 - abs(y - yi))
                                out[bi, qi, mi] += float(weights[bi, qi, mi, li, ki]) * cw * \
                                    value[bi, starts[li] + yi * w + xi, mi].double()
    return out.view(b, q, m * d)


def inputs(seed=0, b=2, q=6, m=3, d=5, k=2, dtype=torch.float64, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    s = sum(h * w for h, w in shapes)
    value = torch.randn(b, s, m, d, generator=g, dtype=dtype)
    loc = torch.rand(b, q, m, len(shapes), k, 2, generator=g, dtype=dtype) * 1.4 - 0.2  # some outside
    weights = torch.rand(b, q, m, len(shapes), k, generator=g, dtype=dtype)
    return value, loc, weights


def test_reference_matches_bilinear_loop_at_odd_sizes():
    for seed, shapes in ((0, SHAPES), (1, [(2, 9), (4, 3)])):
        value, loc, weights = inputs(seed, shapes=shapes)
        got = msda_reference(value, shapes, loc, weights)
        torch.testing.assert_close(got, bilinear_loop(value, shapes, loc, weights), rtol=1e-10, atol=1e-10)


def test_reference_gradcheck():
    value, loc, weights = inputs(3, b=1, q=3, m=2, d=3)
    loc = loc.clamp(0.05, 0.95)  # keep samples off cell borders where bilinear is not differentiable
    args = [t.requires_grad_() for t in (value, loc, weights)]
    assert torch.autograd.gradcheck(lambda v, lo, w: msda_reference(v, SHAPES, lo, w), args, eps=1e-6, atol=1e-5)


def test_core_runs_fp32_inside_autocast():
    """Inside a bf16 autocast region the core still computes in fp32 and agrees with the
    independent float64 bilinear loop (on the bf16-rounded values it was given). Catches a
    core that runs in bf16 (errors ~1e-2) and, unlike a comparison with ``msda_reference``
    itself, any sampling-convention bug shared by the reference (align_corners, x/y swap)."""
    value, loc, weights = inputs(4, b=1, q=3, m=2, d=3, dtype=torch.float32)
    value16 = value.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ms_deform_attn(value16, SHAPES, loc, weights)
    assert out.dtype == torch.float32
    expected = bilinear_loop(value16.double(), SHAPES, loc.double(), weights.double())
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_module_point_and_box_references():
    torch.manual_seed(0)
    attn = MSDeformAttn(dim=24, heads=3, levels=3, points=2)
    s = sum(h * w for h, w in SHAPES)
    query, values = torch.randn(2, 4, 24), torch.randn(2, s, 24)
    pts = torch.rand(2, 4, 3, 2)
    out, (loc, w) = attn(query, pts, values, SHAPES, return_sampling=True)
    assert out.shape == (2, 4, 24) and loc.shape == (2, 4, 3, 3, 2, 2) and w.shape == (2, 4, 3, 3, 2)
    torch.testing.assert_close(w.sum((-1, -2)), torch.ones(2, 4, 3))
    # at init, head 0 (angle 0) samples point k at +(k+1) cells along x on every level
    h, wd = SHAPES[0]
    torch.testing.assert_close(loc[:, :, 0, 0, 1, 0], pts[:, :, 0, 0] + 2 / wd)
    torch.testing.assert_close(loc[:, :, 0, 0, 1, 1], pts[:, :, 0, 1])
    boxes = torch.cat([torch.rand(2, 4, 3, 2), torch.full((2, 4, 3, 2), 0.2)], -1)
    _, (loc_b, _) = attn(query, boxes, values, SHAPES, return_sampling=True)
    # box reference: offset / points * half the box size
    torch.testing.assert_close(loc_b[:, :, 0, 0, 1, 0], boxes[:, :, 0, 0] + 2 / 2 * 0.2 * 0.5)
    with pytest.raises(ValueError, match="not divisible"):
        MSDeformAttn(dim=10, heads=3)


def test_flops_charge_four_macs_per_sampled_element():
    from effdetr.evaluation.flops import register_extra_formulas
    from torch.utils.flop_counter import FlopCounterMode
    register_extra_formulas()
    value, loc, weights = inputs(5, dtype=torch.float32)
    with FlopCounterMode(display=False) as counter, reference_mode():
        ms_deform_attn(value, SHAPES, loc, weights)
    b, q, m, nl, k, _ = loc.shape
    assert counter.get_total_flops() == 2 * 4 * b * q * m * nl * k * value.shape[-1]


TRITON_CHECK = textwrap.dedent("""
    import torch
    from effdetr.ops.msda import msda_reference
    from effdetr.ops.msda_triton import msda_triton
    g = torch.Generator().manual_seed(0)
    for shapes, m, d, k in (([(5, 7), (3, 4), (1, 1)], 3, 5, 2), ([(2, 9)], 2, 33, 3)):
        s = sum(h * w for h, w in shapes)
        value = torch.randn(2, s, m, d, generator=g, dtype=torch.float64, requires_grad=True)
        loc = (torch.rand(2, 7, m, len(shapes), k, 2, generator=g, dtype=torch.float64) * 1.4 - 0.2).requires_grad_()
        w = torch.rand(2, 7, m, len(shapes), k, generator=g, dtype=torch.float64, requires_grad=True)
        ref, got = msda_reference(value, shapes, loc, w), msda_triton(value, shapes, loc, w)
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
        grad = torch.randn(ref.shape, generator=g, dtype=torch.float64)
        for a, b in zip(torch.autograd.grad(ref, (value, loc, w), grad), torch.autograd.grad(got, (value, loc, w), grad)):
            torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-9)
    print("ok")
""")


def test_triton_kernel_matches_reference_in_interpreter():
    """The Triton kernels' logic, run by Triton's CPU interpreter (float64)."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-c", TRITON_CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]


def gpu(test):
    """The declared ``gpu`` marker (so ``-m gpu`` selects these), skipped without CUDA."""
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")(test))


@gpu
def test_triton_matches_reference_on_gpu():
    from effdetr.ops.msda_triton import msda_triton
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-4)):
        for shapes, m, d in ((SHAPES, 3, 5), ([(13, 21), (7, 11)], 8, 32)):
            value, loc, weights = (t.cuda() for t in inputs(7, q=50, m=m, d=d, dtype=dtype, shapes=shapes))
            args = [t.requires_grad_() for t in (value, loc, weights)]
            ref, got = msda_reference(args[0], shapes, *args[1:]), msda_triton(args[0], shapes, *args[1:])
            torch.testing.assert_close(got, ref, rtol=tol, atol=tol)
            grad = torch.randn_like(ref)
            for a, b in zip(torch.autograd.grad(ref, args, grad), torch.autograd.grad(got, args, grad)):
                torch.testing.assert_close(b, a, rtol=tol * 10, atol=tol * 10)


@gpu
def test_triton_gradcheck_on_gpu():
    from effdetr.ops.msda_triton import msda_triton
    value, loc, weights = (t.cuda() for t in inputs(8, b=1, q=3, m=2, d=3))
    loc = loc.clamp(0.05, 0.95)
    args = [t.requires_grad_() for t in (value, loc, weights)]
    assert torch.autograd.gradcheck(lambda v, lo, w: msda_triton(v, SHAPES, lo, w), args, eps=1e-6, atol=1e-5)


@gpu
def test_dispatch_uses_triton_on_cuda_and_reference_in_reference_mode(monkeypatch):
    from effdetr.ops import msda_triton as mt
    calls = []
    monkeypatch.setattr(mt, "msda_triton", lambda *a: calls.append(1) or msda_reference(*a))
    value, loc, weights = (t.cuda().float() for t in inputs(9))
    ms_deform_attn(value, SHAPES, loc, weights)
    with reference_mode():
        ms_deform_attn(value, SHAPES, loc, weights)
    assert calls == [1]
