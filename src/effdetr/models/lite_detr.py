"""Lite DETR's interleaved multi-scale encoder (Li et al., 2023).

The coarsest H scales ("high-level", ~5-25 % of the tokens) are updated A times per block,
each time attending to every scale; then the remaining fine ("low-level") tokens are updated
once, attending to the map that now holds the new high-level tokens. B blocks. Every update
is a deformable encoder layer of its own (A*B + B layers), queries at their own token
locations; the tokens not being updated stay as they are and remain keys/values.
"""
from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from .deformable_transformer import DeformableEncoderLayer, token_centres


class InterleavedEncoder(nn.Module):
    def __init__(self, layer: DeformableEncoderLayer, levels: int, high_levels: int, blocks: int,
                 high_updates: int):
        super().__init__()
        if not 1 <= high_levels < levels:
            raise ValueError(f"high_levels must be in [1, {levels - 1}] for {levels} levels, got {high_levels}")
        if blocks < 1 or high_updates < 1:
            raise ValueError(f"blocks and high_updates must be >= 1, got {blocks} and {high_updates}")
        self.levels, self.high_levels, self.blocks, self.high_updates = levels, high_levels, blocks, high_updates
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(blocks * (high_updates + 1)))

    def split(self, spatial_shapes: list[tuple[int, int]]) -> int:
        """Index of the first high-level token (levels are ordered fine to coarse)."""
        return sum(h * w for h, w in spatial_shapes[: self.levels - self.high_levels])

    def schedule(self) -> list[str]:
        """Which token group each layer updates, in order ("high" / "low")."""
        return (["high"] * self.high_updates + ["low"]) * self.blocks

    def forward(self, src: Tensor, pos: Tensor, spatial_shapes, padding, ratios, **_) -> Tensor:
        """src/pos [B,S,C] -> the updated map [B,S,C] (same contract as DeformableEncoder)."""
        cut = self.split(spatial_shapes)
        refs = token_centres(spatial_shapes, ratios)[:, :, None] * ratios[:, None]
        for layer, group in zip(self.layers, self.schedule()):
            part = slice(cut, None) if group == "high" else slice(0, cut)
            updated = layer(src[:, part], pos[:, part], refs[:, part], src, spatial_shapes, padding)
            src = torch.cat([src[:, :cut], updated] if group == "high" else [updated, src[:, cut:]], 1)
        return src
