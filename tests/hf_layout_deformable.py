"""HF transformers' DeformableDetrForObjectDetection state dict -> the official
fundamentalvision/Deformable-DETR layout (test helper).

The inverse of HF's ``convert_deformable_detr_to_pytorch.py`` renaming, plus the renames
transformers 5.x applies on load (``conversion_mapping.py``, "deformable_detr"; 4.x names in
brackets). HF 5.23 -> official:

- ``model.backbone.model.*`` [``model.backbone.conv_encoder.model.*``] -> ``backbone.0.body.*``
- ``model.input_proj.*`` -> ``input_proj.*``; ``model.query_position_embeddings`` -> ``query_embed``
- ``model.{level_embed, reference_points, enc_output(_norm), pos_trans(_norm)}`` -> ``transformer.*``
- encoder layers: ``self_attn_layer_norm`` -> ``norm1``, ``final_layer_norm`` -> ``norm2``,
  ``mlp.fc1/fc2`` [``fc1/fc2``] -> ``linear1/linear2``
- decoder layers: ``self_attn.{q,k,v}_proj`` -> ``self_attn.in_proj_{weight,bias}`` (stacked),
  ``self_attn.o_proj`` [``out_proj``] -> ``self_attn.out_proj``, ``self_attn_layer_norm`` -> ``norm2``,
  ``encoder_attn`` -> ``cross_attn``, ``encoder_attn_layer_norm`` -> ``norm1``,
  ``final_layer_norm`` -> ``norm3``, ``mlp.fc1/fc2`` -> ``linear1/linear2``
- ``model.decoder.{class,bbox}_embed.*`` -> ``transformer.decoder.{class,bbox}_embed.*``
- ``class_embed.*``, ``bbox_embed.*``: unchanged
"""
from __future__ import annotations

import re

import torch
from torch import Tensor

_TRANSFORMER_TOP = ("level_embed", "reference_points", "enc_output", "enc_output_norm", "pos_trans",
                    "pos_trans_norm")
_ENCODER = {"self_attn_layer_norm": "norm1", "final_layer_norm": "norm2", "mlp.fc1": "linear1",
            "mlp.fc2": "linear2"}
_DECODER = {"self_attn.o_proj": "self_attn.out_proj", "self_attn_layer_norm": "norm2",
            "encoder_attn_layer_norm": "norm1", "encoder_attn": "cross_attn", "final_layer_norm": "norm3",
            "mlp.fc1": "linear1", "mlp.fc2": "linear2"}


def _layer_key(prefix: str, rest: str, table: dict[str, str]) -> str:
    for hf, official in table.items():
        if rest.startswith(hf + "."):
            return f"{prefix}{official}{rest[len(hf):]}"
    if rest.startswith(("self_attn.", "cross_attn.")):
        return prefix + rest
    raise KeyError(f"no official name for {prefix}{rest}")


def _rename(key: str) -> str:
    if key.startswith(("class_embed.", "bbox_embed.")):
        return key
    if not key.startswith("model."):
        raise KeyError(f"no official name for {key}")
    key = key[len("model."):]
    if key.startswith("backbone.model."):
        return "backbone.0.body." + key[len("backbone.model."):]
    if key.startswith("input_proj."):
        return key
    if key == "query_position_embeddings.weight":
        return "query_embed.weight"
    if key.split(".")[0] in _TRANSFORMER_TOP:
        return "transformer." + key
    m = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)", key)
    if m:
        return _layer_key(f"transformer.encoder.layers.{m.group(1)}.", m.group(2), _ENCODER)
    m = re.fullmatch(r"decoder\.layers\.(\d+)\.(.+)", key)
    if m:
        return _layer_key(f"transformer.decoder.layers.{m.group(1)}.", m.group(2), _DECODER)
    if key.startswith(("decoder.class_embed.", "decoder.bbox_embed.")):
        return "transformer." + key
    raise KeyError(f"no official name for model.{key}")


def deformable_hf_to_official(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """HF state dict -> official state dict (``ckpt["model"]``); unknown keys raise KeyError."""
    out: dict[str, Tensor] = {}
    qkv: dict[str, dict[str, Tensor]] = {}
    for key, t in state_dict.items():
        m = re.fullmatch(r"model\.decoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", key)
        if m:
            qkv.setdefault(f"transformer.decoder.layers.{m.group(1)}.self_attn.in_proj_{m.group(3)}", {})[
                m.group(2)] = t
            continue
        out[_rename(key)] = t
    for key, parts in qkv.items():
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]], 0)
    return out
