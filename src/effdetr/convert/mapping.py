"""Strict renaming of a foreign state dict onto a model's own.

A conversion is a list of rules, applied in order to every source key that no earlier rule
took: a rule is a regular expression over the source key and a function that returns
``{target_key: tensor}`` for a match (a rename, a split of a fused tensor, a copy into
several targets). Source keys may only be dropped through ``drop`` patterns, each with its
documented reason. After mapping, every target tensor must be produced exactly once and
with the model's shape; anything else is one error naming each offending key and the file.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

from torch import Tensor

Producer = Callable[[re.Match, Tensor], dict[str, Tensor]]


class ConversionError(ValueError):
    """A checkpoint that does not map onto the model; the message lists every problem."""


def rename(template: str) -> Producer:
    """``template`` with ``\\1``-style groups of the match -> one target key."""
    return lambda m, t: {m.expand(template): t}


def split_rows(*templates: str) -> Producer:
    """A fused tensor (e.g. ``in_proj_weight`` [3C, C]) split into equal row blocks."""
    def produce(m: re.Match, t: Tensor) -> dict[str, Tensor]:
        if t.shape[0] % len(templates):
            return {m.expand(templates[0]): t}  # shape check below reports it
        return {m.expand(k): part for k, part in zip(templates, t.chunk(len(templates), 0))}
    return produce


@dataclass
class StrictMapping:
    rules: list[tuple[str, Producer]]
    drop: dict[str, str] = field(default_factory=dict)  # pattern -> why it may be dropped

    def apply(self, source: dict[str, Tensor], target_shapes: dict[str, tuple], file: str) -> dict[str, Tensor]:
        """Map ``source`` onto the target keys/shapes; raise ConversionError listing every
        unmapped, dropped-without-reason, duplicated, missing or mis-shaped key."""
        compiled = [(re.compile(p), f) for p, f in self.rules]
        drops = [re.compile(p) for p in self.drop]
        out: dict[str, Tensor] = {}
        origin: dict[str, str] = {}
        problems: list[str] = []
        for key, tensor in source.items():
            if any(d.fullmatch(key) for d in drops):
                continue
            for pattern, produce in compiled:
                m = pattern.fullmatch(key)
                if m:
                    for tkey, t in produce(m, tensor).items():
                        if tkey in out:
                            problems.append(f"{key}: maps to {tkey}, already produced by {origin[tkey]}")
                        out[tkey], origin[tkey] = t, key
                    break
            else:
                problems.append(f"{key}: unexpected tensor (no rule maps it)")
        for tkey, t in out.items():
            if tkey not in target_shapes:
                problems.append(f"{origin[tkey]}: maps to {tkey}, which the model does not have")
            elif tuple(t.shape) != tuple(target_shapes[tkey]):
                problems.append(f"{origin[tkey]}: shape {tuple(t.shape)} but the model's {tkey} is "
                                f"{tuple(target_shapes[tkey])}")
        for tkey in target_shapes:
            if tkey not in out:
                problems.append(f"{tkey}: missing (no tensor of the checkpoint maps to it)")
        if problems:
            shown = "\n  ".join(problems[:40])
            more = f"\n  ... and {len(problems) - 40} more" if len(problems) > 40 else ""
            raise ConversionError(f"{file}: {len(problems)} tensors do not fit the model:\n  {shown}{more}")
        return out


def check_training_args(ckpt: dict, expected: dict, file) -> None:
    """The official ``main.py`` saves its ``args`` in each checkpoint: settings the tensors
    cannot reveal (dilation, box refinement, rho, ...) must match the model being loaded.
    Only the settings the file records are compared."""
    args = ckpt.get("args")
    if args is None:
        return
    have = args if isinstance(args, dict) else vars(args)
    bad = [f"args.{k} = {have[k]!r} but the model has {v!r}" for k, v in expected.items()
           if k in have and have[k] != v]
    if bad:
        raise ConversionError(f"{file}: trained with other settings than the experiment's model: {'; '.join(bad)}")
