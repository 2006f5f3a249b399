"""Adaptive Clustering attention (ACT, Zheng et al. 2020) and its K-means baseline.

Both are parameter-free kernels for :class:`~effdetr.ops.attention.MultiHeadAttention`:
queries are grouped into prototypes (per image, per head, per layer), each prototype
attends to all keys, and its output is copied back to the member queries. Swapping a
trained DETR's encoder kernels for these changes nothing in its state dict.

ACT groups queries by E2LSH codes: ``L`` hash functions
``h_i(q) = floor((a_i . q + b_i) / r)`` with ``a_i ~ N(0, I)`` and ``b_i ~ U(0, r)``; two
queries share a prototype iff all ``L`` codes agree, so the number of prototypes adapts to
how spread the queries are (more rounds -> finer partition -> more prototypes). As in the
official code, the hashed query is the *scaled* one, ``q / sqrt(d_head)`` (its attention
layer scales q before clustering), so the bucket width ``r`` means what it means there
(r = 8 for DETR-DC5). The paper's code packs the rounds into one integer (2 bits each,
lossy); we group on the exact tuple. Prototype sums and sizes accumulate in fp32 under any
autocast (the official ``weighted_sum`` kernel is fp32; bf16 counts stop at 256).

Everything is vectorised over (batch x heads): prototypes are padded to the largest count
in the batch, and the padding is masked out of nothing (it is simply never gathered back).
Work is charged by :meth:`exact_macs` for the real prototypes only, so FLOPs are those of
an implementation without padding (see evaluation/flops.py).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def group_rows(codes: Tensor, valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Partition each group's rows by identical integer codes.

    codes [G, N, L] int64, valid [G, N] bool (False rows -- padding tokens -- are grouped
    only among themselves). Returns ``labels`` [G, N] (cluster index within the group, in
    0..count-1) and ``counts`` [G] (clusters per group).
    """
    g, n, _ = codes.shape
    gid = torch.arange(g, device=codes.device).view(g, 1, 1).expand(g, n, 1)
    cols = [gid, codes]
    if valid is not None:
        cols.insert(1, (~valid).long().unsqueeze(-1))
    rows = torch.cat(cols, dim=-1).reshape(g * n, -1)
    uniq, inverse = torch.unique(rows, dim=0, return_inverse=True)
    counts = torch.bincount(uniq[:, 0], minlength=g)  # unique rows are sorted by group first
    first = torch.cumsum(counts, 0) - counts
    labels = inverse.view(g, n) - first.view(g, 1)
    return labels, counts


def prototype_attention(q: Tensor, k: Tensor, v: Tensor, labels: Tensor, counts: Tensor,
                        key_padding_mask: Tensor | None, dropout_p: float = 0.0) -> Tensor:
    """Mean of each cluster's queries attends to all keys; outputs broadcast to members.

    q [B,h,N,d], k/v [B,h,Nk,d], labels [B*h,N], counts [B*h] -> [B,h,N,dv].
    """
    b, h, n, d = q.shape
    g = b * h
    cmax = int(counts.max())
    flat = q.reshape(g * n, d)
    index = (labels + torch.arange(g, device=q.device).view(g, 1) * cmax).reshape(-1)
    acc = torch.promote_types(q.dtype, torch.float32)  # fp32 at least, as the official kernel
    sums = torch.zeros(g * cmax, d, dtype=acc, device=q.device).index_add(0, index, flat.to(acc))
    sizes = torch.zeros(g * cmax, dtype=acc, device=q.device).index_add(0, index, torch.ones_like(index, dtype=acc))
    protos = (sums / sizes.clamp(min=1).unsqueeze(-1)).to(q.dtype).view(b, h, cmax, d)
    attn_mask = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]
    out = F.scaled_dot_product_attention(protos, k, v, attn_mask=attn_mask, dropout_p=dropout_p)  # [B,h,cmax,dv]
    out = out.reshape(g, cmax, -1)
    return torch.gather(out, 1, labels.unsqueeze(-1).expand(-1, -1, out.shape[-1])).view(b, h, n, -1)


class E2LSH(nn.Module):
    """L rounds of Euclidean LSH with fixed (seeded) projections -> integer codes [..., L]."""

    def __init__(self, dim: int, rounds: int, bucket_width: float, seed: int):
        super().__init__()
        if rounds < 1:
            raise ValueError(f"E2LSH rounds must be >= 1, got {rounds}")
        if bucket_width <= 0:
            raise ValueError(f"E2LSH bucket width must be > 0, got {bucket_width}")
        # Round i is drawn from its own seed, so the first L rounds are the same for every
        # L: more rounds refine the partition, and prototype counts (FLOPs) are nested.
        rows, offsets = [], []
        for i in range(rounds):
            gen = torch.Generator().manual_seed(seed * 1_000_003 + i)
            rows.append(torch.randn(dim, generator=gen, dtype=torch.float64))
            offsets.append(torch.rand((), generator=gen, dtype=torch.float64) * bucket_width)
        self.register_buffer("proj", torch.stack(rows, 1), persistent=False)
        self.register_buffer("offset", torch.stack(offsets), persistent=False)
        self.bucket_width = bucket_width

    def forward(self, x: Tensor) -> Tensor:
        # float64 so a code never flips with the input dtype or the matmul's summation order
        return torch.floor((x.double() @ self.proj + self.offset) / self.bucket_width).long()


class ClusterKernel(nn.Module):
    """Shared bookkeeping: per-call prototype counts and the exact MACs of the last call."""

    def __init__(self):
        super().__init__()
        self.last_counts: Tensor | None = None  # [B, h] prototypes of the last forward
        self.last_macs = 0
        self.last_tokens = 0

    def _record(self, counts: Tensor, b: int, h: int, n: int, nk: int, d: int, dv: int, extra: int) -> None:
        self.last_counts = counts.view(b, h).detach()
        self.last_tokens = n
        self.last_macs = int(counts.sum()) * nk * (d + dv) + extra

    def exact_macs(self) -> int:
        """Multiply-adds of the last forward: clustering + prototype-key attention."""
        return self.last_macs


class ACTAttentionKernel(ClusterKernel):
    """Drop-in for DenseAttentionKernel (encoder self-attention) with E2LSH prototypes."""

    def __init__(self, head_dim: int, rounds: int, bucket_width: float, seed: int):
        super().__init__()
        self.hash = E2LSH(head_dim, rounds, bucket_width, seed)
        self.rounds = rounds

    def forward(self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None,
                dropout_p: float = 0.0) -> Tensor:
        b, h, n, d = q.shape
        codes = self.hash(q * d ** -0.5).reshape(b * h, n, -1)
        valid = None
        if key_padding_mask is not None and key_padding_mask.shape[-1] == n:
            valid = (~key_padding_mask).unsqueeze(1).expand(b, h, n).reshape(b * h, n)
        labels, counts = group_rows(codes, valid)
        self._record(counts, b, h, n, k.shape[-2], d, v.shape[-1], extra=b * h * n * d * self.rounds)
        return prototype_attention(q, k, v, labels, counts, key_padding_mask, dropout_p)


def kmeans_labels(x: Tensor, num: Tensor, iters: int, seed: int) -> Tensor:
    """Batched Lloyd K-means with a per-group K. x [G,N,d], num [G] (1..N) -> labels [G,N].

    Centres start at ``num[g]`` distinct points drawn with a fixed seed; unused centre slots
    (beyond a group's K) are masked out of the assignment."""
    g, n, d = x.shape
    kmax = int(num.max())
    gen = torch.Generator().manual_seed(seed)
    order = torch.argsort(torch.rand(g, n, generator=gen), dim=1).to(x.device)
    centres = torch.gather(x, 1, order[:, :kmax, None].expand(-1, -1, d))
    slot_ok = torch.arange(kmax, device=x.device).view(1, kmax) < num.view(g, 1)
    for _ in range(iters + 1):
        dist = torch.cdist(x.float(), centres.float())
        dist = dist.masked_fill(~slot_ok.unsqueeze(1), math.inf)
        labels = dist.argmin(-1)
        acc = torch.promote_types(x.dtype, torch.float32)
        sums = torch.zeros(g, kmax, d, dtype=acc, device=x.device).scatter_add(
            1, labels.unsqueeze(-1).expand(-1, -1, d), x.to(acc))
        sizes = torch.zeros(g, kmax, dtype=acc, device=x.device).scatter_add(1, labels, torch.ones_like(labels, dtype=acc))
        # an empty cluster keeps its old centre
        means = (sums / sizes.clamp(min=1).unsqueeze(-1)).to(x.dtype)
        centres = torch.where(sizes.unsqueeze(-1) > 0, means, centres)
    return labels


def compact_labels(labels: Tensor) -> tuple[Tensor, Tensor]:
    """Renumber each group's labels to 0..count-1 (K-means may leave slots empty)."""
    return group_rows(labels.unsqueeze(-1))


class KMeansAttentionKernel(ClusterKernel):
    """The paper's baseline: K-means prototypes with, per image and head, as many clusters as
    E2LSH with ``rounds`` would produce -- so attention FLOPs are matched image by image."""

    def __init__(self, head_dim: int, rounds: int, bucket_width: float, seed: int, iters: int = 10):
        super().__init__()
        self.match = ACTAttentionKernel(head_dim, rounds, bucket_width, seed)
        self.iters, self.seed = iters, seed

    def forward(self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None,
                dropout_p: float = 0.0) -> Tensor:
        b, h, n, d = q.shape
        codes = self.match.hash(q * d ** -0.5).reshape(b * h, n, -1)
        _, target = group_rows(codes)
        labels = kmeans_labels(q.reshape(b * h, n, d), target, self.iters, self.seed)
        labels, counts = compact_labels(labels)
        # Lloyd's distances for each (image, head)'s own K, not the batch's padded largest K
        self._record(counts, b, h, n, k.shape[-2], d, v.shape[-1],
                     extra=b * h * n * d * self.match.rounds + (self.iters + 1) * n * d * int(target.sum()))
        return prototype_attention(q, k, v, labels, counts, key_padding_mask, dropout_p)
