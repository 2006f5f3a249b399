import math

import pytest
import torch

from effdetr.models import build_model
from effdetr.models.criterion import build_criterion
from effdetr.ops.attention import DenseAttentionKernel


class ReferenceKernel(torch.nn.Module):
    """Plain softmax attention, float64, written out."""

    def forward(self, q, k, v, key_padding_mask, dropout_p=0.0):
        assert dropout_p == 0.0, "the reference is for eval mode"
        s = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(q.shape[-1])
        if key_padding_mask is not None:
            s = s.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
        return (s.softmax(-1) @ v.double()).to(q.dtype)


def batch(cfg, b=2, h=64, w=80):
    images = torch.randn(b, 3, h, w)
    mask = torch.zeros(b, h, w, dtype=torch.bool)
    mask[1, :, 60:] = True  # second image is padded on the right
    return images, mask


def test_output_contract(tiny_cfg):
    m = build_model(tiny_cfg.model).eval()
    out = m(*batch(tiny_cfg))
    q, k = tiny_cfg.model.num_queries, tiny_cfg.model.num_classes
    assert out["pred_logits"].shape == (2, q, k + 1)
    assert out["pred_boxes"].shape == (2, q, 4)
    assert ((out["pred_boxes"] >= 0) & (out["pred_boxes"] <= 1)).all()
    assert len(out["aux_outputs"]) == tiny_cfg.model.dec_layers - 1


def test_encoder_kernel_swap_matches_reference(tiny_cfg):
    """The pluggable kernel: swapping in a reference changes nothing numerically."""
    torch.manual_seed(0)
    m = build_model(tiny_cfg.model).eval()
    x = batch(tiny_cfg)
    with torch.no_grad():
        dense = m(*x)
        for attn in m.transformer.encoder_attention_modules():
            attn.kernel = ReferenceKernel()
        ref = m(*x)
    assert torch.allclose(dense["pred_boxes"], ref["pred_boxes"], atol=1e-5)
    assert torch.allclose(dense["pred_logits"], ref["pred_logits"], atol=1e-4)
    assert not any("kernel" in k for k in m.state_dict())


def test_dense_kernel_against_reference_with_padding():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 5, generator=g) for _ in range(3))
    mask = torch.zeros(2, 7, dtype=torch.bool)
    mask[0, 5:] = True
    assert torch.allclose(DenseAttentionKernel()(q, k, v, mask), ReferenceKernel()(q, k, v, mask), atol=1e-6)


def test_few_training_steps_reduce_loss(tiny_cfg):
    torch.manual_seed(0)
    m = build_model(tiny_cfg.model)
    crit = build_criterion(tiny_cfg.model, tiny_cfg.loss)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    images, mask = batch(tiny_cfg)
    tgt = [{"labels": torch.tensor([1, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.4]])},
           {"labels": torch.tensor([4]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.3]])}]
    losses = []
    for _ in range(20):  # the official (fused) attention init starts slower than per-block Xavier
        total = crit.total(crit(m(images, mask), tgt), tiny_cfg.model.dec_layers - 1)
        opt.zero_grad()
        total.backward()
        opt.step()
        losses.append(total.item())
    assert losses[-1] < 0.7 * losses[0]


def test_spatial_prior_bias_against_a_loop(tiny_cfg):
    """-|p - r|^2 / (2 s^2) with cell centres normalised to each image's unpadded extent."""
    import dataclasses
    cfg = dataclasses.replace(tiny_cfg.model, box_reference=True, spatial_prior=True)
    m = build_model(cfg)
    fmask = torch.zeros(2, 3, 4, dtype=torch.bool)
    fmask[1, :, 3:] = True  # second image: 3 valid columns
    fmask[1, 2:, :] = True  # and 2 valid rows
    ref = torch.tensor([[0.2, 0.7]] * cfg.num_queries)
    bias = m.spatial_bias(ref, fmask, m.log_scale)
    scale = m.log_scale.exp()
    for b, (rows, cols) in enumerate([(3, 4), (2, 3)]):
        for q in range(cfg.num_queries):
            for i in range(3):
                for j in range(4):
                    if i >= rows or j >= cols:
                        continue  # padding cells are masked by the attention anyway
                    px, py = (j + 0.5) / cols, (i + 0.5) / rows
                    want = -((px - 0.2) ** 2 + (py - 0.7) ** 2) / (2 * scale[q, 0].item() ** 2)
                    assert abs(bias[b, 0, q, i * 4 + j].item() - want) < 1e-4


def test_box_reference_starts_boxes_at_the_references(tiny_cfg):
    import dataclasses
    cfg = dataclasses.replace(tiny_cfg.model, box_reference=True, spatial_prior=True)
    torch.manual_seed(0)
    m = build_model(cfg).eval()
    out = m(*batch(tiny_cfg))
    ref = m.reference(m.query_embed.weight).sigmoid()
    torch.testing.assert_close(out["pred_boxes"][0, :, :2], ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["pred_boxes"][..., 2:], torch.full_like(out["pred_boxes"][..., 2:], 0.5))


def test_stride8_backbone_is_the_dc5_trunk_evaluated_twice_as_densely(tiny_cfg):
    """``dilate_layer3`` (the "algorithme a trous"): same weights, and the stride-8 map
    sampled at even positions is exactly the stride-16 DC5 map."""
    import dataclasses

    from effdetr.models.backbone import Backbone
    torch.manual_seed(0)
    cfg16 = dataclasses.replace(tiny_cfg.model.backbone, dilation=True, dilate_layer3=False, channels=[8, 16, 32, 64])
    b16 = Backbone(cfg16).eval()
    b8 = Backbone(dataclasses.replace(cfg16, dilate_layer3=True)).eval()
    b8.load_state_dict(b16.state_dict())  # pretrained trunks transfer unchanged
    assert (b16.stride, b8.stride) == (16, 8)
    images, mask = batch(tiny_cfg, h=88, w=104)
    with torch.no_grad():
        (f16, _), (f8, m8) = b16(images, mask), b8(images, mask)
    assert f8.shape[-2:] == (11, 13) and m8.shape == (2, 11, 13)
    torch.testing.assert_close(f8[..., ::2, ::2], f16, rtol=1e-5, atol=1e-5)
    assert not m8[0].any() and m8[1, :, -1].all() and not m8[1, :, 0].any()


def test_position_encoding_offset_follows_each_official_code():
    """DETR normalises y / y_max (facebookresearch/detr), Deformable DETR (y - 0.5) / y_max;
    channel 0 of each is sin(2 pi * normalised y / 1)."""
    from effdetr.models.deformable import DeformableDETR
    from effdetr.models.detr import DETR
    from effdetr.models.position import PositionEmbeddingSine
    mask = torch.zeros(1, 5, 7, dtype=torch.bool)
    mask[:, 4:, :] = True  # 4 valid rows
    y = torch.arange(1, 5, dtype=torch.float32)
    for offset, expected in ((0.0, y / 4), (-0.5, (y - 0.5) / 4)):
        pos = PositionEmbeddingSine(16, offset=offset)(mask)
        torch.testing.assert_close(pos[0, 0, :4, 0], torch.sin(expected / (4 + 1e-6) * 4 * 2 * math.pi), atol=1e-5,
                                   rtol=0)
    from effdetr.config import experiment_config
    from tests.conftest import TINY
    detr = build_model(experiment_config(TINY, "detr_dc5")[0].model)
    deformable = build_model(experiment_config(TINY, "deformable_detr_topk")[0].model)
    assert isinstance(detr, DETR) and detr.position.offset == 0.0
    assert isinstance(deformable, DeformableDETR) and deformable.position.offset == -0.5


def test_attention_dropout_sits_where_the_official_layers_have_it(tiny_cfg):
    """nn.MultiheadAttention(dropout=0.1) in DETR's encoder/decoder attentions: probabilities
    are dropped in training only."""
    import dataclasses
    cfg = dataclasses.replace(tiny_cfg.model, dropout=0.3)
    m = build_model(cfg)
    attns = [l.self_attn for l in m.transformer.encoder] + \
        [a for l in m.transformer.decoder for a in (l.self_attn, l.cross_attn)]
    assert attns and all(a.dropout == 0.3 for a in attns)
    attn = attns[0]
    x = torch.randn(2, 9, cfg.hidden_dim)
    attn.train()
    torch.manual_seed(0)
    a = attn(x, x, x)
    torch.manual_seed(1)
    b = attn(x, x, x)
    assert not torch.allclose(a, b)
    attn.eval()
    dense = attn(x, x, x)
    attn.dropout = 0.0
    attn.train()
    torch.testing.assert_close(attn(x, x, x), dense)


def test_attention_projections_start_as_the_official_fused_in_proj(tiny_cfg):
    """Xavier over nn.MultiheadAttention's [3C, C] in_proj: q/k/v entries bounded by
    sqrt(6 / (C + 3C)), not the sqrt(6 / 2C) of separate [C, C] blocks."""
    torch.manual_seed(0)
    m = build_model(tiny_cfg.model)
    c = tiny_cfg.model.hidden_dim
    for layer in list(m.transformer.encoder) + list(m.transformer.decoder):
        w = torch.cat([layer.self_attn.q_proj.weight, layer.self_attn.k_proj.weight, layer.self_attn.v_proj.weight])
        bound = math.sqrt(6 / (4 * c))
        assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
        assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.15)
