"""Multi-head attention with a pluggable kernel.

The projections (parameters) live in :class:`MultiHeadAttention`; the part that turns
per-head q, k, v into outputs is a parameter-free *kernel*. Swapping the kernel (dense ->
ACT clustering) therefore changes a trained model's attention without retraining and
without touching its state dict.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class DenseAttentionKernel(nn.Module):
    """softmax(q k^T / sqrt(d)) v over all keys (fused SDPA)."""

    def forward(self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None,
                attn_bias: Tensor | None = None, dropout_p: float = 0.0) -> Tensor:
        """q [B,h,Nq,d], k/v [B,h,Nk,d], key_padding_mask [B,Nk] True = ignore, attn_bias
        (added to the logits) broadcastable to [B,h,Nq,Nk], dropout_p on the attention
        probabilities -> [B,h,Nq,d]."""
        attn_mask = None
        if key_padding_mask is not None:
            attn_mask = ~key_padding_mask[:, None, None, :]
        if attn_bias is not None:
            bias = attn_bias.to(q.dtype)
            attn_mask = bias if attn_mask is None else bias.masked_fill(~attn_mask, float("-inf"))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)


class MultiHeadAttention(nn.Module):
    """Batch-first multi-head attention; ``kernel`` may be replaced after training.

    ``dropout`` drops attention probabilities in training, as ``nn.MultiheadAttention(dropout=)``
    does in the official DETR and Deformable DETR layers; the enclosing layer drops the
    output separately.
    """

    def __init__(self, dim: int, nheads: int, kernel: nn.Module | None = None, dropout: float = 0.0):
        super().__init__()
        assert dim % nheads == 0, "dim must be divisible by nheads"
        self.nheads, self.head_dim, self.dropout = nheads, dim // nheads, dropout
        self.q_proj, self.k_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.v_proj, self.out_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.kernel = kernel or DenseAttentionKernel()
        for lin in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def xavier_as_fused(self) -> None:
        """Xavier-uniform over the stacked [3C, C] q/k/v matrix, as the official models'
        ``nn.MultiheadAttention.in_proj_weight`` is initialised (separate [C, C] blocks would
        start sqrt(2) wider); the output projection is a [C, C] matrix in both."""
        fused = torch.empty(3 * self.q_proj.out_features, self.q_proj.in_features)
        nn.init.xavier_uniform_(fused)
        with torch.no_grad():
            for lin, block in zip((self.q_proj, self.k_proj, self.v_proj), fused.chunk(3)):
                lin.weight.copy_(block)
            nn.init.xavier_uniform_(self.out_proj.weight)

    def _heads(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.nheads, self.head_dim).transpose(1, 2)

    def forward(self, query: Tensor, key: Tensor, value: Tensor,
                key_padding_mask: Tensor | None = None, attn_bias: Tensor | None = None) -> Tensor:
        """query [B,Nq,C], key/value [B,Nk,C], attn_bias [B,1|h,Nq,Nk] (logit bias) -> [B,Nq,C]."""
        q, k, v = self._heads(self.q_proj(query)), self._heads(self.k_proj(key)), self._heads(self.v_proj(value))
        p = self.dropout if self.training else 0.0
        if attn_bias is None:
            out = self.kernel(q, k, v, key_padding_mask, dropout_p=p)
        else:
            out = self.kernel(q, k, v, key_padding_mask, attn_bias, dropout_p=p)
        out = out.transpose(1, 2).reshape(query.shape[0], query.shape[1], -1)
        return self.out_proj(out)
