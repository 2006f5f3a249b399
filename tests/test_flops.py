import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from effdetr.evaluation.flops import count_flops, count_model
from effdetr.ops.act import KMeansAttentionKernel


class Tiny(nn.Module):
    """conv (3->4, 3x3) + linear, with a fused attention call: every MAC is known."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.proj = nn.Linear(4, 8)

    def forward(self, x, mask):
        f = self.backbone(x).flatten(2).transpose(1, 2)  # [B, HW, 4]
        q = self.proj(f).view(f.shape[0], 1, f.shape[1], 8)
        return F.scaled_dot_product_attention(q, q, q)


def test_counts_multiply_adds_exactly():
    x = torch.randn(1, 3, 6, 5)
    parts = count_flops(Tiny(), x, torch.zeros(1, 6, 5, dtype=torch.bool), {"backbone": "backbone"})
    hw = 30
    conv = hw * 4 * 3 * 9
    linear = hw * 4 * 8
    attn = 2 * hw * hw * 8
    assert parts["backbone"] * 1e9 == conv
    assert round(parts["total"] * 1e9) == conv + linear + attn


# ---------------------------------------------------------------------------------------
# Closed forms (multiply-adds) of the tiny DETR-DC5 of tests/data/params_tiny.yaml, written
# from the architecture, not from the counter: timm's ResNet with BasicBlocks (one per stage,
# widths 8/16/16/32) and its fixed 64-channel 7x7 stem; layer4 dilated (DC5, stride 16).
# Only convolutions and matrix products count (norms, softmax, element-wise ops do not).
# Inputs are multiples of 16, so every stride divides exactly.
# ---------------------------------------------------------------------------------------
def conv(positions, cin, cout, k):
    return positions * cout * cin * k * k


def tiny_dc5_backbone(h, w):
    s2, s4, s8, s16 = (h // 2) * (w // 2), (h // 4) * (w // 4), (h // 8) * (w // 8), (h // 16) * (w // 16)
    stem = conv(s2, 3, 64, 7)                                                        # conv1, stride 2
    layer1 = conv(s4, 64, 8, 3) + conv(s4, 8, 8, 3) + conv(s4, 64, 8, 1)             # after the max-pool
    layer2 = conv(s8, 8, 16, 3) + conv(s8, 16, 16, 3) + conv(s8, 8, 16, 1)           # stride 2
    layer3 = conv(s16, 16, 16, 3) + conv(s16, 16, 16, 3) + conv(s16, 16, 16, 1)      # stride 2
    layer4 = conv(s16, 16, 32, 3) + conv(s16, 32, 32, 3) + conv(s16, 16, 32, 1)      # dilated, stride 1
    return stem + layer1 + layer2 + layer3 + layer4


def encoder_layer(n, d, ff):
    """q, k, v projections 3Nd^2 + output projection Nd^2 + scores and weighted sum 2N^2 d
    (over all heads) + FFN 2N d ff."""
    return 3 * n * d * d + n * d * d + 2 * n * n * d + 2 * n * d * ff


def decoder_layer(q, n, d, ff):
    self_attn = 4 * q * d * d + 2 * q * q * d
    cross_attn = 2 * q * d * d + 2 * n * d * d + 2 * q * n * d  # q/out on queries, k/v on memory
    return self_attn + cross_attn + 2 * q * d * ff


def heads(q, n, c_backbone, d, classes, dec_layers):
    """input projection (1x1 conv) + class head Q d (C+1) and the 3-layer box MLP
    (d->d->d->4), both applied to every decoder layer's output (the aux losses read them)."""
    return n * c_backbone * d + dec_layers * (q * d * (classes + 1) + q * (d * d + d * d + d * 4))


def tiny_parts(m, h, w):
    n = (h // 16) * (w // 16)
    d, ff = m.hidden_dim, m.ffn_dim
    parts = {"backbone": tiny_dc5_backbone(h, w), "encoder": m.enc_layers * encoder_layer(n, d, ff),
             "decoder": m.dec_layers * decoder_layer(m.num_queries, n, d, ff),
             "heads": heads(m.num_queries, n, m.backbone.channels[-1], d, m.num_classes, m.dec_layers)}
    parts["total"] = sum(parts.values())
    return parts


def test_detr_parts_match_their_closed_forms(tiny_cfg):
    """Catches a part charged wrongly or not at all (e.g. the box head's MACs dropped from
    the count, a nested module counted twice, the attention formula off): each of backbone,
    encoder, decoder and heads equals its closed form exactly. For 64x80: N = 4*5 = 20 tokens,
    backbone 14,535,680, encoder 189,440, decoder 2 x 137,216, heads 20,480 + 2*(1,792 + 17,408)."""
    m = tiny_cfg.model  # the closed forms above describe this config
    assert (m.arch, m.backbone.name, m.backbone.dilation) == ("detr", "tiny", True)
    assert m.backbone.channels == [8, 16, 16, 32]
    assert (m.hidden_dim, m.enc_layers, m.dec_layers, m.ffn_dim, m.num_queries, m.num_classes) == (32, 1, 2, 64, 8, 6)
    parts = tiny_parts(m, 64, 80)
    assert parts == {"backbone": 14_535_680, "encoder": 189_440, "decoder": 274_432, "heads": 58_880,
                     "total": 15_058_432}
    r = count_model(tiny_cfg.model, [[64, 80]])
    assert {k: round(v * 1e9) for k, v in r["gmacs"].items()} == parts


def test_encoder_flops_grow_quadratically_with_tokens(tiny_cfg):
    """Catches an error in the N^2 attention term (a 'ratio between 4 and 16' check survived
    a 10x error): the encoder count equals enc_layers x (3Nd^2 + Nd^2 + 2N^2 d + 2N d ff)
    exactly, ff = ffn_dim (the FFN's hidden width), at three token counts."""
    m = tiny_cfg.model
    for (h, w), n in (((64, 64), 16), ((64, 96), 24), ((128, 128), 64)):
        got = count_model(m, [[h, w]])["gmacs"]["encoder"]
        assert round(got * 1e9) == m.enc_layers * encoder_layer(n, m.hidden_dim, m.ffn_dim), (h, w)
    # the N^2 term is a real share here: 2N^2 d = 262,144 is a third of the layer at N = 64
    assert 3 * 2 * 64 * 64 * 32 == encoder_layer(64, 32, 64) == 786_432


def test_counts_average_over_the_input_sizes(tiny_cfg):
    """Catches count_model reporting one input's count (the first or last) or a wrong mean:
    with two input sizes every part is the mean of its two closed forms."""
    a, b = tiny_parts(tiny_cfg.model, 64, 64), tiny_parts(tiny_cfg.model, 64, 96)
    got = count_model(tiny_cfg.model, [[64, 64], [64, 96]])["gmacs"]
    for k in a:
        assert got[k] * 1e9 == pytest.approx((a[k] + b[k]) / 2, rel=1e-12), k
    assert a["total"] != b["total"]  # the two sizes differ, so one of them alone cannot pass


def test_act_count_is_its_own_exact_cost(tiny_cfg):
    """ACT's encoder attention is charged hashing + prototypes x keys, not the padded batch:
    the encoder count of an ACT model = dense count - dense attention + the ACT formula."""
    import dataclasses

    from effdetr.models import build_model
    from effdetr.models.detr import set_encoder_attention
    from effdetr.ops.act import ACTAttentionKernel
    torch.manual_seed(0)
    model = build_model(tiny_cfg.model)
    x, m = torch.randn(1, 3, 64, 80), torch.zeros(1, 64, 80, dtype=torch.bool)
    dense = count_flops(model, x, m, {"encoder": "transformer.encoder"})
    cfg = dataclasses.replace(tiny_cfg.model.act, rounds=3, bucket_width=4.0)
    set_encoder_attention(model.transformer, "act", cfg)
    act = count_flops(model, x, m, {"encoder": "transformer.encoder"})
    kernels = [a.kernel for a in model.transformer.encoder_attention_modules()]
    assert all(isinstance(k, ACTAttentionKernel) for k in kernels)
    d = tiny_cfg.model.hidden_dim // tiny_cfg.model.nheads
    h = tiny_cfg.model.nheads
    expected = 0.0
    for k in kernels:
        n = k.last_tokens
        protos = int(k.last_counts.sum())
        assert protos < h * n  # some clustering happened, so the check below is not vacuous
        expected += -(2 * h * n * n * d) + h * n * d * 3 + protos * n * 2 * d
    assert abs((act["encoder"] - dense["encoder"]) * 1e9 - expected) < 1
    assert act["total"] - act["encoder"] == dense["total"] - dense["encoder"]


# ---------------------------------------------------------------------------------------
# K-means baseline: exact_macs = E2LSH hashing (to choose K) + Lloyd's distance
# computations + prototype-key attention, counted by hand below.
# ---------------------------------------------------------------------------------------
def e2lsh_clusters(q, kernel):
    """Per (image, head): distinct E2LSH code tuples of the scaled queries, from the hash's
    own random projection but without the kernel's grouping code."""
    lsh = kernel.match.hash
    codes = torch.floor(((q.double() / math.sqrt(q.shape[-1])) @ lsh.proj + lsh.offset) / lsh.bucket_width).long()
    return [[len({tuple(r) for r in codes[i, j].tolist()}) for j in range(q.shape[1])] for i in range(q.shape[0])]


def distinct_rows(out):
    """Per (image, head): distinct output rows = prototypes actually used (members copy
    their prototype's output; distinct prototypes give distinct outputs for random keys)."""
    return [[len({tuple(round(x, 5) for x in r) for r in out[i, j].tolist()}) for j in range(out.shape[1])]
            for i in range(out.shape[0])]


def test_kmeans_exact_macs_counts_hashing_lloyd_iterations_and_attention():
    """Catches a clustering cost left out or miscounted (the iteration term dropped, iters
    instead of the iters + 1 assignment passes Lloyd's loop runs, a missing batch x heads
    factor, prototypes charged as if every query were one). Every (image, head) group here
    has the same queries, so all groups ask for the same K:
      hashing    B h N d L           (L rounds of a . q)
      Lloyd      (iters + 1) B h N K d  (distances of N queries to K centres per pass)
      attention  sum_g P_g Nk (d + dv)  (P_g prototypes used, q.k and p.v)"""
    torch.manual_seed(0)
    b, h, n, d, nk, dv, rounds, iters = 2, 3, 30, 8, 7, 6, 4, 3
    q = torch.randn(n, d).expand(b, h, n, d).contiguous()
    k, v = torch.randn(b, h, nk, d), torch.randn(b, h, nk, dv)
    km = KMeansAttentionKernel(head_dim=d, rounds=rounds, bucket_width=2.0, seed=0, iters=iters)
    out = km(q, k, v, None)
    clusters = e2lsh_clusters(q, km)
    kk = clusters[0][0]
    assert all(c == kk for row in clusters for c in row) and 1 < kk < n  # K is neither trivial nor N
    used = distinct_rows(out)
    assert torch.equal(km.last_counts, torch.tensor(used))
    expected = b * h * n * d * rounds + (iters + 1) * b * h * n * kk * d + sum(map(sum, used)) * nk * (d + dv)
    assert km.exact_macs() == expected
    assert (iters + 1) * b * h * n * kk * d > expected / 3  # the iteration term is a real share


def test_kmeans_iterations_are_charged_for_each_groups_own_k():
    """Catches the padded centre slots being charged: head 0's queries spread over many E2LSH
    buckets, head 1's (scaled by 0.2) fall into one, so K = [K0, 1]; an implementation
    without padding computes (iters + 1) N d (K0 + 1) distances, not (iters + 1) N d 2 K0."""
    torch.manual_seed(0)
    b, h, n, d, rounds, iters = 1, 2, 30, 8, 4, 3
    q = torch.randn(b, h, n, d)
    q[:, 1] *= 0.2
    k = torch.randn(b, h, n, d)
    km = KMeansAttentionKernel(head_dim=d, rounds=rounds, bucket_width=2.0, seed=0, iters=iters)
    out = km(q, k, k, None)
    clusters = e2lsh_clusters(q, km)[0]
    assert clusters[0] > 1 and clusters[1] == 1
    used = distinct_rows(out)
    expected = b * h * n * d * rounds + (iters + 1) * n * d * sum(clusters) + sum(map(sum, used)) * n * 2 * d
    assert km.exact_macs() == expected


# ---------------------------------------------------------------------------------------
# Paper scale
# ---------------------------------------------------------------------------------------
# one ResNet-50 forward at 800x1066 (about 10 s on a busy 2-core CPU, under the ~20 s at which it
# would be marked slow)
def test_detr_r50_is_within_tolerance_of_the_papers_86_gflops():
    """Catches a counting convention far from the paper's (2 per multiply-add, a head or
    the backbone missing, a wrong input size): DETR Table 1 reports 86 GFLOPs and 41 M
    parameters for DETR-R50 (one multiply-add = one FLOP, COCO val at shorter side 800);
    the protocol here is one 800x1066 input (a 640x480 image resized to 800), random
    weights, batch 1, and the claim tolerance of reporting/paper/detr.yaml is +-10 %."""
    import yaml

    from effdetr.config import BackboneConfig, ModelConfig
    from effdetr.reporting import paper
    row = yaml.safe_load((Path(paper.__file__).parent / "detr.yaml").read_text())["tables"]["flops"]["rows"]["detr_r50"]
    assert (row["gflops"], row["params_m"], row["claim"]) == (86, 41, {"rel_tol": 0.10})
    cfg = ModelConfig(backbone=BackboneConfig(pretrained="none", dilation=False))  # DETR-R50 defaults
    assert (cfg.hidden_dim, cfg.enc_layers, cfg.dec_layers, cfg.ffn_dim, cfg.num_queries) == (256, 6, 6, 2048, 100)
    r = count_model(cfg, [[800, 1066]])
    assert abs(r["gmacs"]["total"] / 86 - 1) <= 0.10, r["gmacs"]
    assert abs(r["params_m"] / 41 - 1) <= 0.10, r["params_m"]
    # the transformer at N = 25 x 34 = 850 tokens, d 256, ff 2048: 6 encoder layers exactly
    assert round(r["gmacs"]["encoder"] * 1e9) == 6 * encoder_layer(25 * 34, 256, 2048)
