"""facebookresearch/detr checkpoints (DETR R50, R50-DC5, ...) -> effdetr's DETR.

The official model (``models/detr.py``, ``transformer.py``, ``backbone.py``) stores
``backbone.0.body.*`` (torchvision ResNet with FrozenBatchNorm2d, whose names coincide with
timm's), ``input_proj``, ``query_embed``, ``class_embed``, ``bbox_embed.layers.{0,1,2}`` and
a transformer of ``nn.MultiheadAttention`` layers. Their fused ``in_proj_weight`` [3C, C] /
``in_proj_bias`` [3C] hold the q, k, v projections in that order (the order
``F.multi_head_attention_forward`` splits them in); effdetr keeps them separate.

Dropped, and nothing else: ``backbone.0.body.*.num_batches_tracked``, the step counter of
a plain BatchNorm2d. The official FrozenBatchNorm2d has no such buffer and deletes it on
load, so a file saved from an ordinary-BN trunk loads there; it holds no weight.

The tensors cannot tell everything: R50 and R50-DC5 (and any head count) have identical
shapes, so the model must be built with the file's ``backbone.dilation`` and ``nheads``.
When the file carries its training ``args`` (official ``main.py`` saves them), they are
checked against the model.
"""
from __future__ import annotations

from torch import Tensor, nn

from .mapping import ConversionError, StrictMapping, rename, split_rows

_LAYER = r"transformer\.(encoder|decoder)\.layers\.(\d+)"
_RULES = [
    (r"backbone\.0\.body\.(.+)", rename(r"backbone.body.\1")),
    (r"(input_proj|query_embed|class_embed|bbox_embed)\.(.+)", rename(r"\1.\2")),
    (_LAYER + r"\.self_attn\.in_proj_(weight|bias)",
     split_rows(*(rf"transformer.\1.\2.self_attn.{p}_proj.\3" for p in "qkv"))),
    (_LAYER + r"\.multihead_attn\.in_proj_(weight|bias)",
     split_rows(*(rf"transformer.\1.\2.cross_attn.{p}_proj.\3" for p in "qkv"))),
    (_LAYER + r"\.self_attn\.out_proj\.(weight|bias)", rename(r"transformer.\1.\2.self_attn.out_proj.\3")),
    (_LAYER + r"\.multihead_attn\.out_proj\.(weight|bias)", rename(r"transformer.\1.\2.cross_attn.out_proj.\3")),
    (_LAYER + r"\.linear([12])\.(weight|bias)", rename(r"transformer.\1.\2.ffn.lin\3.\4")),
    (_LAYER + r"\.(norm[123])\.(weight|bias)", rename(r"transformer.\1.\2.\3.\4")),
    (r"transformer\.decoder\.norm\.(weight|bias)", rename(r"transformer.dec_norm.\1")),
    (r"transformer\.encoder\.norm\.(weight|bias)", rename(r"transformer.enc_norm.\1")),  # pre-norm only
]
_DROP = {r"backbone\.0\.body\..*\.num_batches_tracked":
         "BatchNorm step counter, no weight; official FrozenBatchNorm2d deletes it on load"}


def _mapping() -> StrictMapping:
    return StrictMapping(_RULES, _DROP)


def detr_mapping(model_cfg) -> StrictMapping:
    """The official -> effdetr rules for ``model_cfg``; refuses configs no official DETR has
    whose tensors would still fit (so loading would silently compute something else)."""
    if model_cfg.arch != "detr":
        raise ValueError(f"official DETR checkpoints load into model.arch 'detr', not {model_cfg.arch!r}")
    if model_cfg.backbone.dilate_layer3:
        raise ValueError("official DETR has no stride-8 trunk (model.backbone.dilate_layer3); its R50/DC5 "
                         "tensors would fit but compute different features")
    return _mapping()


def convert_detr(state_dict: dict, model: nn.Module, file) -> dict[str, Tensor]:
    """An official checkpoint (``{"model": ...}`` or the bare state dict) -> ``model``'s
    state dict; ConversionError (naming ``file``) lists every tensor that does not fit."""
    source = state_dict["model"] if isinstance(state_dict.get("model"), dict) else state_dict
    stride, nheads = model.backbone.stride, model.transformer.decoder[0].self_attn.nheads
    if stride not in (16, 32):
        raise ConversionError(f"{file}: official DETR trunks have stride 32 (R50) or 16 (DC5), the model {stride}")
    args = state_dict.get("args")
    if args is not None:  # argparse.Namespace of the official main.py
        have = args if isinstance(args, dict) else vars(args)
        want = {"dilation": stride == 16, "nheads": nheads}
        bad = [f"args.{k} = {have[k]!r} but the model has {v!r}" for k, v in want.items() if k in have and have[k] != v]
        if bad:
            raise ConversionError(f"{file}: trained with other settings than the model: {'; '.join(bad)}")
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return _mapping().apply(source, shapes, file)
