"""DETR (Carion et al., 2020): backbone -> 1x1 projection -> transformer -> set prediction."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.attention import DenseAttentionKernel
from .backbone import Backbone
from .mlp import MLP
from .position import PositionEmbeddingSine
from .transformer import Transformer

__all__ = ["DETR", "MLP", "build_detr", "set_encoder_attention"]


class DETR(nn.Module):
    flops_parts = {"backbone": "backbone", "encoder": "transformer.encoder", "decoder": "transformer.decoder"}

    def __init__(self, backbone: Backbone, transformer: Transformer, num_classes: int,
                 num_queries: int, aux_loss: bool = True, box_reference: bool = False,
                 spatial_prior: bool = False):
        super().__init__()
        dim = transformer.dim
        self.backbone, self.transformer = backbone, transformer
        self.position = PositionEmbeddingSine(dim // 2)
        self.input_proj = nn.Conv2d(backbone.num_channels, dim, kernel_size=1)
        self.query_embed = nn.Embedding(num_queries, dim)
        self.class_embed = nn.Linear(dim, num_classes + 1)
        self.bbox_embed = MLP(dim, dim, 4, 3)
        self.aux_loss = aux_loss
        self.num_classes = num_classes
        # Optional (off in DETR): each query owns a learned reference point and predicts its
        # box centre as an offset from it in logit space; boxes start at the references.
        self.reference = nn.Linear(dim, 2) if box_reference else None
        if box_reference:
            nn.init.xavier_uniform_(self.reference.weight)
            nn.init.zeros_(self.reference.bias)
            nn.init.zeros_(self.bbox_embed.layers[-1].weight)
            nn.init.zeros_(self.bbox_embed.layers[-1].bias)
        # Optional (off in DETR): a Gaussian-shaped logit bias around each reference point.
        self.log_scale = nn.Parameter(torch.full((num_queries, 1), -2.0)) if spatial_prior else None

    def forward(self, images: Tensor, mask: Tensor) -> dict:
        """images [B,3,H,W] (normalised, zero-padded), mask [B,H,W] True on padding.

        Returns ``pred_logits`` [B,Q,num_classes+1] (last = no object), ``pred_boxes``
        [B,Q,4] normalised (cx,cy,w,h) in [0,1], ``aux_outputs`` (list of the same for each
        earlier decoder layer, when aux_loss), ``hs`` [L,B,Q,C] (decoder states), ``memory``
        [B,HW,C] (encoder output), ``padding`` [B,HW] and ``context`` (what :meth:`decode`
        needs to run other queries over the same image, for distillation), ``encoder_inputs``
        [B,HW,C] (the projected C5 map the encoder reads: DETRDistill's imitation target).
        """
        feats, fmask = self.backbone(images, mask)
        pos = self.position(fmask).to(feats.dtype)
        src = self.input_proj(feats)
        flat_pos, padding = pos.flatten(2).transpose(1, 2), fmask.flatten(1)
        memory = self.transformer.encode(src.flatten(2).transpose(1, 2), padding, flat_pos)
        context = {"memory": memory, "pos": flat_pos, "fmask": fmask, "padding": padding}
        out = self.decode(context, self.query_embed.weight, self.log_scale)
        out.update(memory=memory, padding=padding, context=context, encoder_inputs=src.flatten(2).transpose(1, 2))
        return out

    def decode(self, context: dict, queries: Tensor, log_scale: Tensor | None = None) -> dict:
        """Decoder + heads for query embeddings [Q,C] (or per image [B,Q,C]) over an encoded
        image; ``log_scale`` [Q,1]: the spatial prior's per-query widths (with spatial_prior)."""
        memory, fmask = context["memory"], context["fmask"]
        ref = None
        if self.reference is not None:
            ref = self.reference(queries).sigmoid().clamp(1e-4, 1 - 1e-4)  # [(B,)Q,2] (x,y)
        if log_scale is None:
            log_scale = self.log_scale
        bias = self.spatial_bias(ref, fmask, log_scale) if log_scale is not None else None
        hs = self.transformer.decode(memory, context["padding"], context["pos"], queries, bias)
        logits = self.class_embed(hs)
        raw = self.bbox_embed(hs)
        if ref is not None:
            raw = raw + F.pad(torch.log(ref / (1 - ref)), (0, 2))
        boxes = raw.sigmoid()
        out = {"pred_logits": logits[-1], "pred_boxes": boxes[-1], "hs": hs}
        if self.aux_loss:
            out["aux_outputs"] = [{"pred_logits": a, "pred_boxes": b}
                                  for a, b in zip(logits[:-1], boxes[:-1])]
        return out

    def spatial_bias(self, ref: Tensor, fmask: Tensor, log_scale: Tensor) -> Tensor:
        """-|p - r_q|^2 / (2 s_q^2) for every query q and feature cell p, in coordinates
        normalised to the unpadded image (as boxes are) -> [B,1,Q,HW]."""
        valid = (~fmask).float()
        ys = (valid.cumsum(1) - 0.5) / valid.sum(1, keepdim=True).clamp(min=1)
        xs = (valid.cumsum(2) - 0.5) / valid.sum(2, keepdim=True).clamp(min=1)
        dx = xs.flatten(1)[:, None, :] - ref[..., 0:1]
        dy = ys.flatten(1)[:, None, :] - ref[..., 1:2]
        scale = log_scale.exp()[None]  # [1,Q,1]
        return (-(dx * dx + dy * dy) / (2 * scale * scale)).unsqueeze(1)

    def param_groups(self, lr: float, lr_backbone: float, weight_decay: float) -> list[dict]:
        """AdamW groups: the backbone gets its own learning rate."""
        body = [p for n, p in self.named_parameters() if n.startswith("backbone.") and p.requires_grad]
        rest = [p for n, p in self.named_parameters() if not n.startswith("backbone.") and p.requires_grad]
        return [{"params": rest, "lr": lr, "weight_decay": weight_decay},
                {"params": body, "lr": lr_backbone, "weight_decay": weight_decay}]


def set_encoder_attention(transformer: Transformer, kind: str, act_cfg=None) -> None:
    """Put ``kind`` (dense | act | kmeans) kernels into every encoder self-attention.

    Kernels hold no trained parameters, so this works on a trained model in place; layer
    i hashes with seed ``act_cfg.seed + i`` (independent projections per layer). ACT's
    module is imported only for its kernels (a dense model's code does not include it)."""
    if kind in ("act", "kmeans"):
        from ..ops.act import ACTAttentionKernel, KMeansAttentionKernel
    for i, attn in enumerate(transformer.encoder_attention_modules()):
        if kind == "dense":
            attn.kernel = DenseAttentionKernel()
        elif kind == "act":
            attn.kernel = ACTAttentionKernel(attn.head_dim, act_cfg.rounds, act_cfg.bucket_width, act_cfg.seed + i)
        elif kind == "kmeans":
            attn.kernel = KMeansAttentionKernel(attn.head_dim, act_cfg.rounds, act_cfg.bucket_width,
                                                act_cfg.seed + i, act_cfg.kmeans_iters)
        else:
            raise ValueError(f"unknown encoder attention {kind!r}")


def build_detr(cfg) -> DETR:
    backbone = Backbone(cfg.backbone, train_backbone=True)
    transformer = Transformer(cfg.hidden_dim, cfg.nheads, cfg.enc_layers, cfg.dec_layers,
                              cfg.ffn_dim, cfg.dropout, cfg.pre_norm)
    set_encoder_attention(transformer, cfg.encoder_attention, cfg.act)
    return DETR(backbone, transformer, cfg.num_classes, cfg.num_queries, cfg.aux_loss, cfg.box_reference,
                cfg.spatial_prior)
