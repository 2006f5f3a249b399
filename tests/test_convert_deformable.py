"""Official Deformable DETR / Sparse DETR checkpoints -> effdetr (``effdetr.convert.deformable``).

Parity: HF transformers' DeformableDetrForObjectDetection (random weights, every tensor
noised) -> the official layout (``hf_layout_deformable``) -> effdetr, same outputs on a padded
batch. Sparse DETR has no HF peer: its key set is fabricated from kakaobrain/sparse-detr's
module names and must map strictly.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from effdetr.config import BackboneConfig, DeformableConfig, ModelConfig, SparseConfig
from effdetr.convert.deformable import convert_deformable, deformable_mapping
from effdetr.convert.mapping import ConversionError
from effdetr.models import build_model

from .hf_layout_deformable import deformable_hf_to_official

transformers = pytest.importorskip("transformers")

DIM, FFN, ENC, DEC, QUERIES, CLASSES = 256, 64, 2, 2, 20, 7  # GroupNorm(32) as published needs 256
HF_VARIANTS = {  # name -> (levels, box refine, two-stage)
    "single_scale": (1, False, False),
    "base": (4, False, False),
    "box_refine": (4, True, False),
    "two_stage": (4, True, True),
}


def effdetr_cfg(levels=4, box_refine=False, two_stage=False, variant="deformable_detr", rho=None,
                enc_layers=ENC, dec_layers=DEC, **sparse) -> ModelConfig:
    return ModelConfig(arch="deformable",
                       backbone=BackboneConfig(name="resnet50", pretrained="none", freeze_bn=True, dilation=False),
                       hidden_dim=DIM, nheads=8, enc_layers=enc_layers, dec_layers=dec_layers, ffn_dim=FFN,
                       dropout=0.0, num_queries=QUERIES, num_classes=CLASSES,
                       deformable=DeformableConfig(num_levels=levels, num_points=4, two_stage=two_stage,
                                                   box_refine=box_refine, two_stage_variant=variant),
                       sparse=SparseConfig(rho=rho, **sparse))


def hf_model(levels: int, box_refine: bool, two_stage: bool) -> nn.Module:
    cfg = transformers.DeformableDetrConfig(
        use_pretrained_backbone=False, d_model=DIM, encoder_layers=ENC, decoder_layers=DEC, encoder_ffn_dim=FFN,
        decoder_ffn_dim=FFN, encoder_attention_heads=8, decoder_attention_heads=8, num_queries=QUERIES,
        two_stage_num_proposals=QUERIES, num_labels=CLASSES, num_feature_levels=levels,
        with_box_refine=box_refine, two_stage=two_stage, dropout=0.0)
    model = transformers.DeformableDetrForObjectDetection(cfg)
    if box_refine and model.class_embed[0] is model.class_embed[1]:
        # HF 5.x ties class_embed.N to class_embed.0 even with box refinement; the official
        # model clones them (one per layer), so give HF its own per-layer class heads back.
        model.class_embed = nn.ModuleList(copy.deepcopy(c) for c in model.class_embed)
    return model


@torch.no_grad()
def noise_every_tensor(model: nn.Module, seed: int) -> None:
    """Replace every float tensor by noise of a sane scale (HF zero-inits many, so a mis-mapped
    tensor could hide): norms' scales ~1, running variances in [0.5, 1.5], embeddings ~N(0, 1),
    weights ~N(0, 1/fan_in), everything else ~N(0, 0.2^2). Tied tensors get one draw each time
    they appear (they stay tied)."""
    g = torch.Generator().manual_seed(seed)
    norm_weights = {f"{name}.weight" for name, m in model.named_modules()
                    if isinstance(m, (nn.LayerNorm, nn.GroupNorm)) or "BatchNorm" in type(m).__name__}
    for name, t in model.state_dict().items():
        if not t.is_floating_point():
            continue
        noise = torch.randn(t.shape, generator=g)
        if name.endswith("running_var"):
            t.copy_(torch.rand(t.shape, generator=g) + 0.5)
        elif name in norm_weights:
            t.copy_(1 + 0.2 * noise)
        elif name.endswith(("level_embed", "query_position_embeddings.weight")):
            t.copy_(noise)
        elif t.dim() >= 2:
            t.copy_(noise / math.sqrt(t[0].numel()))
        else:
            t.copy_(0.2 * noise)


def padded_batch():
    """Two images of different sizes, zero-padded: (images, HF pixel_mask 1 = valid, effdetr mask
    True = padding)."""
    g = torch.Generator().manual_seed(1)
    images = torch.zeros(2, 3, 96, 128)
    images[0] = torch.randn(3, 96, 128, generator=g)
    images[1, :, :80, :100] = torch.randn(3, 80, 100, generator=g)
    valid = torch.zeros(2, 96, 128, dtype=torch.long)
    valid[0] = 1
    valid[1, :80, :100] = 1
    return images, valid, valid == 0


@pytest.mark.parametrize("variant", sorted(HF_VARIANTS))
def test_hf_deformable_detr_converts_and_reproduces(variant):
    levels, box_refine, two_stage = HF_VARIANTS[variant]
    torch.manual_seed(0)
    hf = hf_model(levels, box_refine, two_stage)
    noise_every_tensor(hf, seed=2)
    hf.eval()
    model = build_model(effdetr_cfg(levels, box_refine, two_stage)).eval()
    official = deformable_hf_to_official(hf.state_dict())
    model.load_state_dict(convert_deformable({"model": official}, model, f"hf-{variant}.pth"), strict=True)
    images, valid, padding = padded_batch()
    with torch.no_grad():
        ref = hf(pixel_values=images, pixel_mask=valid)
        out = model(images, padding)
    d_logits = (ref.logits - out["pred_logits"]).abs().max().item()
    d_boxes = (ref.pred_boxes - out["pred_boxes"]).abs().max().item()
    print(f"{variant}: max |d logits| {d_logits:.2e}, max |d boxes| {d_boxes:.2e}")
    assert ref.logits.abs().max() > 0.5 and ref.pred_boxes.std() > 0.05  # not a degenerate net
    assert d_logits <= 1e-4 and d_boxes <= 1e-4
    if two_stage:
        d_enc = (ref.enc_outputs_class - out["enc_outputs"]["pred_logits"]).abs().max().item()
        assert d_enc <= 1e-4


# -- Sparse DETR (kakaobrain/sparse-detr), rho 0.1, --with_box_refine --two_stage --eff_query_init
#    --eff_specific_head --use_enc_aux_loss: the key set its DeformableDETR would save.

def _linear(prefix: str, out_dim: int, in_dim: int) -> dict:
    return {f"{prefix}.weight": (out_dim, in_dim), f"{prefix}.bias": (out_dim,)}


def _norm(prefix: str, dim: int) -> dict:
    return {f"{prefix}.weight": (dim,), f"{prefix}.bias": (dim,)}


def _msda(prefix: str, dim: int, heads=8, levels=4, points=4) -> dict:
    return {**_linear(f"{prefix}.sampling_offsets", heads * levels * points * 2, dim),
            **_linear(f"{prefix}.attention_weights", heads * levels * points, dim),
            **_linear(f"{prefix}.value_proj", dim, dim), **_linear(f"{prefix}.output_proj", dim, dim)}


def _mlp(prefix: str, dim: int) -> dict:
    return {**_linear(f"{prefix}.layers.0", dim, dim), **_linear(f"{prefix}.layers.1", dim, dim),
            **_linear(f"{prefix}.layers.2", 4, dim)}


def sparse_detr_official_shapes(trunk: dict, dim=DIM, ffn=FFN, enc=6, dec=6, classes=CLASSES) -> dict:
    """Every key (-> shape) of kakaobrain/sparse-detr's model at rho 0.1 with the released flags."""
    shapes = {f"backbone.0.body.{k}": s for k, s in trunk.items()}
    for i, c in enumerate((512, 1024, 2048)):
        shapes.update({f"input_proj.{i}.0.weight": (dim, c, 1, 1), f"input_proj.{i}.0.bias": (dim,),
                       **_norm(f"input_proj.{i}.1", dim)})
    shapes.update({"input_proj.3.0.weight": (dim, 2048, 3, 3), "input_proj.3.0.bias": (dim,),
                   **_norm("input_proj.3.1", dim), "transformer.level_embed": (4, dim)})
    mp = "transformer.enc_mask_predictor"
    shapes.update({**_norm(f"{mp}.layer1.0", dim), **_linear(f"{mp}.layer1.1", dim, dim),
                   **_linear(f"{mp}.layer2.0", dim // 2, dim), **_linear(f"{mp}.layer2.2", dim // 4, dim // 2),
                   **_linear(f"{mp}.layer2.4", 1, dim // 4)})
    for i in range(enc):
        p = f"transformer.encoder.layers.{i}"
        shapes.update({**_msda(f"{p}.self_attn", dim), **_norm(f"{p}.norm1", dim), **_norm(f"{p}.norm2", dim),
                       **_linear(f"{p}.linear1", ffn, dim), **_linear(f"{p}.linear2", dim, ffn)})
    for i in range(dec):
        p = f"transformer.decoder.layers.{i}"
        shapes.update({**_msda(f"{p}.cross_attn", dim), f"{p}.self_attn.in_proj_weight": (3 * dim, dim),
                       f"{p}.self_attn.in_proj_bias": (3 * dim,), **_linear(f"{p}.self_attn.out_proj", dim, dim),
                       **_norm(f"{p}.norm1", dim), **_norm(f"{p}.norm2", dim), **_norm(f"{p}.norm3", dim),
                       **_linear(f"{p}.linear1", ffn, dim), **_linear(f"{p}.linear2", dim, ffn)})
    shapes.update({**_linear("transformer.enc_output", dim, dim), **_norm("transformer.enc_output_norm", dim),
                   **_linear("transformer.pos_trans", dim, 2 * dim),  # eff_query_init: 2C -> C
                   **_norm("transformer.pos_trans_norm", dim)})
    heads = dec + 1 + (enc - 1)  # [decoder layers, two-stage proposal head, encoder layers but the last]
    for i in range(heads):
        for owner in ("", "transformer.decoder."):  # two-stage: the decoder holds the whole list
            shapes.update({**_linear(f"{owner}class_embed.{i}", classes, dim), **_mlp(f"{owner}bbox_embed.{i}", dim)})
    for i in range(enc - 1):  # use_enc_aux_loss: the encoder holds the last enc - 1 heads
        shapes.update({**_linear(f"transformer.encoder.class_embed.{i}", classes, dim),
                       **_mlp(f"transformer.encoder.bbox_embed.{i}", dim)})
    return shapes


def fabricate(shapes: dict, dec=6, seed=0) -> dict:
    """Random tensors of those shapes; the official aliases equal the heads they hold (the
    encoder's aux head i is class_embed/bbox_embed[dec + 1 + i])."""
    g = torch.Generator().manual_seed(seed)
    sd = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    for k in sd:
        if k.startswith("transformer.decoder.") and "_embed." in k:
            sd[k] = sd[k.removeprefix("transformer.decoder.")]
        elif k.startswith("transformer.encoder.") and "_embed." in k:
            kind, i, rest = k.removeprefix("transformer.encoder.").split(".", 2)
            sd[k] = sd[f"{kind}.{dec + 1 + int(i)}.{rest}"]
    return sd


@pytest.fixture(scope="module")
def sparse_model():
    cfg = effdetr_cfg(box_refine=True, two_stage=True, variant="sparse_detr", rho=0.1, enc_layers=6, dec_layers=6,
                      enc_aux_loss=True)
    return cfg, build_model(cfg)


@pytest.fixture(scope="module")
def sparse_ckpt(sparse_model):
    _, model = sparse_model
    trunk = {k.removeprefix("backbone.body."): tuple(v.shape) for k, v in model.state_dict().items()
             if k.startswith("backbone.body.")}
    return fabricate(sparse_detr_official_shapes(trunk))


def test_sparse_detr_checkpoint_maps_strictly(sparse_model, sparse_ckpt):
    cfg, model = sparse_model
    converted = convert_deformable({"model": sparse_ckpt, "epoch": 49}, model, "sparse_detr_r50_10.pth")
    assert set(converted) == set(model.state_dict())
    model.load_state_dict(converted, strict=True)
    scorer_out = sparse_ckpt["transformer.enc_mask_predictor.layer2.4.weight"]
    torch.testing.assert_close(model.scorer.layer2[4].weight, scorer_out)
    torch.testing.assert_close(model.enc_aux_class[0].weight, sparse_ckpt["class_embed.7.weight"])
    torch.testing.assert_close(model.class_embed[6].weight, sparse_ckpt["class_embed.6.weight"])  # proposal head
    _, _, v = sparse_ckpt["transformer.decoder.layers.3.self_attn.in_proj_weight"].chunk(3)
    torch.testing.assert_close(model.decoder.layers[3].self_attn.v_proj.weight, v)
    assert deformable_mapping(cfg).drop  # every dropped pattern says why
    assert all(why for why in deformable_mapping(cfg).drop.values())


def test_sparse_detr_checkpoint_errors_name_each_bad_tensor(sparse_model, sparse_ckpt):
    _, model = sparse_model
    bad = dict(sparse_ckpt)
    bad["transformer.bogus.weight"] = torch.zeros(3)  # extra
    del bad["transformer.encoder.layers.2.linear1.bias"]  # missing
    bad["transformer.pos_trans.weight"] = torch.zeros(2 * DIM, 2 * DIM)  # Deformable DETR's width
    with pytest.raises(ConversionError) as err:
        convert_deformable(bad, model, "broken.pth")
    msg = str(err.value)
    assert "broken.pth" in msg
    assert "transformer.bogus.weight: unexpected" in msg
    assert "encoder.layers.2.ffn.lin1.bias: missing" in msg
    assert "transformer.pos_trans.weight: shape (512, 512)" in msg


def test_copies_that_differ_are_refused(sparse_model, sparse_ckpt):
    _, model = sparse_model
    bad = dict(sparse_ckpt)
    bad["transformer.decoder.bbox_embed.2.layers.0.weight"] = bad["bbox_embed.2.layers.0.weight"] + 1
    with pytest.raises(ConversionError, match=r"transformer\.decoder\.bbox_embed\.2\.layers\.0\.weight: differs"):
        convert_deformable(bad, model, "x.pth")


def test_shared_heads_must_be_equal_copies():
    """Without box refinement the official file holds N equal copies of one head."""
    torch.manual_seed(0)
    cfg = effdetr_cfg(levels=1)
    model = build_model(cfg)
    official = {}
    for k, v in model.state_dict().items():  # effdetr -> official names, by hand for the parts that differ
        k = k.replace("backbone.body.", "backbone.0.body.")
        for a, b in ((".ffn.lin", ".linear"), ("reference.", "transformer.reference_points.")):
            k = k.replace(a, b)
        if k.startswith(("encoder.", "decoder.", "level_embed")):
            k = "transformer." + k
        official[k] = v.clone()
    for i in range(DEC):
        p = f"transformer.decoder.layers.{i}.self_attn."
        official[p + "in_proj_weight"] = torch.cat([official.pop(p + f"{n}_proj.weight") for n in "qkv"])
        official[p + "in_proj_bias"] = torch.cat([official.pop(p + f"{n}_proj.bias") for n in "qkv"])
    convert_deformable(official, model, "ok.pth")
    official["class_embed.1.bias"] = official["class_embed.1.bias"] + 1
    with pytest.raises(ConversionError, match=r"class_embed\.1\.bias: differs from class_embed\.0\.bias"):
        convert_deformable(official, model, "shared.pth")


def test_plain_file_into_a_refining_model_is_refused_and_args_are_checked():
    """Shared head copies fit a box-refinement model too; the decoder's bbox_embed handle
    (present exactly when the official model refines) and the saved args tell them apart."""
    import argparse
    torch.manual_seed(0)
    hf = hf_model(1, False, False)
    official = deformable_hf_to_official(hf.state_dict())
    refining = build_model(effdetr_cfg(1, box_refine=True))
    with pytest.raises(ConversionError, match=r"transformer\.decoder\.bbox_embed\.\*: absent in the file.*"
                                              r"did not refine boxes; the experiment's model does"):
        convert_deformable({"model": official}, refining, "plain.pth")
    cfg = effdetr_cfg(1)
    plain = build_model(cfg)
    args = argparse.Namespace(with_box_refine=False, two_stage=False, dilation=True, num_feature_levels=1)
    with pytest.raises(ConversionError, match=r"dc5\.pth: trained with other settings.*args\.dilation = True "
                                              r"but the model has False"):
        convert_deformable({"model": official, "args": args}, plain, "dc5.pth", "deformable_detr", cfg)
    args.dilation = False
    convert_deformable({"model": official, "args": args}, plain, "ok.pth", "deformable_detr", cfg)
