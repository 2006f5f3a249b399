"""MSDA core in Triton: the fast CUDA path of :func:`effdetr.ops.msda.ms_deform_attn`.

One program handles BLOCK_Q queries of one (image, head): it walks the L x K sampling
points, gathers the four bilinear corners as contiguous D-vectors of the [B,S,M,D] value
tensor and accumulates in fp32 registers -- the value map is read once per corner and never
materialised per level (the ``grid_sample`` reference copies it L times and writes a
[B*M, D, Q, L*K] sample tensor). The backward pass recomputes the corners, writes the
location and weight gradients directly (each (q, m, l, k) belongs to one program) and
scatters value gradients with fp32 atomics, like the official CUDA op; it is therefore not
bitwise deterministic on GPU.

Semantics are exactly the reference's (``grid_sample``, bilinear, zero padding,
``align_corners=False``); tests check parity in float64 (GPU) and through Triton's
interpreter on CPU (``TRITON_INTERPRET=1``).
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with CUDA builds of torch
    triton = None


def available() -> bool:
    return triton is not None


if triton is not None:

    @triton.jit
    def _corner(value_ptr, row_base, start, xi, yi, w_l, h_l, d, mask_q, mask_d, stride_s):
        """Value vectors [BLOCK_Q, BLOCK_D] at integer cell (xi, yi) of a level (0 outside)."""
        inside = (xi >= 0) & (xi < w_l) & (yi >= 0) & (yi < h_l) & mask_q
        token = start + yi * w_l + xi
        ptr = value_ptr + (row_base + token.to(tl.int64) * stride_s)[:, None] + d[None, :]
        return tl.load(ptr, mask=inside[:, None] & mask_d[None, :], other=0.0)

    @triton.jit
    def _sample(value_ptr, loc_ptr, attn_ptr, idx, row_base, start, h_l, w_l, d, mask_q, mask_d, stride_s):
        """One sampling point for BLOCK_Q queries: its weight, the bilinear fractions, the
        top-left cell and the four corner value vectors (pixel centres at x*W - 0.5)."""
        a = tl.load(attn_ptr + idx, mask=mask_q, other=0.0)
        x = tl.load(loc_ptr + 2 * idx, mask=mask_q, other=0.0) * w_l - 0.5
        y = tl.load(loc_ptr + 2 * idx + 1, mask=mask_q, other=0.0) * h_l - 0.5
        x0f, y0f = tl.floor(x), tl.floor(y)
        x0, y0 = x0f.to(tl.int32), y0f.to(tl.int32)
        v00 = _corner(value_ptr, row_base, start, x0, y0, w_l, h_l, d, mask_q, mask_d, stride_s)
        v01 = _corner(value_ptr, row_base, start, x0 + 1, y0, w_l, h_l, d, mask_q, mask_d, stride_s)
        v10 = _corner(value_ptr, row_base, start, x0, y0 + 1, w_l, h_l, d, mask_q, mask_d, stride_s)
        v11 = _corner(value_ptr, row_base, start, x0 + 1, y0 + 1, w_l, h_l, d, mask_q, mask_d, stride_s)
        return a, x - x0f, y - y0f, x0, y0, v00, v01, v10, v11

    @triton.jit
    def _program_rows(S, Q, M, D: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr):
        """This program's BLOCK_Q queries of one (image b, head m): channel offsets, masks,
        value[b, :, m] base (value[b, s, m, :] lives at ((b*S + s)*M + m)*D), token stride
        and the flat (b, q, m) index of each query."""
        pid_q, bm = tl.program_id(0), tl.program_id(1)
        b, m = bm // M, bm % M
        q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
        d = tl.arange(0, BLOCK_D)
        row_base = (b.to(tl.int64) * S * M + m) * D
        return d, q < Q, d < D, row_base, M * D, (b.to(tl.int64) * Q + q) * M + m

    @triton.jit
    def _msda_fwd_kernel(value_ptr, shapes_ptr, starts_ptr, loc_ptr, attn_ptr, out_ptr,
                         S, Q, M, L: tl.constexpr, K: tl.constexpr, D: tl.constexpr,
                         BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr):
        d, mask_q, mask_d, row_base, stride_s, qm = _program_rows(S, Q, M, D, BLOCK_Q, BLOCK_D)
        acc = tl.zeros([BLOCK_Q, BLOCK_D], dtype=value_ptr.dtype.element_ty)
        for lvl in tl.static_range(L):
            h_l = tl.load(shapes_ptr + 2 * lvl)
            w_l = tl.load(shapes_ptr + 2 * lvl + 1)
            start = tl.load(starts_ptr + lvl)
            for k in tl.static_range(K):
                idx = (qm * L + lvl) * K + k
                a, fx, fy, x0, y0, v00, v01, v10, v11 = _sample(value_ptr, loc_ptr, attn_ptr, idx, row_base, start,
                                                                h_l, w_l, d, mask_q, mask_d, stride_s)
                top = v00 * (1 - fx)[:, None] + v01 * fx[:, None]
                bottom = v10 * (1 - fx)[:, None] + v11 * fx[:, None]
                acc += (top * (1 - fy)[:, None] + bottom * fy[:, None]) * a[:, None]
        out_ptrs = out_ptr + (qm * D)[:, None] + d[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_q[:, None] & mask_d[None, :])

    @triton.jit
    def _scatter(grad_value_ptr, row_base, start, xi, yi, w_l, h_l, d, mask_q, mask_d, contrib, stride_s):
        inside = (xi >= 0) & (xi < w_l) & (yi >= 0) & (yi < h_l) & mask_q
        token = start + yi * w_l + xi
        ptr = grad_value_ptr + (row_base + token.to(tl.int64) * stride_s)[:, None] + d[None, :]
        tl.atomic_add(ptr, contrib, mask=inside[:, None] & mask_d[None, :])

    @triton.jit
    def _msda_bwd_kernel(value_ptr, shapes_ptr, starts_ptr, loc_ptr, attn_ptr, grad_out_ptr,
                         grad_value_ptr, grad_loc_ptr, grad_attn_ptr,
                         S, Q, M, L: tl.constexpr, K: tl.constexpr, D: tl.constexpr,
                         BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr):
        d, mask_q, mask_d, row_base, stride_s, qm = _program_rows(S, Q, M, D, BLOCK_Q, BLOCK_D)
        g = tl.load(grad_out_ptr + (qm * D)[:, None] + d[None, :],
                    mask=mask_q[:, None] & mask_d[None, :], other=0.0)
        for lvl in tl.static_range(L):
            h_l = tl.load(shapes_ptr + 2 * lvl)
            w_l = tl.load(shapes_ptr + 2 * lvl + 1)
            start = tl.load(starts_ptr + lvl)
            for k in tl.static_range(K):
                idx = (qm * L + lvl) * K + k
                a, fx, fy, x0, y0, v00, v01, v10, v11 = _sample(value_ptr, loc_ptr, attn_ptr, idx, row_base, start,
                                                                h_l, w_l, d, mask_q, mask_d, stride_s)
                gx, gy = (1 - fx)[:, None], (1 - fy)[:, None]
                fx2, fy2 = fx[:, None], fy[:, None]
                sample = (v00 * gx + v01 * fx2) * gy + (v10 * gx + v11 * fx2) * fy2
                tl.store(grad_attn_ptr + idx, tl.sum(g * sample, axis=1), mask=mask_q)
                # d sample / d x (pixels) and / d y; locations were scaled by (W, H)
                dsx = (v01 - v00) * gy + (v11 - v10) * fy2
                dsy = (v10 - v00) * gx + (v11 - v01) * fx2
                tl.store(grad_loc_ptr + 2 * idx, a * w_l * tl.sum(g * dsx, axis=1), mask=mask_q)
                tl.store(grad_loc_ptr + 2 * idx + 1, a * h_l * tl.sum(g * dsy, axis=1), mask=mask_q)
                ga = g * a[:, None]
                _scatter(grad_value_ptr, row_base, start, x0, y0, w_l, h_l, d, mask_q, mask_d, ga * gx * gy, stride_s)
                _scatter(grad_value_ptr, row_base, start, x0 + 1, y0, w_l, h_l, d, mask_q, mask_d, ga * fx2 * gy, stride_s)
                _scatter(grad_value_ptr, row_base, start, x0, y0 + 1, w_l, h_l, d, mask_q, mask_d, ga * gx * fy2, stride_s)
                _scatter(grad_value_ptr, row_base, start, x0 + 1, y0 + 1, w_l, h_l, d, mask_q, mask_d,
                         ga * fx2 * fy2, stride_s)


@functools.lru_cache(maxsize=64)
def _level_tables(spatial_shapes: tuple, device: str):
    shapes = torch.tensor(spatial_shapes, dtype=torch.int32, device=device).flatten()
    starts, total = [], 0
    for h, w in spatial_shapes:
        starts.append(total)
        total += h * w
    return shapes, torch.tensor(starts, dtype=torch.int32, device=device)


def _launch_config(q: int, d: int) -> tuple[int, int]:
    block_d = triton.next_power_of_2(d)
    block_q = max(1, min(64, 4096 // block_d, triton.next_power_of_2(q)))
    return block_q, block_d


class _MSDAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, value, spatial_shapes, locations, weights):
        value, locations, weights = value.contiguous(), locations.contiguous(), weights.contiguous()
        b, s, m, d = value.shape
        q, nl, k = locations.shape[1], locations.shape[3], locations.shape[4]
        shapes, starts = _level_tables(tuple(map(tuple, spatial_shapes)), str(value.device))
        out = torch.empty(b, q, m, d, dtype=value.dtype, device=value.device)
        block_q, block_d = _launch_config(q, d)
        grid = (triton.cdiv(q, block_q), b * m)
        _msda_fwd_kernel[grid](value, shapes, starts, locations, weights, out, s, q, m, nl, k, d,
                               BLOCK_Q=block_q, BLOCK_D=block_d)
        ctx.save_for_backward(value, locations, weights)
        ctx.spatial_shapes = spatial_shapes
        return out.view(b, q, m * d)

    @staticmethod
    def backward(ctx, grad_out):
        value, locations, weights = ctx.saved_tensors
        b, s, m, d = value.shape
        q, nl, k = locations.shape[1], locations.shape[3], locations.shape[4]
        shapes, starts = _level_tables(tuple(map(tuple, ctx.spatial_shapes)), str(value.device))
        grad_value = torch.zeros_like(value)
        grad_loc = torch.empty_like(locations)
        grad_attn = torch.empty_like(weights)
        block_q, block_d = _launch_config(q, d)
        grid = (triton.cdiv(q, block_q), b * m)
        _msda_bwd_kernel[grid](value, shapes, starts, locations, weights, grad_out.contiguous(),
                               grad_value, grad_loc, grad_attn, s, q, m, nl, k, d,
                               BLOCK_Q=block_q, BLOCK_D=block_d)
        return grad_value, None, grad_loc, grad_attn


def msda_triton(value: Tensor, spatial_shapes, sampling_locations: Tensor, attention_weights: Tensor) -> Tensor:
    """Same contract as :func:`effdetr.ops.msda.msda_reference`."""
    if triton is None:
        raise RuntimeError("triton is not installed; use the grid_sample reference")
    return _MSDAFunction.apply(value, spatial_shapes, sampling_locations, attention_weights)
