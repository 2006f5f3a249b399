"""facebookresearch/detr checkpoints -> effdetr DETR (R50 and R50-DC5).

The reference is HF transformers' DETR with random weights: its state dict is put into the
official layout (tests/hf_layout.py, checked here against the official module tree built
from torch/torchvision parts) and converted; effdetr must then reproduce HF's outputs on a
padded batch. Every tensor gets noise, so no mis-mapped one can hide behind a 0/1 init.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools

import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from effdetr.config import BackboneConfig, ModelConfig
from effdetr.convert.detr import convert_detr, detr_mapping
from effdetr.convert.mapping import ConversionError
from effdetr.models import build_model

from .hf_layout import detr_hf_to_official

pytest.importorskip("transformers")

SMALL = dict(dim=64, heads=8, ffn=128, layers=2, queries=10)
PAPER = dict(dim=256, heads=8, ffn=2048, layers=6, queries=100)


def effdetr_cfg(dilation, dim, heads, ffn, layers, queries) -> ModelConfig:
    return ModelConfig(arch="detr", backbone=BackboneConfig(name="resnet50", pretrained="none", dilation=dilation,
                                                            freeze_bn=True),
                       hidden_dim=dim, nheads=heads, enc_layers=layers, dec_layers=layers, ffn_dim=ffn, dropout=0.1,
                       num_queries=queries, num_classes=91, aux_loss=True, pre_norm=False, box_reference=False,
                       spatial_prior=False)


@torch.no_grad()
def randomise(model: nn.Module, trunk: nn.Module, seed: int) -> None:
    """Fresh random values in every tensor, at scales where each matters.

    Projections get std 0.6/sqrt(fan_in): attention is peaked (HF's 0.02 init leaves it
    near uniform, where a swapped q/k block hides), so a swapped block moves outputs by
    >1e-3, while fp32 rounding of the 50-layer trunk, amplified through the transformer,
    stays several times under 1e-4. Biases and LayerNorm affines move off 0/1; frozen-BN
    statistics are set near the trunk's actual activation statistics (so the random trunk
    stays well scaled), with random affines.
    """
    g = torch.Generator().manual_seed(seed)
    randn = lambda t, s=1.0: t.copy_(torch.randn(t.shape, generator=g) * s)  # noqa: E731
    uniform = lambda t, lo, hi: t.copy_(lo + (hi - lo) * torch.rand(t.shape, generator=g))  # noqa: E731
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for m in model.modules():
        if isinstance(m, nn.Embedding):
            randn(m.weight)
        elif isinstance(m, nn.Conv2d):
            randn(m.weight, m.weight[0].numel() ** -0.5)
        elif isinstance(m, nn.Linear):
            randn(m.weight, 0.6 * m.in_features ** -0.5)
        elif isinstance(m, nn.MultiheadAttention):
            randn(m.in_proj_weight, 0.6 * m.embed_dim ** -0.5)
            randn(m.in_proj_bias, 0.1)
        elif isinstance(m, nn.LayerNorm):
            uniform(m.weight, 0.5, 1.5)
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.LayerNorm)) and m.bias is not None:
            randn(m.bias, 0.1)
    hooks = []
    for bn in trunk.modules():
        if hasattr(bn, "running_var") and not list(bn.children()):
            def calibrate(mod, inp):
                x = inp[0]
                mod.running_mean.copy_(x.mean((0, 2, 3)) + 0.1 * x.std() * torch.randn(x.shape[1], generator=g))
                mod.running_var.copy_(x.var((0, 2, 3)) * (0.8 + 0.4 * torch.rand(x.shape[1], generator=g)))
                uniform(mod.weight, 0.5, 1.5)
                randn(mod.bias, 0.1)
            hooks.append(bn.register_forward_pre_hook(calibrate))
    trunk(torch.randn(2, 3, 96, 96, generator=g))
    for h in hooks:
        h.remove()
    same = [k for k, v in model.state_dict().items() if v.is_floating_point() and torch.equal(v, before[k])]
    assert not same, f"not randomised: {same}"


def hf_detr(dilation, dim, heads, ffn, layers, queries):
    from transformers import DetrConfig, DetrForObjectDetection
    cfg = DetrConfig(use_pretrained_backbone=False, dilation=dilation, d_model=dim, encoder_layers=layers,
                     decoder_layers=layers, encoder_attention_heads=heads, decoder_attention_heads=heads,
                     encoder_ffn_dim=ffn, decoder_ffn_dim=ffn, num_queries=queries, num_labels=91,
                     auxiliary_loss=False)  # with it, HF re-feeds the normed states to later layers
    torch.manual_seed(0)
    hf = DetrForObjectDetection(cfg).eval()
    randomise(hf, hf.model.backbone.model, seed=1)
    return hf


class OfficialDETR(nn.Module):
    """facebookresearch/detr's module tree (hubconf._make_detr), weights only: torchvision
    ResNet-50 with FrozenBatchNorm2d under backbone.0.body (IntermediateLayerGetter keeps
    conv1..layer4), and torch's Transformer{En,De}coderLayer, whose attribute names the
    official layers copy."""

    def __init__(self, dilation, dim, heads, ffn, layers, queries, num_classes=91):
        super().__init__()
        body = torchvision.models.resnet50(replace_stride_with_dilation=[False, False, dilation],
                                           norm_layer=FrozenBatchNorm2d)
        body.fc = nn.Identity()  # no tensors, as in IntermediateLayerGetter's copy
        self.backbone = nn.Sequential(nn.Module())
        self.backbone[0].body = body
        self.transformer = nn.Module()
        self.transformer.encoder, self.transformer.decoder = nn.Module(), nn.Module()
        self.transformer.encoder.layers = nn.ModuleList(nn.TransformerEncoderLayer(dim, heads, ffn)
                                                        for _ in range(layers))
        self.transformer.decoder.layers = nn.ModuleList(nn.TransformerDecoderLayer(dim, heads, ffn)
                                                        for _ in range(layers))
        self.transformer.decoder.norm = nn.LayerNorm(dim)
        self.input_proj = nn.Conv2d(2048, dim, 1)
        self.query_embed = nn.Embedding(queries, dim)
        self.class_embed = nn.Linear(dim, num_classes + 1)
        self.bbox_embed = nn.Module()
        self.bbox_embed.layers = nn.ModuleList([nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, 4)])

    def trunk(self, x):
        b = self.backbone[0].body
        x = b.maxpool(b.relu(b.bn1(b.conv1(x))))
        return b.layer4(b.layer3(b.layer2(b.layer1(x))))


def padded_batch(h=128, w=160, small=(96, 112), seed=2):
    """Two images, the second zero-padded from ``small``: HF pixel_mask 1 = valid, effdetr
    mask True = padding."""
    images = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(seed))
    pad = torch.zeros(2, h, w, dtype=torch.bool)
    pad[1, small[0]:, :] = pad[1, :, small[1]:] = True
    images[pad[:, None].expand_as(images)] = 0
    return images, pad


def converted_effdetr(official, dilation, size, file="hf-random.pth"):
    model = build_model(effdetr_cfg(dilation, **size)).eval()
    model.load_state_dict(convert_detr({"model": official}, model, file), strict=True)
    return model


def max_diffs(hf, model, images, pad):
    with torch.no_grad():
        ref = hf(pixel_values=images, pixel_mask=(~pad).long())
        out = model(images, pad)
    return ((out["pred_logits"] - ref.logits).abs().max().item(),
            (out["pred_boxes"] - ref.pred_boxes).abs().max().item())


@functools.cache
def small_case(dilation: bool):
    """A small-transformer HF DETR (R50 or DC5 trunk) and its official-layout state dict."""
    hf = hf_detr(dilation, **SMALL)
    return hf, detr_hf_to_official(hf.state_dict())


@pytest.mark.parametrize("dilation", [False, True], ids=["R50", "R50-DC5"])
def test_parity_with_hf(dilation):
    hf, official = small_case(dilation)
    model = converted_effdetr(official, dilation, SMALL)
    logits, boxes = max_diffs(hf, model, *padded_batch())
    print(f"\n{'R50-DC5' if dilation else 'R50'} (small transformer): max|logits| diff {logits:.2e}, "
          f"max|boxes| diff {boxes:.2e}")
    assert logits <= 1e-4 and boxes <= 1e-4


def test_paper_config_parity_and_layout():
    """6+6 layers, 256 wide, 100 queries: the HF-derived file has exactly the official
    keys and shapes, every effdetr tensor is produced, and a 64x64 forward matches."""
    hf = hf_detr(False, **PAPER)
    official = detr_hf_to_official(hf.state_dict())
    reference = {k: tuple(v.shape) for k, v in OfficialDETR(False, **PAPER).state_dict().items()}
    assert {k: tuple(v.shape) for k, v in official.items()} == reference
    model = converted_effdetr(official, False, PAPER)
    logits, boxes = max_diffs(hf, model, *padded_batch(64, 64, small=(48, 56)))
    print(f"\nR50 (paper config, 64x64): max|logits| diff {logits:.2e}, max|boxes| diff {boxes:.2e}")
    assert logits <= 1e-4 and boxes <= 1e-4


@pytest.mark.parametrize("dilation", [False, True], ids=["R50", "R50-DC5"])
def test_official_trunk_matches_torchvision(dilation):
    """The official trunk is torchvision's ResNet-50 (replace_stride_with_dilation for DC5);
    effdetr's timm trunk must compute the same features from the converted weights."""
    torch.manual_seed(3)
    official = OfficialDETR(dilation, **SMALL).eval()
    randomise(official, official.backbone[0].body, seed=4)
    model = converted_effdetr(official.state_dict(), dilation, SMALL)
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        ref, out = official.trunk(x), model.backbone.body.forward_features(x)
    assert out.shape == ref.shape == (1, 2048, *((6, 8) if dilation else (3, 4)))
    assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()


@pytest.mark.parametrize("key", ["transformer.encoder.layers.0.self_attn.in_proj_weight",
                                 "transformer.decoder.layers.1.multihead_attn.in_proj_weight"])
def test_swapped_qk_rows_are_caught(key):
    """Negative control: with the q and k rows of one fused projection swapped, parity
    fails by far, so the test above would see a wrong split order."""
    hf, official = small_case(False)
    q, k, v = official[key].chunk(3)
    logits, boxes = max_diffs(hf, converted_effdetr({**official, key: torch.cat([k, q, v])}, False, SMALL),
                              *padded_batch())
    assert max(logits, boxes) > 1e-3


def test_mismatched_checkpoint_names_every_problem():
    bad = dict(small_case(False)[1])
    bad["backbone.0.body.fc.weight"] = torch.zeros(1000, 2048)  # extra (an ImageNet classifier)
    del bad["transformer.decoder.layers.1.norm3.weight"]  # missing
    bad["query_embed.weight"] = bad["query_embed.weight"][:-1]  # mis-shaped
    model = build_model(effdetr_cfg(False, **SMALL))
    with pytest.raises(ConversionError) as e:
        convert_detr({"model": bad}, model, "detr-r50-broken.pth")
    msg = str(e.value)
    assert msg.startswith("detr-r50-broken.pth: 3 tensors")
    assert "backbone.0.body.fc.weight: maps to backbone.body.fc.weight, which the model does not have" in msg
    assert "transformer.decoder.1.norm3.weight: missing" in msg  # named as the model's key
    assert f"query_embed.weight: shape ({SMALL['queries'] - 1}, {SMALL['dim']})" in msg


def test_bare_state_dict_and_training_args():
    """A bare state dict converts like ckpt["model"]; training args that contradict the
    model (DC5 file into an R50 model: same tensors) are refused."""
    official = small_case(False)[1]
    model = build_model(effdetr_cfg(False, **SMALL))
    bare = convert_detr(official, model, "bare.pth")
    wrapped = convert_detr({"model": official, "args": argparse.Namespace(dilation=False, nheads=8)}, model, "ok.pth")
    assert bare.keys() == wrapped.keys() == model.state_dict().keys()
    with pytest.raises(ConversionError, match=r"dc5\.pth: .*args\.dilation = True but the model has False"):
        convert_detr({"model": official, "args": argparse.Namespace(dilation=True, nheads=8)}, model, "dc5.pth")


def test_mapping_refuses_configs_no_official_detr_has():
    """detr_mapping(cfg) maps like convert_detr, and refuses what the tensors cannot show."""
    cfg, official = effdetr_cfg(True, **SMALL), small_case(False)[1]
    model = build_model(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert detr_mapping(cfg).apply(official, shapes, "f.pth").keys() == convert_detr(official, model, "f.pth").keys()
    with pytest.raises(ValueError, match="dilate_layer3"):
        detr_mapping(dataclasses.replace(cfg, backbone=dataclasses.replace(cfg.backbone, dilate_layer3=True)))
    with pytest.raises(ValueError, match="deformable"):
        detr_mapping(dataclasses.replace(cfg, arch="deformable"))
