"""Multi-scale deformable attention (Zhu et al., 2021): the sampling core and the module.

The core gathers, for every query q, head m, level l and point k, a bilinear sample of the
head's value map at ``sampling_locations[b,q,m,l,k]`` and sums the samples weighted by
``attention_weights[b,q,m,l,k]``. Its plain ``grid_sample`` form below is the spec and the
CPU path; CUDA tensors go to the Triton kernel in :mod:`msda_triton` (no compiled extension).
Both run in fp32 inside autocast (the official op has no half kernel either).
:func:`reference_mode` forces the ``grid_sample`` path -- FLOPs are counted on it, as the
papers' fvcore scripts did (:mod:`effdetr.evaluation.flops` registers ``grid_sampler_2d``).

Conventions (as the official op): value [B,S,M,D] with S = sum of H_l*W_l tokens in level
order; spatial_shapes [L,2] as (H_l, W_l); locations in [0,1]^2 as (x, y) of the padded map,
pixel centres at (i + 0.5) / W (``align_corners=False``), zeros outside.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_FORCE_REFERENCE = False


@contextlib.contextmanager
def reference_mode():
    """Run every MSDA core through the ``grid_sample`` reference inside this block."""
    global _FORCE_REFERENCE
    prev, _FORCE_REFERENCE = _FORCE_REFERENCE, True
    try:
        yield
    finally:
        _FORCE_REFERENCE = prev


def counting_flops() -> bool:
    """Inside :func:`reference_mode` (the FLOPs counter): ops keep the form it counts."""
    return _FORCE_REFERENCE


def sample_points(value: Tensor, spatial_shapes: list[tuple[int, int]], sampling_locations: Tensor) -> Tensor:
    """Bilinear samples of each head's value map: value [B,S,M,D], locations [B,Q,M,L,K,2]
    -> [B*M, D, Q, L*K] (the sampling half of MSDA; key-aware attention reuses it)."""
    b, _, m, d = value.shape
    per_level = value.split([h * w for h, w in spatial_shapes], dim=1)
    grids = 2 * sampling_locations - 1
    samples = []
    for lvl, (h, w) in enumerate(spatial_shapes):
        v = per_level[lvl].flatten(2).transpose(1, 2).reshape(b * m, d, h, w)
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)  # [B*M, Q, K, 2]
        samples.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    return torch.stack(samples, dim=-2).flatten(-2)


def msda_reference(value: Tensor, spatial_shapes: list[tuple[int, int]], sampling_locations: Tensor,
                   attention_weights: Tensor) -> Tensor:
    """value [B,S,M,D], locations [B,Q,M,L,K,2], weights [B,Q,M,L,K] -> [B,Q,M*D]."""
    b, _, m, d = value.shape
    q = sampling_locations.shape[1]
    weights = attention_weights.transpose(1, 2).reshape(b * m, 1, q, -1)
    out = (sample_points(value, spatial_shapes, sampling_locations) * weights).sum(-1)  # [B*M, D, Q]
    return out.view(b, m * d, q).transpose(1, 2).contiguous()


def _use_triton(value: Tensor) -> bool:
    if _FORCE_REFERENCE or not value.is_cuda:
        return False
    from . import msda_triton
    return msda_triton.available()


def ms_deform_attn(value: Tensor, spatial_shapes: list[tuple[int, int]], sampling_locations: Tensor,
                   attention_weights: Tensor) -> Tensor:
    """The MSDA core, fp32, dispatched by device (Triton on CUDA, ``grid_sample`` otherwise)."""
    with torch.autocast(value.device.type, enabled=False):
        args = (value.float(), spatial_shapes, sampling_locations.float(), attention_weights.float())
        if _use_triton(value):
            from .msda_triton import msda_triton
            return msda_triton(*args)
        return msda_reference(*args)


def level_start_index(spatial_shapes: list[tuple[int, int]]) -> list[int]:
    starts, total = [], 0
    for h, w in spatial_shapes:
        starts.append(total)
        total += h * w
    return starts


class MSDeformAttn(nn.Module):
    """Deformable attention of queries over a multi-scale value map.

    Offsets and weights are linear in the query. ``reference_points`` [B,Q,L,2] are points
    (offsets are divided by each level's (W, H)) or [B,Q,L,4] boxes (offsets are scaled by
    half the box size / num_points), all in [0,1] of the padded maps.
    """

    def __init__(self, dim: int = 256, heads: int = 8, levels: int = 4, points: int = 4):
        super().__init__()
        if dim % heads:
            raise ValueError(f"hidden_dim {dim} is not divisible by nheads {heads}")
        self.dim, self.heads, self.levels, self.points = dim, heads, levels, points
        self.sampling_offsets = nn.Linear(dim, heads * levels * points * 2)
        self.attention_weights = nn.Linear(dim, heads * levels * points)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Deformable DETR's init: head m's k-th point starts (k+1) cells along direction
        2*pi*m/M (larger |coordinate| scaled to 1), uniform attention weights."""
        nn.init.zeros_(self.sampling_offsets.weight)
        theta = torch.arange(self.heads, dtype=torch.float32) * (2 * math.pi / self.heads)
        grid = torch.stack([theta.cos(), theta.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True)[0]
        grid = grid.view(self.heads, 1, 1, 2).repeat(1, self.levels, self.points, 1)
        grid = grid * torch.arange(1, self.points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        for lin in (self.attention_weights,):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)
        for lin in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def sample(self, query: Tensor, reference_points: Tensor, spatial_shapes) -> tuple[Tensor, Tensor]:
        """-> sampling locations [B,Q,M,L,K,2] and attention weights [B,Q,M,L,K]."""
        b, q, _ = query.shape
        m, nl, k = self.heads, self.levels, self.points
        weights = self.attention_weights(query).view(b, q, m, nl * k).softmax(-1).view(b, q, m, nl, k)
        return self.locations(query, reference_points, spatial_shapes), weights

    def locations(self, query: Tensor, reference_points: Tensor, spatial_shapes) -> Tensor:
        """Sampling locations [B,Q,M,L,K,2]: reference + predicted offsets."""
        b, q, _ = query.shape
        k = self.points
        offsets = self.sampling_offsets(query).view(b, q, self.heads, self.levels, k, 2)
        if reference_points.shape[-1] == 2:
            wh = torch.tensor([[w, h] for h, w in spatial_shapes], dtype=offsets.dtype, device=offsets.device)
            loc = reference_points[:, :, None, :, None, :] + offsets / wh[None, None, None, :, None, :]
        else:
            ref = reference_points[:, :, None, :, None, :]
            loc = ref[..., :2] + offsets / k * ref[..., 2:] * 0.5
        return loc

    def forward(self, query: Tensor, reference_points: Tensor, value_in: Tensor,
                spatial_shapes: list[tuple[int, int]], value_padding: Tensor | None = None,
                return_sampling: bool = False):
        """query [B,Q,C]; value_in [B,S,C]; value_padding [B,S] True on padding -> [B,Q,C]
        (and, with ``return_sampling``, the (locations, weights) used: Sparse DETR's DAM)."""
        b, s, _ = value_in.shape
        value = self.value_proj(value_in)
        if value_padding is not None:
            value = value.masked_fill(value_padding[..., None], 0.0)
        value = value.view(b, s, self.heads, self.dim // self.heads)
        loc, weights = self.sample(query, reference_points, spatial_shapes)
        out = self.output_proj(ms_deform_attn(value, spatial_shapes, loc, weights).to(query.dtype))
        return (out, (loc, weights)) if return_sampling else out
