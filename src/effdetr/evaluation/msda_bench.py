"""Benchmark of the MSDA core: grid_sample reference vs the Triton path (vs the official
CUDA op when its ``MultiScaleDeformableAttention`` extension is importable).

Default shape = DESIGN.md's anchor: batch 2, an 800x1333 image's four levels (22,223 tokens)
as both queries and values, 8 heads x 32 channels, 4 levels x 4 points, fp32. Timing: CUDA
events around each call after warm-up, median of ``repeats``; forward alone and forward +
backward (gradients w.r.t. value, locations and weights).
"""
from __future__ import annotations

import statistics
import time

import torch

from ..ops.msda import msda_reference

ANCHOR_SHAPES = [(100, 167), (50, 84), (25, 42), (13, 21)]


def make_inputs(batch: int, shapes, heads: int, channels: int, points: int, device, dtype=torch.float32, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    tokens = sum(h * w for h, w in shapes)
    value = torch.randn(batch, tokens, heads, channels, generator=g, dtype=dtype)
    loc = torch.rand(batch, tokens, heads, len(shapes), points, 2, generator=g, dtype=dtype)
    weights = torch.rand(batch, tokens, heads, len(shapes), points, generator=g, dtype=dtype)
    weights = weights / weights.sum((-1, -2), keepdim=True)
    return [t.to(device).requires_grad_() for t in (value, loc, weights)]


def _official():
    try:
        import MultiScaleDeformableAttention as MSDA  # noqa: N813 - the extension's own name
    except ImportError:
        return None

    def run(value, shapes, loc, weights):
        ss = torch.tensor(shapes, dtype=torch.long, device=value.device)
        start = torch.cat([ss.new_zeros(1), (ss[:, 0] * ss[:, 1]).cumsum(0)[:-1]])
        return MSDA.ms_deform_attn_forward(value, ss, start, loc, weights, 64)
    return run  # forward only: its backward needs the extension's autograd wrapper


def _time(fn, warmup: int, repeats: int, device) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


def run_benchmark(device: str = "cuda", batch: int = 2, heads: int = 8, channels: int = 32, points: int = 4,
                  warmup: int = 5, repeats: int = 20, shapes=None) -> dict:
    dev = torch.device(device)
    shapes = shapes or ANCHOR_SHAPES
    value, loc, weights = make_inputs(batch, shapes, heads, channels, points, dev)
    impls = {"reference (grid_sample)": msda_reference}
    if dev.type == "cuda":
        from ..ops.msda_triton import available, msda_triton
        if available():
            impls["triton"] = msda_triton
        official = _official()
        if official is not None:
            impls["official CUDA op (forward only)"] = official
    results = {}
    for name, fn in impls.items():
        def fwd():
            with torch.no_grad():
                fn(value, shapes, loc, weights)

        def fwd_bwd():
            out = fn(value, shapes, loc, weights)
            torch.autograd.grad(out.sum(), (value, loc, weights))
        row = {"forward_ms": _time(fwd, warmup, repeats, dev)}
        if "forward only" not in name:
            row["forward_backward_ms"] = _time(fwd_bwd, warmup, repeats, dev)
        results[name] = row
    if "triton" in impls:  # parity at this shape, fp32
        with torch.no_grad():
            ref = msda_reference(value, shapes, loc, weights)
            results["triton"]["max_abs_diff_vs_reference"] = float((impls["triton"](value, shapes, loc, weights)
                                                                     - ref).abs().max())
    return {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
            "shape": {"batch": batch, "tokens": sum(h * w for h, w in shapes), "levels": shapes,
                      "heads": heads, "channels": channels, "points": points, "dtype": "float32"},
            "warmup": warmup, "repeats": repeats, "results": results, "torch": torch.__version__}
