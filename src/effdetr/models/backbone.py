"""CNN backbones from timm, returning the last stage (C5) with its padding mask.

ResNet-50 (optionally DC5: last stage dilated, stride 16) at paper scale, and a small
``tiny`` ResNet (BasicBlock, one block per stage, configurable widths) for SynthCOCO.
Batch norm is frozen as in DETR when ``freeze_bn`` is set.
"""
from __future__ import annotations

from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from timm.models.resnet import BasicBlock, ResNet
from torch import Tensor, nn


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm with fixed statistics and affine parameters (buffers, not parameters)."""

    def __init__(self, num_features: int, eps: float = 1e-5, **_):
        super().__init__()
        for name, init in (("weight", torch.ones), ("bias", torch.zeros),
                           ("running_mean", torch.zeros), ("running_var", torch.ones)):
            self.register_buffer(name, init(num_features))
        self.eps = eps

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale[None, :, None, None] + shift[None, :, None, None]


def output_stride_of(cfg) -> int:
    """32 as published, 16 for DC5 (last stage dilated), 8 with the third stage dilated too."""
    return 8 if cfg.dilate_layer3 else 16 if cfg.dilation else 32


def _make_resnet(cfg) -> ResNet:
    norm = FrozenBatchNorm2d if cfg.freeze_bn else nn.BatchNorm2d
    output_stride = output_stride_of(cfg)
    if cfg.name == "tiny":
        channels = tuple(cfg.channels or (32, 64, 128, 256))
        return ResNet(BasicBlock, (1, 1, 1, 1), channels=channels, stem_width=channels[0] // 2,
                      num_classes=0, global_pool="", output_stride=output_stride, norm_layer=norm)
    pretrained = cfg.pretrained == "imagenet"
    return timm.create_model(cfg.name, pretrained=pretrained, num_classes=0, global_pool="",
                             output_stride=output_stride, norm_layer=norm)


class Backbone(nn.Module):
    """timm ResNet trunk -> (C5 features [B,C,H/s,W/s], mask [B,H/s,W/s] True on padding)."""

    def __init__(self, cfg, train_backbone: bool = True):
        super().__init__()
        # channels_last: ~1.7x faster convolutions on CPU (oneDNN), neutral on GPU.
        self.body = _make_resnet(cfg).to(memory_format=torch.channels_last)
        self.num_channels = self.body.num_features
        self.stride = output_stride_of(cfg)
        if cfg.pretrained not in ("imagenet", "none", "pipeline"):
            load_backbone_weights(self.body, cfg.pretrained)
        for name, p in self.body.named_parameters():
            trainable = train_backbone and (cfg.train_stem_and_layer1 or
                                            name.startswith(("layer2", "layer3", "layer4")))
            p.requires_grad_(trainable)

    def forward(self, images: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        feats = self.body.forward_features(images.contiguous(memory_format=torch.channels_last))
        m = F.interpolate(mask[None].float(), size=feats.shape[-2:])[0].bool()
        return feats, m

    @property
    def level_channels(self) -> list[int]:
        """Channels of C3, C4, C5 (the multi-scale detectors' inputs)."""
        return [info["num_chs"] for info in self.body.feature_info[2:]]

    def forward_levels(self, images: Tensor, mask: Tensor) -> list[tuple[Tensor, Tensor]]:
        """C3, C4, C5 (strides 8, 16, 32; 8, 16, 16 with DC5) with their padding masks."""
        b = self.body
        x = b.maxpool(b.act1(b.bn1(b.conv1(images.contiguous(memory_format=torch.channels_last)))))
        x = b.layer1(x)
        out = []
        for layer in (b.layer2, b.layer3, b.layer4):
            x = layer(x)
            out.append((x, F.interpolate(mask[None].float(), size=x.shape[-2:])[0].bool()))
        return out


def load_backbone_weights(body: nn.Module, path: str) -> None:
    """Load trunk weights from a checkpoint file; errors name the file and what is wrong."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{path}: backbone checkpoint not found (model.backbone.pretrained)")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the file name
        raise ValueError(f"{path}: not a readable torch checkpoint ({e})") from None
    state = state.get("model", state)
    state = {k.removeprefix("backbone.body."): v for k, v in state.items()}
    missing, unexpected = body.load_state_dict(state, strict=False)
    if missing:
        raise ValueError(f"{path}: backbone checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
    # Trunk tensors this trunk has no place for mean another layout (e.g. a stride-16 shortcut
    # that dilate_layer3 removes when two stages have equal widths); dropping them would
    # silently change the function. Other prefixes (a detector's heads) are not the trunk's.
    extra = [k for k in unexpected if k.split(".")[0] in ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")]
    if extra:
        raise ValueError(f"{path}: backbone checkpoint has {len(extra)} trunk tensors this backbone lacks, "
                         f"e.g. {extra[:3]} (model.backbone layout differs: channels, dilation, dilate_layer3)")
