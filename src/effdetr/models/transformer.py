"""DETR encoder-decoder transformer (post-norm by default), batch-first.

The encoder's self-attention kernels are reachable through
:meth:`Transformer.encoder_attention_modules` so a method (ACT) can swap them in a trained
model. Position embeddings are added to queries and keys of every attention layer.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.attention import MultiHeadAttention


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.lin1, self.lin2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.lin2(self.dropout(F.relu(self.lin1(x))))


class EncoderLayer(nn.Module):
    def __init__(self, dim, nheads, ffn_dim, dropout, pre_norm):
        super().__init__()
        self.self_attn = MultiHeadAttention(dim, nheads, dropout=dropout)
        self.ffn = FeedForward(dim, ffn_dim, dropout)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.drop1, self.drop2 = nn.Dropout(dropout), nn.Dropout(dropout)
        self.pre_norm = pre_norm

    def forward(self, src: Tensor, pos: Tensor, key_padding_mask: Tensor | None) -> Tensor:
        if self.pre_norm:
            x = self.norm1(src)
            src = src + self.drop1(self.self_attn(x + pos, x + pos, x, key_padding_mask))
            return src + self.drop2(self.ffn(self.norm2(src)))
        qk = src + pos
        src = self.norm1(src + self.drop1(self.self_attn(qk, qk, src, key_padding_mask)))
        return self.norm2(src + self.drop2(self.ffn(src)))


class DecoderLayer(nn.Module):
    def __init__(self, dim, nheads, ffn_dim, dropout, pre_norm):
        super().__init__()
        self.self_attn = MultiHeadAttention(dim, nheads, dropout=dropout)
        self.cross_attn = MultiHeadAttention(dim, nheads, dropout=dropout)
        self.ffn = FeedForward(dim, ffn_dim, dropout)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.drop1, self.drop2, self.drop3 = nn.Dropout(dropout), nn.Dropout(dropout), nn.Dropout(dropout)
        self.pre_norm = pre_norm

    def forward(self, tgt, memory, pos, query_pos, memory_mask, cross_bias=None):
        if self.pre_norm:
            x = self.norm1(tgt)
            tgt = tgt + self.drop1(self.self_attn(x + query_pos, x + query_pos, x))
            x = self.norm2(tgt)
            tgt = tgt + self.drop2(self.cross_attn(x + query_pos, memory + pos, memory, memory_mask, cross_bias))
            return tgt + self.drop3(self.ffn(self.norm3(tgt)))
        q = tgt + query_pos
        tgt = self.norm1(tgt + self.drop1(self.self_attn(q, q, tgt)))
        tgt = self.norm2(tgt + self.drop2(self.cross_attn(tgt + query_pos, memory + pos, memory, memory_mask,
                                                          cross_bias)))
        return self.norm3(tgt + self.drop3(self.ffn(tgt)))


class Transformer(nn.Module):
    def __init__(self, dim=256, nheads=8, enc_layers=6, dec_layers=6, ffn_dim=2048,
                 dropout=0.1, pre_norm=False):
        super().__init__()
        enc = EncoderLayer(dim, nheads, ffn_dim, dropout, pre_norm)
        dec = DecoderLayer(dim, nheads, ffn_dim, dropout, pre_norm)
        self.encoder = nn.ModuleList(copy.deepcopy(enc) for _ in range(enc_layers))
        self.decoder = nn.ModuleList(copy.deepcopy(dec) for _ in range(dec_layers))
        self.enc_norm = nn.LayerNorm(dim) if pre_norm else nn.Identity()
        self.dec_norm = nn.LayerNorm(dim)
        self.dim = dim
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():  # the official in_proj is one [3C, C] matrix
            if isinstance(m, MultiHeadAttention):
                m.xavier_as_fused()

    def encoder_attention_modules(self) -> list[MultiHeadAttention]:
        return [layer.self_attn for layer in self.encoder]

    def encode(self, src: Tensor, mask: Tensor, pos: Tensor) -> Tensor:
        """src/pos [B,N,C], mask [B,N] (True = padding) -> memory [B,N,C]."""
        for layer in self.encoder:
            src = layer(src, pos, mask)
        return self.enc_norm(src)

    def decode(self, memory: Tensor, mask: Tensor, pos: Tensor, query_embed: Tensor,
               cross_bias: Tensor | None = None) -> Tensor:
        """memory/pos [B,N,C], mask [B,N], query_embed [Q,C] or per image [B,Q,C] -> hs [L,B,Q,C]."""
        query_pos = query_embed if query_embed.dim() == 3 else query_embed.unsqueeze(0).expand(memory.shape[0], -1, -1)
        tgt = torch.zeros_like(query_pos)
        hs = []
        for layer in self.decoder:
            tgt = layer(tgt, memory, pos, query_pos, mask, cross_bias)
            hs.append(self.dec_norm(tgt))
        return torch.stack(hs)
