"""Sparse DETR's parts (Roh et al., 2022): token scoring, top-rho selection, DAM targets.

The scoring network predicts each encoder token's saliency; the encoder updates only the
top rho fraction. It is trained either from the decoder cross-attention map (DAM: how much
attention the decoder's sampling points put on each token in the same forward pass) or,
as the paper's ablation, as an objectness detector with its own set loss.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ScoringNetwork(nn.Module):
    """Token saliency logits: Sparse DETR's ``MaskPredictor`` (same module names, so its
    ``transformer.enc_mask_predictor`` maps 1:1). A per-token MLP whose first layer's output
    is half kept local, half replaced by its mean over the image. Its input is the two-stage
    head's projection of (features + position), made by the detector."""

    def __init__(self, dim: int):
        super().__init__()
        self.layer1 = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU())
        self.layer2 = nn.Sequential(nn.Linear(dim, dim // 2), nn.GELU(), nn.Linear(dim // 2, dim // 4), nn.GELU(),
                                    nn.Linear(dim // 4, 1))

    def forward(self, tokens: Tensor, padding: Tensor) -> Tensor:
        """tokens [B,S,C], padding [B,S] -> logits [B,S]. As the official code: the mean runs
        over every token of the padded map, and padded tokens get the batch's lowest logit."""
        z = self.layer1(tokens)
        local, glob = z.chunk(2, dim=-1)
        z = torch.cat([local, glob.mean(1, keepdim=True).expand_as(glob)], -1)
        logits = self.layer2(z).squeeze(-1)
        return logits.masked_fill(padding, logits.min())


def keep_counts(padding: Tensor, rho: float) -> Tensor:
    """Tokens kept per image: floor(rho * valid tokens) + 1 (the official rule) -> [B]."""
    valid = (~padding).sum(1)
    return torch.minimum(torch.floor(rho * valid.float()).long() + 1, valid.clamp(min=1))


def select_tokens(scores: Tensor, padding: Tensor, rho: float) -> tuple[Tensor, Tensor]:
    """Top-rho tokens of every image over all levels jointly -> (indices [B,K], valid [B,K]),
    K = the batch's largest count; slots beyond an image's own count are not valid."""
    counts = keep_counts(padding, rho)
    k = int(counts.max())
    index = scores.detach().float().masked_fill(padding, float("-inf")).topk(k, dim=1).indices
    valid = torch.arange(k, device=scores.device)[None] < counts[:, None]
    return index, valid


def attention_map(sampling: list[tuple[Tensor, Tensor]], spatial_shapes: list[tuple[int, int]]) -> Tensor:
    """Decoder cross-attention map: every sampling point's weight split bilinearly onto the
    (up to four) token cells around it, summed over layers, queries, heads and points -> [B,S].

    sampling: per decoder layer (locations [B,Q,M,L,K,2] in [0,1] of the padded maps,
    weights [B,Q,M,L,K]). Cells use the sampler's pixel-centre convention (x*W - 0.5); the
    official code omits the half-cell shift.
    """
    b = sampling[0][0].shape[0]
    total = sum(h * w for h, w in spatial_shapes)
    out = sampling[0][0].new_zeros(b, total)
    start = 0
    for lvl, (h, w) in enumerate(spatial_shapes):
        # every layer at once, one scatter per level over [layer, corner, point] in that order:
        # each cell receives the same additions in the same order as a scatter per layer and
        # corner would make
        xy = torch.stack([loc[:, :, :, lvl] for loc, _ in sampling], 1).detach().float().reshape(b, len(sampling), -1, 2)
        a = torch.stack([wt[:, :, :, lvl] for _, wt in sampling], 1).detach().float().reshape(b, len(sampling), -1)
        x, y = xy[..., 0] * w - 0.5, xy[..., 1] * h - 0.5
        x0, y0 = x.floor(), y.floor()
        fx, fy = x - x0, y - y0
        srcs, idxs = [], []
        for dx, dy, cw in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)),
                           (0, 1, (1 - fx) * fy), (1, 1, fx * fy)):
            xi, yi = (x0 + dx).long(), (y0 + dy).long()
            inside = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
            idxs.append(start + yi.clamp(0, h - 1) * w + xi.clamp(0, w - 1))
            srcs.append(a * cw * inside)
        out.scatter_add_(1, torch.stack(idxs, 2).flatten(1), torch.stack(srcs, 2).flatten(1))
        start += h * w
    return out


def dam_target(attn_map: Tensor, padding: Tensor, rho: float) -> Tensor:
    """Binary saliency target: the top floor(rho*valid)+1 tokens of the DAM -> [B,S] float."""
    counts = keep_counts(padding, rho)
    ranked = attn_map.masked_fill(padding, float("-inf")).argsort(dim=1, descending=True)
    rank = torch.empty_like(ranked)
    rank.scatter_(1, ranked, torch.arange(ranked.shape[1], device=ranked.device).expand_as(ranked))
    return ((rank < counts[:, None]) & ~padding).float()


def dam_loss(logits: Tensor, target: Tensor, padding: Tensor) -> Tensor:
    """BCE-with-logits averaged over every token of the batch, padding included (target 0,
    logit at the batch minimum): the official ``multilabel_soft_margin_loss``. ``padding``
    is kept for the callers' contract."""
    del padding
    return F.binary_cross_entropy_with_logits(logits.float(), target.float())
