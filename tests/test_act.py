"""ACT / K-means clustering attention against plain per-cluster reference code."""
import math

import pytest
import torch

from effdetr.ops.act import (ACTAttentionKernel, E2LSH, KMeansAttentionKernel, group_rows,
                             kmeans_labels)


def dense_reference(q, k, v, key_padding_mask=None):
    """softmax(q k^T / sqrt(d)) v written out, float64."""
    s = q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1])
    if key_padding_mask is not None:
        s = s.masked_fill(key_padding_mask[:, None, None, :], -math.inf)
    return (s.softmax(-1) @ v.double()).to(q.dtype)


def clustered_reference(q, k, v, codes, key_padding_mask=None):
    """Loop over (batch, head, cluster): mean query of the cluster attends, members copy."""
    b, h, n, _ = q.shape
    out = torch.empty(b, h, n, v.shape[-1], dtype=torch.float64)
    for i in range(b):
        for j in range(h):
            rows = [tuple(r) for r in codes[i, j].tolist()]
            for key in set(rows):
                members = [t for t, r in enumerate(rows) if r == key]
                proto = q[i, j, members].double().mean(0, keepdim=True)
                mask = None if key_padding_mask is None else key_padding_mask[i:i + 1]
                o = dense_reference(proto[None, None], k[i:i + 1, j:j + 1].double(), v[i:i + 1, j:j + 1].double(), mask)
                out[i, j, members] = o[0, 0, 0]
    return out


def test_tiny_bucket_width_equals_dense_attention():
    torch.manual_seed(1)
    q, k, v = torch.randn(2, 3, 37, 8), torch.randn(2, 3, 37, 8), torch.randn(2, 3, 37, 8)
    kernel = ACTAttentionKernel(head_dim=8, rounds=16, bucket_width=1e-6, seed=0)
    out = kernel(q, k, v, None)
    assert torch.equal(kernel.last_counts, torch.full((2, 3), 37))
    torch.testing.assert_close(out, dense_reference(q, k, v), atol=1e-5, rtol=1e-5)


def test_identical_queries_form_one_prototype():
    torch.manual_seed(2)
    q = torch.randn(2, 2, 1, 8).expand(2, 2, 29, 8).contiguous()
    k, v = torch.randn(2, 2, 29, 8), torch.randn(2, 2, 29, 8)
    kernel = ACTAttentionKernel(head_dim=8, rounds=32, bucket_width=1e-3, seed=3)
    out = kernel(q, k, v, None)
    assert torch.equal(kernel.last_counts, torch.ones(2, 2, dtype=torch.long))
    torch.testing.assert_close(out, dense_reference(q, k, v), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rounds,width", [(4, 2.0), (8, 1.0), (24, 4.0)])
def test_matches_per_cluster_reference_with_padding(rounds, width):
    torch.manual_seed(rounds)
    b, h, n, d = 2, 2, 23, 6
    q, k, v = torch.randn(b, h, n, d), torch.randn(b, h, n, d), torch.randn(b, h, n, 5)
    mask = torch.zeros(b, n, dtype=torch.bool)
    mask[1, -7:] = True
    kernel = ACTAttentionKernel(head_dim=d, rounds=rounds, bucket_width=width, seed=11)
    out = kernel(q, k, v, mask)
    codes = kernel.hash(q / math.sqrt(d))
    # padding queries never share a prototype with real ones
    codes = torch.cat([codes, mask[:, None, :, None].expand(b, h, n, 1).long()], -1)
    ref = clustered_reference(q, k, v, codes, mask)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    expected = torch.tensor([[len({tuple(r) for r in codes[i, j].tolist()}) for j in range(h)] for i in range(b)])
    assert torch.equal(kernel.last_counts, expected)


def test_more_rounds_refine_the_partition():
    torch.manual_seed(0)
    q = torch.randn(1, 4, 200, 16)
    labels, counts = [], []
    for rounds in (4, 8, 16, 32):
        kernel = ACTAttentionKernel(head_dim=16, rounds=rounds, bucket_width=16.0, seed=0)
        codes = kernel.hash(q / 4.0).reshape(4, 200, rounds)
        labels.append(group_rows(codes)[0])
        kernel(q, q, q, None)
        counts.append(kernel.last_counts)
    for coarse, fine, c0, c1 in zip(labels, labels[1:], counts, counts[1:]):
        assert (c0 <= c1).all() and c0.sum() < c1.sum()
        # same fine cluster => same coarse cluster
        same_fine = fine.unsqueeze(-1) == fine.unsqueeze(-2)
        same_coarse = coarse.unsqueeze(-1) == coarse.unsqueeze(-2)
        assert not (same_fine & ~same_coarse).any()


def test_hash_is_deterministic_and_seeded():
    x = torch.randn(50, 8)
    a, b, c = E2LSH(8, 6, 1.0, seed=5), E2LSH(8, 6, 1.0, seed=5), E2LSH(8, 6, 1.0, seed=6)
    assert torch.equal(a(x), b(x)) and not torch.equal(a(x), c(x))
    assert a(x).dtype == torch.long and a(x).shape == (50, 6)


def test_group_rows_against_python_sets():
    torch.manual_seed(0)
    codes = torch.randint(0, 3, (4, 30, 2))
    labels, counts = group_rows(codes)
    for g in range(4):
        rows = [tuple(r) for r in codes[g].tolist()]
        assert counts[g] == len(set(rows))
        for s in range(30):
            for t in range(30):
                assert (labels[g, s] == labels[g, t]) == (rows[s] == rows[t])
        assert set(labels[g].tolist()) == set(range(int(counts[g])))


def test_kmeans_separates_obvious_blobs_and_matches_act_counts():
    torch.manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = (centres.repeat_interleave(10, 0) + 0.1 * torch.randn(30, 2))[None]
    labels = kmeans_labels(x, torch.tensor([3]), iters=10, seed=0)
    groups = {tuple(sorted((labels[0] == c).nonzero().flatten().tolist())) for c in labels[0].unique().tolist()}
    assert groups == {tuple(range(0, 10)), tuple(range(10, 20)), tuple(range(20, 30))}
    q, k, v = torch.randn(1, 2, 40, 8), torch.randn(1, 2, 40, 8), torch.randn(1, 2, 40, 8)
    act = ACTAttentionKernel(8, 8, 2.0, seed=1)
    km = KMeansAttentionKernel(8, 8, 2.0, seed=1)
    act(q, k, v, None)
    out = km(q, k, v, None)
    assert out.shape == (1, 2, 40, 8)
    assert (km.last_counts <= act.last_counts).all() and (km.last_counts >= 1).all()


def test_gradients_flow_through_prototypes():
    torch.manual_seed(0)
    q = torch.randn(1, 2, 12, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, 12, 4, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 2, 12, 4, dtype=torch.float64, requires_grad=True)
    kernel = ACTAttentionKernel(4, 4, 1.5, seed=0)
    assert torch.autograd.gradcheck(lambda a, b_, c: kernel(a, b_, c, None), (q, k, v))


def test_hashes_the_scaled_query_as_the_official_code():
    """The official layer multiplies q by 1/sqrt(d_head) before E2LSH; with r = 8 and d = 64
    the unscaled query would spread over ~8x more buckets per round."""
    torch.manual_seed(5)
    b, h, n, d, width = 1, 2, 50, 64, 8.0
    q = torch.randn(b, h, n, d)
    kernel = ACTAttentionKernel(head_dim=d, rounds=4, bucket_width=width, seed=2)
    kernel(q, q, q, None)
    proj, offset = kernel.hash.proj, kernel.hash.offset  # [d, L], [L]
    codes = torch.floor(((q.double() / math.sqrt(d)) @ proj + offset) / width).long()
    expected = torch.tensor([[len({tuple(r) for r in codes[0, j].tolist()}) for j in range(h)]])
    assert torch.equal(kernel.last_counts, expected)
    unscaled = torch.floor((q.double() @ proj + offset) / width).long()
    assert len({tuple(r) for r in unscaled[0, 0].tolist()}) > expected[0, 0]  # the check can tell them apart


@pytest.mark.parametrize("kind", ["act", "kmeans"])
def test_large_clusters_average_in_fp32_under_bf16(kind):
    """600 queries in one prototype: bf16 sums and counts (which stop at 256) would give a
    wrong mean; the official kernel accumulates in fp32."""
    torch.manual_seed(6)
    n, d = 600, 8
    q = (torch.randn(1, 1, n, d) + 3.0).bfloat16()
    k, v = torch.randn(1, 1, 9, d).bfloat16(), torch.randn(1, 1, 9, d).bfloat16()
    if kind == "act":
        kernel = ACTAttentionKernel(head_dim=d, rounds=2, bucket_width=1e9, seed=0)
    else:
        kernel = KMeansAttentionKernel(head_dim=d, rounds=2, bucket_width=1e9, seed=0, iters=2)
    out = kernel(q, k, v, None)
    assert int(kernel.last_counts.max()) == 1
    proto = q.double().mean(2, keepdim=True)
    ref = dense_reference(proto, k.double(), v.double()).expand(1, 1, n, d)
    torch.testing.assert_close(out.double(), ref, atol=3e-2, rtol=3e-2)
