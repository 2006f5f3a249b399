"""DETR (Carion et al., 2020): backbone -> 1x1 projection -> transformer -> set prediction."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .backbone import Backbone
from .position import PositionEmbeddingSine
from .transformer import Transformer


class MLP(nn.Module):
    def __init__(self, in_dim: int, hidden: int, out_dim: int, num_layers: int):
        super().__init__()
        dims = [in_dim] + [hidden] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, dims[1:] + [out_dim]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


class DETR(nn.Module):
    def __init__(self, backbone: Backbone, transformer: Transformer, num_classes: int,
                 num_queries: int, aux_loss: bool = True):
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

    def forward(self, images: Tensor, mask: Tensor) -> dict:
        """images [B,3,H,W] (normalised, zero-padded), mask [B,H,W] True on padding.

        Returns ``pred_logits`` [B,Q,num_classes+1] (last = no object), ``pred_boxes``
        [B,Q,4] normalised (cx,cy,w,h) in [0,1], ``aux_outputs`` (list of the same for each
        earlier decoder layer, when aux_loss) and ``memory`` [B,HW,C] (encoder output).
        """
        feats, fmask = self.backbone(images, mask)
        pos = self.position(fmask).to(feats.dtype)
        hs, memory = self.transformer(self.input_proj(feats), fmask, self.query_embed.weight, pos)
        logits = self.class_embed(hs)
        boxes = self.bbox_embed(hs).sigmoid()
        out = {"pred_logits": logits[-1], "pred_boxes": boxes[-1], "memory": memory}
        if self.aux_loss:
            out["aux_outputs"] = [{"pred_logits": a, "pred_boxes": b}
                                  for a, b in zip(logits[:-1], boxes[:-1])]
        return out

    def param_groups(self, lr: float, lr_backbone: float, weight_decay: float) -> list[dict]:
        """AdamW groups: the backbone gets its own learning rate."""
        body = [p for n, p in self.named_parameters() if n.startswith("backbone.") and p.requires_grad]
        rest = [p for n, p in self.named_parameters() if not n.startswith("backbone.") and p.requires_grad]
        return [{"params": rest, "lr": lr, "weight_decay": weight_decay},
                {"params": body, "lr": lr_backbone, "weight_decay": weight_decay}]


def build_detr(cfg) -> DETR:
    backbone = Backbone(cfg.backbone, train_backbone=True)
    transformer = Transformer(cfg.hidden_dim, cfg.nheads, cfg.enc_layers, cfg.dec_layers,
                              cfg.ffn_dim, cfg.dropout, cfg.pre_norm)
    return DETR(backbone, transformer, cfg.num_classes, cfg.num_queries, cfg.aux_loss)
