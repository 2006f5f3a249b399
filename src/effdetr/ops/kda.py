"""Key-aware deformable attention (Lite DETR, Li et al. 2023).

Deformable attention predicts its weights from the query alone. KDA samples keys and values
at the same L x K locations and weights the value samples by softmax(q . k / sqrt(d)) over
those samples, so the weights see what was sampled. Keys are the sampled values unless
``proj_key`` (a separate key projection, the paper's formula; the released code shares them).
Sampling reuses MSDA's ``grid_sample`` path (:func:`~effdetr.ops.msda.sample_points`);
samples outside the map or on padding are zero vectors and still take part in the softmax,
as in the released code.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from . import msda
from .msda import MSDeformAttn, sample_points


def key_aware_weights_and_values(qh: Tensor, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
    """qh [B*M, Q, D]; keys, values [B*M, D, Q, L*K] (the sampled layout) -> softmax(q.k /
    sqrt(D)) [B*M, Q, L*K] and the weighted values [B*M, Q, D].

    Per query these are a 1 x D by D x LK product and back: as batched matmuls (the FLOPs
    counter's form, which counts them as fvcore counted the released code's) they are B*M*Q
    tiny GEMMs on permuted copies; as broadcast products reduced over D and LK they run in
    the samples' own layout, ~1.5x faster on the CPU, equal to ~1e-6 (test_kda.py)."""
    d = qh.shape[-1]
    if msda.counting_flops():
        scores = torch.matmul(qh.unsqueeze(2), keys.permute(0, 2, 1, 3)).squeeze(2) / math.sqrt(d)
        weights = scores.softmax(-1)
        return weights, torch.matmul(values.permute(0, 2, 1, 3), weights.unsqueeze(-1)).squeeze(-1)
    scores = (keys * qh.transpose(1, 2).unsqueeze(-1)).sum(1) / math.sqrt(d)
    weights = scores.softmax(-1)
    return weights, (values * weights.unsqueeze(1)).sum(-1).transpose(1, 2)


class KeyAwareDeformAttn(MSDeformAttn):
    def __init__(self, dim: int = 256, heads: int = 8, levels: int = 4, points: int = 4, proj_key: bool = False):
        super().__init__(dim, heads, levels, points)
        del self.attention_weights  # the weights come from the sampled keys instead
        self.query_proj = nn.Linear(dim, dim)
        self.key_proj = nn.Linear(dim, dim) if proj_key else None
        for lin in (self.query_proj, self.key_proj):
            if lin is not None:
                nn.init.xavier_uniform_(lin.weight)
                nn.init.zeros_(lin.bias)

    def reset_parameters(self) -> None:
        if hasattr(self, "attention_weights"):  # called by MSDeformAttn.__init__ before the del
            super().reset_parameters()

    def forward(self, query: Tensor, reference_points: Tensor, value_in: Tensor,
                spatial_shapes: list[tuple[int, int]], value_padding: Tensor | None = None,
                return_sampling: bool = False):
        """Same contract as :class:`MSDeformAttn`; the returned weights are the key-aware ones."""
        b, s, _ = value_in.shape
        q, m, d = query.shape[1], self.heads, self.dim // self.heads

        def project(lin: nn.Linear) -> Tensor:
            x = lin(value_in)
            if value_padding is not None:
                x = x.masked_fill(value_padding[..., None], 0.0)
            return x.view(b, s, m, d).float()

        loc = self.locations(query, reference_points, spatial_shapes)
        values = sample_points(project(self.value_proj), spatial_shapes, loc.float())  # [B*M, D, Q, L*K]
        keys = values if self.key_proj is None else sample_points(project(self.key_proj), spatial_shapes, loc.float())
        qh = self.query_proj(query).view(b, q, m, d).transpose(1, 2).reshape(b * m, q, d).float()
        weights, out = key_aware_weights_and_values(qh, keys, values)  # [B*M, Q, L*K], [B*M, Q, D]
        out = out.view(b, m, q, d).permute(0, 2, 1, 3).reshape(b, q, m * d)
        out = self.output_proj(out.to(query.dtype))
        if return_sampling:
            return out, (loc, weights.view(b, m, q, self.levels, self.points).transpose(1, 2))
        return out
