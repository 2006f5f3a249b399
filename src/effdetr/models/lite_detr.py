"""Lite DETR's interleaved multi-scale encoder (Li et al., CVPR 2023).

Tokens of the coarsest H scales ("high-level", ~5-25 % of all tokens) are updated A times per
block, each time attending to every scale; the remaining fine ("low-level") tokens, most of
the map, are updated once per block; B blocks. Queries sit at their own token locations and
every token not being updated stays a key/value.

Two readings of "then update the low-level tokens once" are built (``low_update``):

- ``joint`` (the released code, IDEA-Research/Lite-DETR): a block is A layers; the first A-1
  take only the high-level tokens as queries, the last takes every token, so the A-th
  high-level and the single low-level update share one layer. A*B layers in all; the
  published (2+1)x3 / (3+1)x2 / (6+1)x1 encoders all have 6, as the dense baseline.
- ``separate`` (the paper's Figure 2): A high-level-only layers, then one low-level-only
  layer that sees the updated high-level tokens. A*B + B layers.

Low-level tokens can go through a narrower FFN of their own (``low_ffn_dim``; the released
code's ``small_expand`` uses width = d_model), which is where most of the saving on the
large fine maps comes from.
"""
from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from .deformable_transformer import DeformableEncoderLayer, token_centres
from .transformer import FeedForward

LOW_UPDATES = ("joint", "separate")


class LowLevelFFN(nn.Module):
    """The FFN + norm that low-level queries use instead of their layer's own."""

    def __init__(self, dim: int, ffn_dim: int, dropout: float):
        super().__init__()
        self.ffn, self.norm, self.drop = FeedForward(dim, ffn_dim, dropout), nn.LayerNorm(dim), nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x + self.drop(self.ffn(x)))


class InterleavedEncoder(nn.Module):
    def __init__(self, layer: DeformableEncoderLayer, levels: int, high_levels: int, blocks: int,
                 high_updates: int, low_update: str = "joint", low_ffn_dim: int | None = None):
        super().__init__()
        if not 1 <= high_levels < levels:
            raise ValueError(f"high_levels must be in [1, {levels - 1}] for {levels} levels, got {high_levels}")
        if blocks < 1 or high_updates < 1:
            raise ValueError(f"blocks and high_updates must be >= 1, got {blocks} and {high_updates}")
        if low_update not in LOW_UPDATES:
            raise ValueError(f"low_update must be one of {LOW_UPDATES}, got {low_update!r}")
        self.levels, self.high_levels, self.blocks, self.high_updates = levels, high_levels, blocks, high_updates
        self.low_update = low_update
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(len(self.schedule())))
        dim = layer.norm1.normalized_shape[0]
        self.low_ffns = nn.ModuleDict()
        if low_ffn_dim is not None:  # one per layer that updates low-level tokens
            dropout = layer.drop1.p
            for i, group in enumerate(self.schedule()):
                if group != "high":
                    self.low_ffns[str(i)] = LowLevelFFN(dim, low_ffn_dim, dropout)

    def split(self, spatial_shapes: list[tuple[int, int]]) -> int:
        """Index of the first high-level token (levels are ordered fine to coarse)."""
        return sum(h * w for h, w in spatial_shapes[: self.levels - self.high_levels])

    def schedule(self) -> list[str]:
        """Which tokens each layer takes as queries, in order: "high", "low" or "all"."""
        if self.low_update == "joint":
            return (["high"] * (self.high_updates - 1) + ["all"]) * self.blocks
        return (["high"] * self.high_updates + ["low"]) * self.blocks

    def run_layer(self, i: int, query: Tensor, pos: Tensor, refs: Tensor, src: Tensor, shapes, padding,
                  low: int) -> Tensor:
        """One layer; its first ``low`` queries are low-level (they use the low-level FFN)."""
        layer, low_ffn = self.layers[i], self.low_ffns[str(i)] if str(i) in self.low_ffns else None
        if low_ffn is None or low == 0:
            return layer(query, pos, refs, src, shapes, padding)
        x = layer.attend(query, pos, refs, src, shapes, padding)
        return torch.cat([low_ffn(x[:, :low]), layer.feed_forward(x[:, low:])], 1)

    def forward(self, src: Tensor, pos: Tensor, spatial_shapes, padding, ratios, **_) -> Tensor:
        """src/pos [B,S,C] -> the updated map [B,S,C] (same contract as DeformableEncoder)."""
        cut = self.split(spatial_shapes)
        refs = token_centres(spatial_shapes, ratios)[:, :, None] * ratios[:, None]
        for i, group in enumerate(self.schedule()):
            part = {"high": slice(cut, None), "low": slice(0, cut), "all": slice(None)}[group]
            low = {"high": 0, "low": cut, "all": cut}[group]
            updated = self.run_layer(i, src[:, part], pos[:, part], refs[:, part], src, spatial_shapes, padding, low)
            if group == "high":
                src = torch.cat([src[:, :cut], updated], 1)
            elif group == "low":
                src = torch.cat([updated, src[:, cut:]], 1)
            else:
                src = updated
        return src
