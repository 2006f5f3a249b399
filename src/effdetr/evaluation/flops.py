"""FLOPs and parameter counts in the papers' convention (one multiply-add = one "FLOP").

Built on ``torch.utils.flop_counter.FlopCounterMode`` (which counts 2 per multiply-add, so
we halve it). Like fvcore/Detectron2's counter, only matrix products and convolutions are
charged; normalisation, softmax and element-wise ops are not. Ops the counter does not
know are given formulas in :data:`EXTRA_FORMULAS` (CPU fused attention; ``grid_sampler_2d`` in fvcore's
convention, which is how MSDeformAttn is charged). Data-dependent kernels (ACT) report their own exact
count, which replaces what the counter saw inside them (:func:`apply_exact_counts`). Counts are split by top-level module:
backbone, encoder, decoder, and the rest ("heads": input projection, box/class heads).
"""
from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula

from ..models import build_model
from ..ops.msda import reference_mode

_REGISTERED = False


def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    b, h, nq, d = query_shape
    nk, dv = key_shape[-2], value_shape[-1]
    return 2 * b * h * nq * nk * d + 2 * b * h * nq * nk * dv


def register_extra_formulas() -> None:
    """Register formulas for ops FlopCounterMode misses (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu

    @register_flop_formula(op)
    def _(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
        return _sdpa_cpu_flops(query_shape, key_shape, value_shape)

    @register_flop_formula(torch.ops.aten.grid_sampler_2d)
    def _(input_shape, grid_shape, *args, out_shape=None, **kwargs):
        # fvcore's bilinear grid_sampler handle: 4 multiply-adds per output element (the
        # four corners); MSDA's attention-weighted sum over samples is not charged.
        b, c = input_shape[:2]
        return 2 * 4 * b * c * grid_shape[1] * grid_shape[2]

    _REGISTERED = True


def _subtree(table: dict, prefix: str) -> int:
    """Sum a module subtree: the shallowest tracked modules at or under ``prefix``
    (a ModuleList is never called itself, so its children are the tracked entries)."""
    keys = [k for k in table if k == prefix or k.startswith(prefix + ".")]
    top = [k for k in keys if not any(o != k and k.startswith(o + ".") for o in keys)]
    return sum(sum(table[k].values()) for k in top)


def split_counts(table: dict, model_name: str, parts: dict[str, str]) -> dict[str, float]:
    """Per-part GMACs from the counter's module table; parts maps label -> attribute path."""
    total = sum(table.get("Global", {}).values())
    out, assigned = {}, 0
    for label, attr in parts.items():
        v = _subtree(table, f"{model_name}.{attr}")
        out[label] = v / 2e9
        assigned += v
    out["heads"] = (total - assigned) / 2e9
    out["total"] = total / 2e9
    return out


def apply_exact_counts(table: dict, model: torch.nn.Module) -> None:
    """Data-dependent kernels (ACT, K-means) know their own cost: a module with an
    ``exact_macs()`` method has what the counter measured inside it (padded prototype
    batches, hashing) replaced by that number, in itself and in every enclosing module."""
    root = type(model).__name__
    for name, module in model.named_modules():
        if not callable(getattr(module, "exact_macs", None)):
            continue
        path = f"{root}.{name}"
        if path not in table:
            continue
        delta = 2 * module.exact_macs() - sum(table[path].values())  # the counter counts 2 per MAC
        for key in list(table):
            if key == "Global" or key == path or path.startswith(key + "."):
                table[key]["exact_kernel_correction"] = table[key].get("exact_kernel_correction", 0) + delta


@torch.no_grad()
def count_flops(model: torch.nn.Module, images: torch.Tensor, masks: torch.Tensor,
                parts: dict[str, str], outputs: dict | None = None) -> dict[str, float]:
    """GMACs per part of one forward pass (MSDA on its grid_sample path, as the papers'
    scripts counted it); ``outputs`` (if given) receives the model's output dict."""
    register_extra_formulas()
    model.eval()
    grads = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)  # the counter's module tracker trips over leaf params under no_grad
    counter = FlopCounterMode(display=False)
    try:
        with counter, reference_mode():
            result = model(images, masks)
        if outputs is not None:
            outputs.update(result)
    finally:
        for p, g in zip(model.parameters(), grads):
            p.requires_grad_(g)
    table = {k: dict(v) for k, v in counter.get_flop_counts().items()}
    apply_exact_counts(table, model)
    return split_counts(table, type(model).__name__, parts)


def token_shares(model, outputs: dict) -> dict[str, float]:
    """Percent of the encoder's tokens on each level, keyed by nominal stride (s8 = C3, the
    papers' S4 on a 4-scale model); empty for single-scale models."""
    counts, strides = outputs.get("level_tokens"), getattr(model, "level_strides", None)
    if counts is None or strides is None:
        return {}
    total = float(counts.sum())
    return {f"token_share_s{st}": 100.0 * float(c) / total for st, c in zip(strides, counts)}


def count_model(model_cfg, input_sizes: list[list[int]]) -> dict:
    """Mean GMACs over the given (h, w) inputs (batch 1) and trainable params of a config."""
    torch.manual_seed(0)
    model = build_model(model_cfg)
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    all_params = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    sums: dict[str, float] = {}
    shares: dict[str, float] = {}
    for h, w in input_sizes:
        img = torch.randn(1, 3, h, w)
        mask = torch.zeros(1, h, w, dtype=torch.bool)
        outputs: dict = {}
        for k, v in count_flops(model, img, mask, model.flops_parts, outputs).items():
            sums[k] = sums.get(k, 0.0) + v / len(input_sizes)
        for k, v in token_shares(model, outputs).items():
            shares[k] = shares.get(k, 0.0) + v / len(input_sizes)
    return {"gmacs": sums, "params_m": params / 1e6, "params_all_m": all_params / 1e6, **shares}
