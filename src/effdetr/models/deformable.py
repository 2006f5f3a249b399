"""Deformable DETR (Zhu et al., 2021), with the two-stage / box-refinement options and the
Sparse DETR encoder (Roh et al., 2022) as a switch of the same model.

Multi-scale input: C3..C5 of the backbone projected by 1x1 conv + GroupNorm, plus stride-2
3x3 convs for extra levels; sine position + a learned level embedding. Classification is
sigmoid/focal (no no-object class), as in the paper.

Two-stage queries follow one of the two official codebases (``two_stage_variant``):

- ``deformable_detr`` (fundamentalvision/Deformable-DETR ``--two_stage``): the top-k tokens by
  the proposal head's class-0 logit; positional query and content both from one 2C->2C
  projection of their boxes' sine embedding.
- ``sparse_detr`` (kakaobrain/sparse-detr ``--eff_query_init --eff_specific_head``): the top-k
  by the best class logit; content = those tokens of the memory; positional query from a
  2C->C projection.

Two-stage decoders always refine their boxes: Deformable DETR's code fails on ``--two_stage``
without ``--with_box_refine``; Sparse DETR's fork then refines with the shared heads, as here.

Module names follow the official ones (``class_embed``/``bbox_embed`` with the proposal head
at index ``dec_layers``, ``enc_output(_norm)``, ``pos_trans(_norm)``), so released
checkpoints map 1:1 (``effdetr.convert.deformable``).
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..utils.box_ops import box_cxcywh_to_xyxy
from .backbone import Backbone
from .deformable_transformer import (DeformableDecoder, DeformableDecoderLayer, DeformableEncoder,
                                     DeformableEncoderLayer, box_sine_embedding, gather_tokens, refine,
                                     token_proposals, valid_ratios)
from .mlp import MLP
from .position import PositionEmbeddingSine

TWO_STAGE_VARIANTS = ("deformable_detr", "sparse_detr")
_MASKED_LOGIT = -1e4  # objectness logits of tokens that cannot be proposals (effdetr's ablation head)


def _group_norm(dim: int) -> nn.GroupNorm:
    """32 groups at dim 256 as published; at smaller widths keep 8 channels per group (a
    one-channel group on a 1x1 extra level has nothing to normalise)."""
    groups = min(32, max(1, dim // 8))
    while dim % groups:
        groups -= 1
    return nn.GroupNorm(groups, dim)


def _heads(head: nn.Module, n: int, unshared: bool) -> nn.ModuleList:
    """n prediction heads: clones, or one module repeated (the official shared heads; the
    state dict then holds n copies of the same tensors)."""
    return nn.ModuleList(copy.deepcopy(head) for _ in range(n)) if unshared else nn.ModuleList([head] * n)


def _new_heads(dim: int, num_classes: int) -> tuple[nn.Linear, MLP]:
    """A class head whose every logit starts at p = 0.01 and a box head predicting 0 deltas."""
    class_head = nn.Linear(dim, num_classes)
    nn.init.constant_(class_head.bias, -math.log((1 - 0.01) / 0.01))
    box_head = MLP(dim, dim, 4, 3)
    nn.init.zeros_(box_head.layers[-1].weight)
    nn.init.zeros_(box_head.layers[-1].bias)
    return class_head, box_head


def _reset_like_official(modules: list[nn.Module]) -> None:
    """The official transformer's init: xavier_uniform_ on every >1-d weight, the decoder
    self-attention's q/k/v as the one fused [3C, C] ``in_proj_weight``; the deformable
    attentions' offsets and weights keep their own init."""
    for module in modules:
        for name, p in module.named_parameters():
            if p.dim() > 1 and "sampling_offsets" not in name and "attention_weights" not in name:
                nn.init.xavier_uniform_(p)
        for m in module.modules():
            if isinstance(m, DeformableDecoderLayer):
                attn = m.self_attn
                fused = torch.empty(3 * attn.q_proj.weight.shape[0], attn.q_proj.weight.shape[1])
                nn.init.xavier_uniform_(fused)
                with torch.no_grad():
                    for lin, w in zip((attn.q_proj, attn.k_proj, attn.v_proj), fused.chunk(3)):
                        lin.weight.copy_(w)


class DeformableDETR(nn.Module):
    flops_parts = {"backbone": "backbone", "encoder": "encoder", "decoder": "decoder"}

    def __init__(self, backbone: Backbone, *, dim: int, heads: int, levels: int, points: int, enc_layers: int,
                 dec_layers: int, ffn_dim: int, dropout: float, num_queries: int, num_classes: int,
                 aux_loss: bool = True, two_stage: bool = False, box_refine: bool = False,
                 two_stage_variant: str = "deformable_detr", rho: float | None = None, saliency: str = "dam",
                 enc_aux_loss: bool = True, lite_high_levels: int | None = None, lite_blocks: int = 3,
                 lite_high_updates: int = 2, lite_low_update: str = "joint", lite_low_ffn_dim: int | None = None,
                 key_aware: bool = False, skip_finest: int = 0):
        super().__init__()
        if two_stage_variant not in TWO_STAGE_VARIANTS:
            raise ValueError(f"two_stage_variant {two_stage_variant!r} is not one of {TWO_STAGE_VARIANTS}")
        self.backbone, self.dim, self.levels, self.dec_layers = backbone, dim, levels, dec_layers
        self.num_queries, self.num_classes, self.aux_loss = num_queries, num_classes, aux_loss
        self.two_stage, self.variant, self.rho, self.saliency = two_stage, two_stage_variant, rho, saliency
        self.skip_finest, self.backbone_maps = skip_finest, min(levels, 3 - skip_finest)  # maps used of C3..C5
        self.level_strides = [8 * 2 ** (3 - self.backbone_maps + i) for i in range(levels)]  # nominal, 8 = C3
        chans = backbone.level_channels[-3:][skip_finest:][-self.backbone_maps:]
        projs = [nn.Sequential(nn.Conv2d(c, dim, 1), _group_norm(dim)) for c in chans]
        in_ch = backbone.level_channels[-1]
        for _ in range(levels - len(chans)):
            projs.append(nn.Sequential(nn.Conv2d(in_ch, dim, 3, stride=2, padding=1), _group_norm(dim)))
            in_ch = dim
        self.input_proj = nn.ModuleList(projs)
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.zeros_(proj[0].bias)
        self.level_embed = nn.Parameter(torch.randn(levels, dim))
        self.position = PositionEmbeddingSine(dim // 2, offset=-0.5)  # Deformable DETR's convention
        enc_layer = DeformableEncoderLayer(dim, heads, levels, points, ffn_dim, dropout, key_aware)
        if lite_high_levels is not None:  # Lite DETR: interleaved high/low-level updates
            from .lite_detr import InterleavedEncoder  # imported where switched on (effdetr.codedeps)
            self.encoder = InterleavedEncoder(enc_layer, levels, lite_high_levels, lite_blocks, lite_high_updates,
                                              lite_low_update, lite_low_ffn_dim)
        else:
            self.encoder = DeformableEncoder(enc_layer, enc_layers)
        self.decoder = DeformableDecoder(DeformableDecoderLayer(dim, heads, levels, points, ffn_dim, dropout,
                                                                key_aware), dec_layers)
        transformer = [self.encoder, self.decoder]

        # Sparse DETR clones every head when it has encoder aux heads, even without box refinement.
        self.enc_aux = rho is not None and enc_aux_loss and enc_layers > 1
        unshared = box_refine or self.enc_aux
        self.refine = box_refine or two_stage  # two-stage: Sparse DETR's fork (see the module doc)
        class_head, box_head = _new_heads(dim, num_classes)
        num_pred = dec_layers + (1 if two_stage else 0)  # two-stage: the proposal head is the last one
        self.class_embed = _heads(class_head, num_pred, unshared)
        self.bbox_embed = _heads(box_head, num_pred, unshared)
        if not two_stage:  # two-stage boxes start from the anchors' size instead
            nn.init.constant_(self.bbox_embed[0].layers[-1].bias[2:], -2.0)

        # Proposal features; Sparse DETR's scorer reads them too (also without two_stage, where the
        # official code has no such projection and fails: here it is the scorer's alone).
        if two_stage or rho is not None:
            self.enc_output, self.enc_output_norm = nn.Linear(dim, dim), nn.LayerNorm(dim)
            transformer.append(self.enc_output)
        if two_stage:
            width = dim if two_stage_variant == "sparse_detr" else 2 * dim
            self.pos_trans, self.pos_trans_norm = nn.Linear(2 * dim, width), nn.LayerNorm(width)
            transformer.append(self.pos_trans)
        else:
            self.query_embed = nn.Embedding(num_queries, 2 * dim)
            self.reference = nn.Linear(dim, 2)
        if rho is not None:
            from .sparse_detr import ScoringNetwork
            self.scorer = ScoringNetwork(dim)
            transformer.append(self.scorer)
            if saliency == "objectness":  # effdetr's: the official release has no objectness head
                self.objectness_box = copy.deepcopy(box_head)
            self.enc_aux_class = self.enc_aux_box = None
            if self.enc_aux:
                self.enc_aux_class = nn.ModuleList(copy.deepcopy(class_head) for _ in range(enc_layers - 1))
                self.enc_aux_box = nn.ModuleList(copy.deepcopy(box_head) for _ in range(enc_layers - 1))
        _reset_like_official(transformer)
        if not two_stage:
            nn.init.xavier_uniform_(self.reference.weight, gain=1)
            nn.init.zeros_(self.reference.bias)

    # -- inputs -------------------------------------------------------------------------
    def multiscale_inputs(self, images: Tensor, mask: Tensor):
        feats = self.backbone.forward_levels(images, mask)[-3:][self.skip_finest:][-self.backbone_maps:]
        srcs, masks = [], []
        for lvl, proj in enumerate(self.input_proj):
            if lvl < len(feats):
                x, m = feats[lvl]
                src = proj(x)
            else:
                src = proj(feats[-1][0] if lvl == len(feats) else srcs[-1])
                m = F.interpolate(mask[None].float(), size=src.shape[-2:])[0].bool()
            srcs.append(src)
            masks.append(m)
        shapes = [tuple(s.shape[-2:]) for s in srcs]
        pos = [self.position(m).to(s.dtype) + self.level_embed[lvl].view(1, -1, 1, 1)
               for lvl, (s, m) in enumerate(zip(srcs, masks))]
        flat = lambda xs: torch.cat([x.flatten(2).transpose(1, 2) for x in xs], 1)  # noqa: E731
        return flat(srcs), flat(pos), torch.cat([m.flatten(1) for m in masks], 1), shapes, valid_ratios(masks)

    # -- forward ------------------------------------------------------------------------
    def forward(self, images: Tensor, mask: Tensor) -> dict:
        """images [B,3,H,W], mask [B,H,W] True on padding. Returns ``pred_logits`` [B,Q,K]
        (sigmoid logits), ``pred_boxes`` [B,Q,4] (cx,cy,w,h in [0,1]), ``aux_outputs`` (earlier
        decoder layers), and with the options on: ``enc_outputs`` (two-stage proposals over all
        tokens, unmasked as in the official code), ``enc_aux_outputs`` (Sparse DETR encoder aux
        heads on the kept tokens, training only), ``saliency`` {logits [B,S], padding [B,S],
        target [B,S] (DAM, training only)}, ``backbone_outputs`` (objectness ablation),
        ``kept_tokens``/``tokens`` (means), ``level_tokens`` [L] (mean unpadded tokens per
        level, fine to coarse) and ``encoder_inputs`` [B,S,C] (the projected levels the encoder
        reads: DETRDistill's imitation target)."""
        src, pos, padding, shapes, ratios = self.multiscale_inputs(images, mask)
        per_level = torch.stack([p.sum(1) for p in (~padding).split([h * w for h, w in shapes], 1)], 1)
        out: dict = {"tokens": per_level.sum(1).float().mean(), "level_tokens": per_level.float().mean(0)}
        anchors = usable = None
        if self.two_stage or self.rho is not None:  # token anchors: two-stage and Sparse DETR heads
            anchors, usable = token_proposals(shapes, padding)
        keep = keep_valid = None
        enc_aux: list[dict] = []
        if self.rho is not None:
            keep, keep_valid = self.sparsify(src + pos, padding, anchors, usable, out)

        def aux_heads(i: int, kept: Tensor) -> None:
            if self.training and self.enc_aux:
                boxes = (self.enc_aux_box[i](kept) + gather_tokens(anchors, keep)).sigmoid()
                enc_aux.append({"pred_logits": self.enc_aux_class[i](kept), "pred_boxes": boxes})

        memory = self.encoder(src, pos, shapes, padding, ratios, keep=keep, keep_valid=keep_valid,
                              after_layer=aux_heads)
        tgt, query_pos, reference = self.decoder_queries(memory, out, anchors, usable)
        context = {"memory": memory, "shapes": shapes, "padding": padding, "ratios": ratios}
        decoded, samplings = self.decode_queries(context, tgt, query_pos, reference)
        out.update(decoded, memory=memory, padding=padding, context=context, encoder_inputs=src)
        if enc_aux:
            out["enc_aux_outputs"] = enc_aux
        if self.rho is not None and self.saliency == "dam" and self.training:
            from .sparse_detr import attention_map, dam_target
            out["saliency"]["target"] = dam_target(attention_map(samplings, shapes), padding, self.rho)
        return out

    def proposal_features(self, x: Tensor, usable: Tensor) -> Tensor:
        """The two-stage head's input: LN(Linear(x)) with unusable tokens zeroed first."""
        return self.enc_output_norm(self.enc_output(x.masked_fill(~usable[..., None], 0.0)))

    def sparsify(self, tokens: Tensor, padding: Tensor, anchors: Tensor, usable: Tensor, out: dict):
        """Sparse DETR: score (features + position) through the two-stage projection, keep
        the top rho of each image -> (keep [B,K], keep_valid [B,K])."""
        from .sparse_detr import select_tokens
        feats = self.proposal_features(tokens, usable)
        scores = self.scorer(feats, padding)
        keep, keep_valid = select_tokens(scores, padding, self.rho)
        out["saliency"] = {"logits": scores, "padding": padding}
        out["kept_tokens"] = keep_valid.sum(1).float().mean()
        if self.saliency == "objectness" and self.training:  # its box head is training-only
            out["backbone_outputs"] = {"pred_logits": scores.masked_fill(~usable, _MASKED_LOGIT)[..., None],
                                       "pred_boxes": (self.objectness_box(feats) + anchors).sigmoid()}
        return keep, keep_valid

    def decode_queries(self, context: dict, tgt: Tensor, query_pos: Tensor, reference: Tensor):
        """Decoder + heads -> ({pred_logits, pred_boxes, aux_outputs, hs [L,B,Q,C]}, the
        decoder's sampling locations/weights)."""
        hs, refs, samplings = self.decoder(tgt, query_pos, reference, context["memory"], context["shapes"],
                                           context["padding"], context["ratios"],
                                           box_heads=self.bbox_embed if self.refine else None)
        preds = [{"pred_logits": self.class_embed[lvl](hs[lvl]),
                  "pred_boxes": refine(self.bbox_embed[lvl](hs[lvl]), refs[lvl]).sigmoid()}
                 for lvl in range(hs.shape[0])]
        out = {**preds[-1], "hs": hs}
        if self.aux_loss:
            out["aux_outputs"] = preds[:-1]
        return out, samplings

    def decode(self, context: dict, queries: Tensor, log_scale: Tensor | None = None) -> dict:
        """Learned-query decoding of other query embeddings [Q, 2C] (positional, content) over
        an encoded image (DETRDistill's teacher-assisted stream); ``log_scale`` is unused."""
        if self.two_stage:
            raise ValueError("a two-stage model draws its queries from the image; it cannot decode given queries")
        return self.decode_queries(context, *self.learned_queries(queries, context["memory"].shape[0]))[0]

    def learned_queries(self, embed: Tensor, batch: int):
        """Query embeddings [Q, 2C] -> (content, positional, initial references) per image."""
        query_pos, tgt = embed.split(self.dim, dim=-1)
        query_pos, tgt = query_pos.expand(batch, -1, -1), tgt.expand(batch, -1, -1)
        return tgt, query_pos, self.reference(query_pos).sigmoid()

    def decoder_queries(self, memory: Tensor, out: dict, anchors: Tensor | None = None, usable: Tensor | None = None):
        """-> (content queries, positional queries, initial references in sigmoid space).
        Two-stage: every token proposes a box (the heads at index ``dec_layers``; unusable
        tokens with zeroed features and +inf anchors); the top k, ranked without masking any
        token as in the official code, become the queries, their boxes detached."""
        if not self.two_stage:
            return self.learned_queries(self.query_embed.weight, memory.shape[0])
        feats = self.proposal_features(memory, usable)
        logits = self.class_embed[self.dec_layers](feats)
        coords = self.bbox_embed[self.dec_layers](feats) + anchors
        out["enc_outputs"] = {"pred_logits": logits, "pred_boxes": coords.sigmoid()}
        sparse = self.variant == "sparse_detr"
        score = logits.max(-1).values if sparse else logits[..., 0]
        top = score.topk(min(self.num_queries, memory.shape[1]), dim=1).indices
        reference = gather_tokens(coords, top).detach().sigmoid()
        pos = self.pos_trans_norm(self.pos_trans(box_sine_embedding(reference, self.dim)))
        if sparse:
            return gather_tokens(memory, top), pos, reference
        query_pos, tgt = pos.split(self.dim, dim=-1)
        return tgt, query_pos, reference

    @torch.no_grad()
    def postprocess(self, outputs: dict, orig_sizes: Tensor, num_select: int = 100) -> list[dict]:
        """Top-``num_select`` (query, class) pairs by sigmoid score -> absolute xyxy boxes."""
        prob = outputs["pred_logits"].float().sigmoid()
        b, q, k = prob.shape
        scores, idx = prob.flatten(1).topk(min(num_select, q * k), dim=1)
        boxes = box_cxcywh_to_xyxy(outputs["pred_boxes"].float()).gather(1, (idx // k)[..., None].expand(-1, -1, 4))
        h, w = orig_sizes.float().unbind(1)
        boxes = boxes * torch.stack([w, h, w, h], dim=1)[:, None, :]
        return [{"scores": s, "labels": lab, "boxes": bx} for s, lab, bx in zip(scores, idx % k, boxes)]

    def param_groups(self, lr: float, lr_backbone: float, weight_decay: float) -> list[dict]:
        """Backbone at its own LR; sampling-offset and reference projections at LR x 0.1."""
        groups = {"backbone": [], "slow": [], "rest": []}
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            key = ("backbone" if name.startswith("backbone.") else
                   "slow" if "sampling_offsets" in name or name.startswith("reference.") else "rest")
            groups[key].append(p)
        return [{"params": groups["rest"], "lr": lr, "weight_decay": weight_decay},
                {"params": groups["backbone"], "lr": lr_backbone, "weight_decay": weight_decay},
                {"params": groups["slow"], "lr": lr * 0.1, "weight_decay": weight_decay}]


def build_deformable(cfg) -> DeformableDETR:
    d, s = cfg.deformable, cfg.sparse
    return DeformableDETR(Backbone(cfg.backbone, train_backbone=True), dim=cfg.hidden_dim, heads=cfg.nheads,
                          levels=d.num_levels, points=d.num_points, enc_layers=cfg.enc_layers,
                          dec_layers=cfg.dec_layers, ffn_dim=cfg.ffn_dim, dropout=cfg.dropout,
                          num_queries=cfg.num_queries, num_classes=cfg.num_classes, aux_loss=cfg.aux_loss,
                          two_stage=d.two_stage, box_refine=d.box_refine, two_stage_variant=d.two_stage_variant,
                          rho=s.rho, saliency=s.saliency, enc_aux_loss=s.enc_aux_loss,
                          lite_high_levels=cfg.lite.high_levels, lite_blocks=cfg.lite.blocks,
                          lite_high_updates=cfg.lite.high_updates, lite_low_update=cfg.lite.low_update,
                          lite_low_ffn_dim=cfg.lite.low_ffn_dim, key_aware=cfg.lite.key_aware,
                          skip_finest=d.skip_finest)
