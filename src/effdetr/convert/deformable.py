"""Official Deformable DETR / Sparse DETR checkpoints -> effdetr's DeformableDETR.

Source layout (fundamentalvision/Deformable-DETR ``models/deformable_detr.py`` and
``deformable_transformer.py``; kakaobrain/sparse-detr adds to it):

- ``backbone.0.body.*``: torchvision ResNet trunk with FrozenBN (-> ``backbone.body.*``);
- ``input_proj.{i}.{0 conv, 1 GroupNorm}``, ``transformer.level_embed``;
- encoder layers: ``self_attn`` (MSDA), ``linear1/linear2`` (-> ``ffn.lin1/lin2``), ``norm1/norm2``;
- decoder layers: ``cross_attn`` (MSDA), ``self_attn`` (``nn.MultiheadAttention``: the fused
  ``in_proj_*`` splits into ``q/k/v_proj``), ``norm1`` after cross-attention, ``norm2`` after
  self-attention, ``norm3`` after the FFN -- effdetr's layer uses the same order;
- one-stage: ``query_embed [Q, 2C]``, ``transformer.reference_points`` (-> ``reference``);
- two-stage: ``transformer.enc_output(_norm)``, ``transformer.pos_trans(_norm)`` and the proposal
  head at ``class_embed/bbox_embed`` index ``dec_layers``;
- ``class_embed.N`` / ``bbox_embed.N``: unshared clones (box refinement, or Sparse DETR with its
  encoder aux loss), else one module repeated -- the file then holds N equal copies, which must
  be equal to load onto effdetr's shared head;
- Sparse DETR: ``transformer.enc_mask_predictor.*`` (-> ``scorer.*``, same inner names) and the
  encoder aux heads at ``class_embed/bbox_embed`` indices after the decoder's (and the proposal
  head) (-> ``enc_aux_class/enc_aux_box``).

Dropped keys, each because it holds nothing of its own:

- ``transformer.decoder.{class,bbox}_embed.*``: the decoder's handle on the detector's heads
  (refinement, two-stage proposal head); the same modules as ``{class,bbox}_embed.*``;
- ``transformer.encoder.{class,bbox}_embed.*``: Sparse DETR's encoder handle on its aux heads,
  the last ``enc_layers - 1`` of ``{class,bbox}_embed``;
- ``*.num_batches_tracked`` in the trunk: a BatchNorm step counter that frozen BN never reads.

The copies are checked equal to what they duplicate before anything is mapped.
"""
from __future__ import annotations

import re

import torch
from torch import Tensor, nn

from .mapping import ConversionError, StrictMapping, check_training_args, rename, split_rows

_DROP = {  # pattern -> why it may be dropped (the copies are checked equal first)
    r"transformer\.decoder\.(class_embed|bbox_embed)\..+": "the decoder's handle on {class,bbox}_embed",
    r"transformer\.encoder\.(class_embed|bbox_embed)\..+": "Sparse DETR's encoder handle on its aux heads",
    r"backbone\.0\.body\..+\.num_batches_tracked": "BatchNorm step counter; frozen BN has none",
}


def _head(kind: str, num_main: int):
    """``{kind}.N.*``: the decoder's heads (+ the proposal head) keep their index; Sparse
    DETR's encoder aux heads after them become ``enc_aux_{class,box}.(N - num_main)``."""
    aux = {"class_embed": "enc_aux_class", "bbox_embed": "enc_aux_box"}[kind]

    def produce(m: re.Match, t: Tensor) -> dict[str, Tensor]:
        i = int(m.group(1))
        return {f"{kind}.{i}.{m.group(2)}" if i < num_main else f"{aux}.{i - num_main}.{m.group(2)}": t}
    return produce


def _mapping(num_main: int) -> StrictMapping:
    enc, dec = r"transformer\.encoder\.layers\.(\d+)\.", r"transformer\.decoder\.layers\.(\d+)\."
    rules = [
        (r"backbone\.0\.body\.(.+)", rename(r"backbone.body.\1")),
        (r"input_proj\.(\d+)\.([01])\.(weight|bias)", rename(r"input_proj.\1.\2.\3")),
        (r"transformer\.level_embed", rename("level_embed")),
        (enc + r"self_attn\.(.+)", rename(r"encoder.layers.\1.self_attn.\2")),
        (enc + r"linear([12])\.(.+)", rename(r"encoder.layers.\1.ffn.lin\2.\3")),
        (enc + r"norm([12])\.(.+)", rename(r"encoder.layers.\1.norm\2.\3")),
        (dec + r"cross_attn\.(.+)", rename(r"decoder.layers.\1.cross_attn.\2")),
        (dec + r"self_attn\.in_proj_(weight|bias)",
         split_rows(*(rf"decoder.layers.\1.self_attn.{p}_proj.\2" for p in "qkv"))),
        (dec + r"self_attn\.out_proj\.(.+)", rename(r"decoder.layers.\1.self_attn.out_proj.\2")),
        (dec + r"linear([12])\.(.+)", rename(r"decoder.layers.\1.ffn.lin\2.\3")),
        (dec + r"norm([123])\.(.+)", rename(r"decoder.layers.\1.norm\2.\3")),
        (r"query_embed\.weight", rename("query_embed.weight")),
        (r"transformer\.reference_points\.(.+)", rename(r"reference.\1")),
        (r"transformer\.(enc_output|enc_output_norm|pos_trans|pos_trans_norm)\.(.+)", rename(r"\1.\2")),
        (r"transformer\.enc_mask_predictor\.(.+)", rename(r"scorer.\1")),
        (r"class_embed\.(\d+)\.(.+)", _head("class_embed", num_main)),
        (r"bbox_embed\.(\d+)\.(.+)", _head("bbox_embed", num_main)),
    ]
    return StrictMapping(rules, dict(_DROP))


def deformable_mapping(model_cfg) -> StrictMapping:
    """The renaming for an effdetr ``ModelConfig`` (arch "deformable")."""
    return _mapping(model_cfg.dec_layers + (1 if model_cfg.deformable.two_stage else 0))


def _alias_target(key: str, num_main: int) -> str | None:
    """The key an alias duplicates (None if ``key`` is not an alias)."""
    m = re.fullmatch(r"transformer\.decoder\.((?:class|bbox)_embed\..+)", key)
    if m:
        return m.group(1)
    m = re.fullmatch(r"transformer\.encoder\.((?:class|bbox)_embed)\.(\d+)\.(.+)", key)
    if m:
        return f"{m.group(1)}.{num_main + int(m.group(2))}.{m.group(3)}"
    return None


def _copy_problems(source: dict[str, Tensor], model: nn.Module, num_main: int) -> list[str]:
    """Every alias must equal what it duplicates; heads that effdetr shares must be equal
    copies in the file."""
    problems = []
    for key, t in source.items():
        target = _alias_target(key, num_main)
        if target is None:
            continue
        if target not in source:
            problems.append(f"{key}: duplicates {target}, which the file lacks")
        elif source[target].shape != t.shape or not torch.equal(source[target], t):
            problems.append(f"{key}: differs from {target}, the head it should be the same module as")
    for kind in ("class_embed", "bbox_embed"):
        heads = getattr(model, kind)
        if len(heads) < 2 or heads[0] is not heads[1]:
            continue  # unshared heads: nothing to check
        for key, t in source.items():
            m = re.fullmatch(rf"{kind}\.(\d+)\.(.+)", key)
            if m and 0 < int(m.group(1)) < num_main:
                first = f"{kind}.0.{m.group(2)}"
                if first in source and (source[first].shape != t.shape or not torch.equal(source[first], t)):
                    problems.append(f"{key}: differs from {first}, but the model shares one {kind} across layers "
                                    "(box_refine off): the file was trained with other options")
    return problems


def expected_args(cfg, fmt: str) -> dict:
    """The official ``main.py`` flags an effdetr ModelConfig corresponds to."""
    d, sp = cfg.deformable, cfg.sparse
    out = {"dilation": cfg.backbone.dilation, "num_feature_levels": d.num_levels, "nheads": cfg.nheads,
           "enc_n_points": d.num_points, "dec_n_points": d.num_points, "enc_layers": cfg.enc_layers,
           "dec_layers": cfg.dec_layers, "num_queries": cfg.num_queries, "with_box_refine": d.box_refine,
           "two_stage": d.two_stage}
    if fmt == "sparse_detr":
        eff = d.two_stage and d.two_stage_variant == "sparse_detr"
        out.update(rho=sp.rho or 0.0, eff_query_init=eff, eff_specific_head=eff,
                   use_enc_aux_loss=bool(sp.rho is not None and sp.enc_aux_loss))
    return out


def _alias_problems(source: dict[str, Tensor], model: nn.Module, fmt: str) -> list[str]:
    """The decoder's handles on the heads exist exactly when the official model refines boxes
    (``transformer.decoder.bbox_embed``; Sparse DETR's fork: when two-stage) and is two-stage
    (``transformer.decoder.class_embed``): the shared head copies alone cannot tell a plain
    model from a refining one."""
    has = {kind: any(k.startswith(f"transformer.decoder.{kind}.") for k in source) for kind in ("class_embed",
                                                                                                   "bbox_embed")}
    want = {"class_embed": model.two_stage,
            "bbox_embed": model.two_stage if fmt == "sparse_detr" else model.refine}
    return [f"transformer.decoder.{kind}.*: {'present' if has[kind] else 'absent'} in the file, so the official "
            f"model {'did' if has[kind] else 'did not'} {'refine boxes' if kind == 'bbox_embed' else 'run two-stage'}"
            f"; the experiment's model {'does' if want[kind] else 'does not'} (model.deformable)"
            for kind in has if has[kind] != want[kind]]


def convert_deformable(state_dict: dict, model: nn.Module, file: str, fmt: str = "deformable_detr",
                       model_cfg=None) -> dict[str, Tensor]:
    """An official checkpoint (``ckpt`` with ``ckpt["model"]``, or the bare state dict) ->
    effdetr state dict for ``model`` (a DeformableDETR); ConversionError names every tensor
    that does not fit. ``fmt``: the repository's layout (deformable_detr or sparse_detr);
    with ``model_cfg`` the file's training args are checked against it too."""
    source = state_dict["model"] if isinstance(state_dict.get("model"), dict) else state_dict
    if model_cfg is not None:
        check_training_args(state_dict, expected_args(model_cfg, fmt), file)
    num_main = model.dec_layers + (1 if model.two_stage else 0)
    problems = _alias_problems(source, model, fmt) + _copy_problems(source, model, num_main)
    if problems:
        raise ConversionError(f"{file}: {len(problems)} tensors are inconsistent copies:\n  " + "\n  ".join(problems))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return _mapping(num_main).apply(source, shapes, file)
