"""Deformable DETR's encoder and decoder layers, and the geometry they share.

The encoder updates either every token or, for Sparse DETR, only the tokens listed in
``keep`` (their new values are scattered back; the others stay as they were and remain
keys/values of later layers). All locations are in [0,1] of the *padded* level maps; the
``valid_ratios`` (unpadded fraction of each map) convert from image-normalised coordinates,
as in the official code.
"""
from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn

from ..ops.attention import MultiHeadAttention
from ..ops.msda import MSDeformAttn
from .transformer import FeedForward


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def valid_ratios(masks: list[Tensor]) -> Tensor:
    """Per level, the unpadded (width, height) fraction of the map -> [B,L,2]."""
    out = []
    for m in masks:
        h, w = m.shape[-2:]
        vh = (~m[:, :, 0]).sum(1).float() / h
        vw = (~m[:, 0, :]).sum(1).float() / w
        out.append(torch.stack([vw, vh], -1))
    return torch.stack(out, 1)


def token_centres(spatial_shapes: list[tuple[int, int]], ratios: Tensor) -> Tensor:
    """Each token's cell centre normalised to its image's unpadded extent -> [B,S,2] (x, y)."""
    refs = []
    for lvl, (h, w) in enumerate(spatial_shapes):
        ys, xs = torch.meshgrid(torch.arange(h, device=ratios.device, dtype=torch.float32) + 0.5,
                                torch.arange(w, device=ratios.device, dtype=torch.float32) + 0.5, indexing="ij")
        x = xs.reshape(1, -1) / (ratios[:, lvl, 0:1] * w)
        y = ys.reshape(1, -1) / (ratios[:, lvl, 1:2] * h)
        refs.append(torch.stack([x, y], -1))
    return torch.cat(refs, 1)


def token_proposals(spatial_shapes: list[tuple[int, int]], padding: Tensor) -> tuple[Tensor, Tensor]:
    """Two-stage anchors (the official ``gen_encoder_output_proposals``): a box of side
    0.05 * 2^level at every token centre, the centre divided by the level's unpadded cell
    count, in logit space -> (anchors [B,S,4], usable [B,S]); padded tokens and those with a
    coordinate outside (0.01, 0.99) are unusable, their anchors +inf (sigmoid 1)."""
    b, out, start = padding.shape[0], [], 0
    for lvl, (h, w) in enumerate(spatial_shapes):
        pad = padding[:, start:start + h * w].view(b, h, w)
        valid = torch.stack([(~pad[:, 0, :]).sum(1), (~pad[:, :, 0]).sum(1)], -1).float()  # (W, H)
        ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32, device=padding.device),
                                torch.arange(w, dtype=torch.float32, device=padding.device), indexing="ij")
        centre = (torch.stack([xs, ys], -1).view(1, -1, 2) + 0.5) / valid[:, None, :]
        out.append(torch.cat([centre, torch.full_like(centre, 0.05 * 2.0 ** lvl)], -1))
        start += h * w
    boxes = torch.cat(out, 1)
    usable = ((boxes > 0.01) & (boxes < 0.99)).all(-1) & ~padding
    anchors = torch.log(boxes / (1 - boxes)).masked_fill(~usable[..., None], float("inf"))
    return anchors, usable


def box_sine_embedding(boxes: Tensor, dim: int, temperature: float = 10000.0) -> Tensor:
    """Sine embedding of (cx, cy, w, h) in [0,1], dim/2 frequencies per coordinate -> [...,2*dim]."""
    feats = dim // 2
    dim_t = torch.arange(feats, dtype=torch.float32, device=boxes.device)
    dim_t = temperature ** (2 * (dim_t // 2) / feats)
    pos = boxes.float()[..., None] * (2 * math.pi) / dim_t
    pos = torch.stack([pos[..., 0::2].sin(), pos[..., 1::2].cos()], -1).flatten(-2)
    return pos.flatten(-2)


def gather_tokens(x: Tensor, index: Tensor) -> Tensor:
    """x [B,S,...], index [B,K] -> [B,K,...]."""
    shape = index.shape + x.shape[2:]
    return x.gather(1, index.view(*index.shape, *([1] * (x.dim() - 2))).expand(shape))


def deformable_attention(dim, heads, levels, points, key_aware: bool = False) -> MSDeformAttn:
    """MSDA, or Lite DETR's key-aware variant (weights from the sampled keys; its module is
    imported only for it, see effdetr.codedeps)."""
    if key_aware:
        from ..ops.kda import KeyAwareDeformAttn
        return KeyAwareDeformAttn(dim, heads, levels, points)
    return MSDeformAttn(dim, heads, levels, points)


class DeformableEncoderLayer(nn.Module):
    def __init__(self, dim, heads, levels, points, ffn_dim, dropout, key_aware: bool = False):
        super().__init__()
        self.self_attn = deformable_attention(dim, heads, levels, points, key_aware)
        self.ffn = FeedForward(dim, ffn_dim, dropout)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.drop1, self.drop2 = nn.Dropout(dropout), nn.Dropout(dropout)

    def attend(self, query, query_pos, reference_points, values, spatial_shapes, padding):
        x = self.self_attn(query + query_pos, reference_points, values, spatial_shapes, padding)
        return self.norm1(query + self.drop1(x))

    def feed_forward(self, x):
        return self.norm2(x + self.drop2(self.ffn(x)))

    def forward(self, query, query_pos, reference_points, values, spatial_shapes, padding):
        """query [B,K,C] (every token, or the kept ones), values [B,S,C] (the full map)."""
        return self.feed_forward(self.attend(query, query_pos, reference_points, values, spatial_shapes, padding))


class DeformableEncoder(nn.Module):
    def __init__(self, layer: DeformableEncoderLayer, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))

    def forward(self, src, pos, spatial_shapes, padding, ratios, keep: Tensor | None = None,
                keep_valid: Tensor | None = None, after_layer=None) -> Tensor:
        """src/pos [B,S,C]; keep [B,K] token indices to update (None = all); keep_valid [B,K]
        False where an image keeps fewer than K tokens. As in Sparse DETR's encoder, the kept
        queries are carried from layer to layer and only an image's valid slots are written
        back into the map (the others stay keys/values as they were). ``after_layer(i,
        queries)`` is called after every layer but the last (encoder auxiliary heads)."""
        refs = token_centres(spatial_shapes, ratios)[:, :, None] * ratios[:, None]  # [B,S,L,2]
        if keep is None:
            for i, layer in enumerate(self.layers):
                src = layer(src, pos, refs, src, spatial_shapes, padding)
                if after_layer is not None and i < len(self.layers) - 1:
                    after_layer(i, src)
            return src
        refs, pos, tgt = gather_tokens(refs, keep), gather_tokens(pos, keep), gather_tokens(src, keep)
        index = keep[..., None].expand_as(tgt)
        for i, layer in enumerate(self.layers):
            tgt = layer(tgt, pos, refs, src, spatial_shapes, padding)
            new = tgt if keep_valid is None else torch.where(keep_valid[..., None], tgt, src.gather(1, index))
            src = src.scatter(1, index, new)
            if after_layer is not None and i < len(self.layers) - 1:
                after_layer(i, tgt)
        return src


class DeformableDecoderLayer(nn.Module):
    def __init__(self, dim, heads, levels, points, ffn_dim, dropout, key_aware: bool = False):
        super().__init__()
        self.self_attn = MultiHeadAttention(dim, heads, dropout=dropout)
        self.cross_attn = deformable_attention(dim, heads, levels, points, key_aware)
        self.ffn = FeedForward(dim, ffn_dim, dropout)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.drop1, self.drop2, self.drop3 = nn.Dropout(dropout), nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, tgt, query_pos, reference_points, memory, spatial_shapes, padding):
        q = tgt + query_pos
        tgt = self.norm2(tgt + self.drop2(self.self_attn(q, q, tgt)))
        x, sampling = self.cross_attn(tgt + query_pos, reference_points, memory, spatial_shapes, padding,
                                      return_sampling=True)
        tgt = self.norm1(tgt + self.drop1(x))
        return self.norm3(tgt + self.drop3(self.ffn(tgt))), sampling


class DeformableDecoder(nn.Module):
    """Returns every layer's output and the reference (sigmoid space) each layer started from.
    With ``box_heads`` (iterative refinement) layer d's predicted delta moves the reference of
    layer d+1, detached, as in the official decoder: a 2-d point becomes a 4-d box after the
    first layer (the head's (w, h) taken as they are), a box is moved as a whole."""

    def __init__(self, layer: DeformableDecoderLayer, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))

    def forward(self, tgt, query_pos, reference, memory, spatial_shapes, padding, ratios,
                box_heads: nn.ModuleList | None = None):
        outputs, references, samplings = [], [], []
        for i, layer in enumerate(self.layers):
            scale = torch.cat([ratios, ratios], -1) if reference.shape[-1] == 4 else ratios
            references.append(reference)
            tgt, sampling = layer(tgt, query_pos, reference[:, :, None] * scale[:, None], memory, spatial_shapes,
                                  padding)
            outputs.append(tgt)
            samplings.append(sampling)
            if box_heads is not None:
                reference = refine(box_heads[i](tgt), reference).sigmoid().detach()
        return torch.stack(outputs), references, samplings


def refine(delta: Tensor, reference: Tensor) -> Tensor:
    """A box head's delta [.., 4] applied to a reference in sigmoid space (2-d point or 4-d
    box) -> box logits [.., 4]."""
    if reference.shape[-1] == 4:
        return delta + inverse_sigmoid(reference)
    return torch.cat([delta[..., :2] + inverse_sigmoid(reference), delta[..., 2:]], -1)
