"""HF transformers state dicts -> the official repositories' checkpoint layouts (test helper).

Each function inverts HF's conversion script for one model family (transformers 5.23 key
names), so a randomly initialised HF model can be fed through effdetr's converters as if it
were a released checkpoint, and HF's forward serves as the numerical reference. Strict: an
HF key no rule knows raises, so a renamed HF attribute cannot slip through unconverted.
"""
from __future__ import annotations

import re

import torch

# HF DetrForObjectDetection -> facebookresearch/detr (inverse of transformers'
# convert_detr_original_pytorch_checkpoint_to_pytorch.py); first full match wins.
_DETR_LAYER = r"model\.(encoder|decoder)\.layers\.(\d+)"
_DETR_RENAMES = [
    (r"model\.backbone\.model\.(.+)", r"backbone.0.body.\1"),
    (r"model\.input_projection\.(.+)", r"input_proj.\1"),
    (r"model\.query_position_embeddings\.weight", "query_embed.weight"),
    (r"model\.decoder\.layernorm\.(.+)", r"transformer.decoder.norm.\1"),
    (r"class_labels_classifier\.(.+)", r"class_embed.\1"),
    (r"bbox_predictor\.(.+)", r"bbox_embed.\1"),
    (_DETR_LAYER + r"\.self_attn\.o_proj\.(.+)", r"transformer.\1.layers.\2.self_attn.out_proj.\3"),
    (_DETR_LAYER + r"\.encoder_attn\.o_proj\.(.+)", r"transformer.\1.layers.\2.multihead_attn.out_proj.\3"),
    (_DETR_LAYER + r"\.mlp\.fc([12])\.(.+)", r"transformer.\1.layers.\2.linear\3.\4"),
    (_DETR_LAYER + r"\.self_attn_layer_norm\.(.+)", r"transformer.\1.layers.\2.norm1.\3"),
    (_DETR_LAYER + r"\.encoder_attn_layer_norm\.(.+)", r"transformer.\1.layers.\2.norm2.\3"),
    (r"model\.encoder\.layers\.(\d+)\.final_layer_norm\.(.+)", r"transformer.encoder.layers.\1.norm2.\2"),
    (r"model\.decoder\.layers\.(\d+)\.final_layer_norm\.(.+)", r"transformer.decoder.layers.\1.norm3.\2"),
]
# q/k/v projections, fused back into nn.MultiheadAttention's in_proj_{weight,bias} (rows q, k, v)
_DETR_QKV = re.compile(_DETR_LAYER + r"\.(self_attn|encoder_attn)\.([qkv])_proj\.(weight|bias)")


def detr_hf_to_official(hf_state_dict: dict) -> dict:
    """``DetrForObjectDetection.state_dict()`` -> a facebookresearch/detr ``ckpt["model"]``."""
    out, fused = {}, {}
    for key, t in hf_state_dict.items():
        m = _DETR_QKV.fullmatch(key)
        if m:
            part, attn = m[1], "self_attn" if m[3] == "self_attn" else "multihead_attn"
            fused.setdefault(f"transformer.{part}.layers.{m[2]}.{attn}.in_proj_{m[5]}", {})[m[4]] = t
            continue
        for pattern, template in _DETR_RENAMES:
            r = re.fullmatch(pattern, key)
            if r:
                out[r.expand(template)] = t
                break
        else:
            raise KeyError(f"no official DETR name for HF key {key}")
    for key, qkv in fused.items():
        out[key] = torch.cat([qkv["q"], qkv["k"], qkv["v"]])
    return out
