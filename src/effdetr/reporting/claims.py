"""Judge a paper's claims on reproduced numbers (never on the paper's own).

A table row in ``reporting/paper/*.yaml`` lists its claims; each applies to one metric
(or to all, without ``metric``):

- ``reference``: the row other rows are compared with.
- ``{rel_tol: t}``: reproduced within +-t (relative) of the paper's number (paper-scale
  FLOPs, where the numbers themselves must agree).
- ``{abs_tol: t}``: reproduced within +-t of the paper's number (a released checkpoint
  converted to effdetr: +-0.2 AP, as detrex and HF transformers accept for conversions).
- ``{max_drop: x, vs: row}``: reproduced[vs] - reproduced[row] <= x.
- ``{higher: row}`` / ``{lower: row}``: reproduced[row] above / below reproduced[that row].
- ``{max_ratio: r, vs: row}``: reproduced[row] / reproduced[vs] <= r (a cost cut "of the
  paper's order", e.g. GFLOPs -38 % -> r = 0.62).
- ``{equal: row}``: the same value (e.g. a distilled student's FLOPs and its baseline's).
- ``{beyond_spread: row}``: above that row by more than the two rows' seed standard
  deviations added (``<metric>_sd``, rows averaged over seeds).

``spread``: the measured seed spread of the row's model family on this metric (max - min
over the family's repeated runs; see tables.seed_spreads). A relation between two rows
(higher, lower, max_drop) whose deciding difference is within it reads "inconclusive":
training noise alone moves a row that much.

A claim is a mapping with exactly one of the kinds above (plus ``metric`` and, for
``max_drop`` / ``max_ratio``, ``vs``); anything else is an error, never a silent "—". A
tolerance claim (``rel_tol`` / ``abs_tol``) naming a metric needs the row's paper number for
it (a nonzero one for ``rel_tol``); without ``metric`` it applies to each metric the row has
a paper number for. The paper YAMLs are checked against this when loaded
(``reporting.paper.check_paper_doc``).
"""
from __future__ import annotations

import math


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _num(x: float, sign: bool = False) -> str:
    """Two decimals for AP-sized numbers, three significant digits for tiny ones (GFLOPs)."""
    if x != 0 and abs(x) < 0.1:
        return f"{x:+.3g}" if sign else f"{x:.3g}"
    return f"{x:+.2f}" if sign else f"{x:.2f}"


TOLERANCES = ("rel_tol", "abs_tol")  # against the paper's own number
RELATIONS = ("max_drop", "max_ratio", "higher", "lower", "equal", "beyond_spread")  # between reproduced rows
KINDS = TOLERANCES + RELATIONS
NEEDS_VS = ("max_drop", "max_ratio")  # the other relations name their row as the kind's value


def row_claims(spec_row: dict) -> list:
    if "claims" in spec_row:
        return list(spec_row["claims"])
    return [spec_row["claim"]] if "claim" in spec_row else []


def claim_keys(spec_row: dict) -> list[str]:
    """Key path of each claim of a row (``claims[0]``, ... or ``claim``), for error messages."""
    if "claims" in spec_row:
        return [f"claims[{i}]" for i in range(len(spec_row["claims"]))]
    return ["claim"] if "claim" in spec_row else []


def claim_problem(claim) -> tuple[str, str] | None:
    """What is wrong with a claim's shape, as (sub-key, message): the sub-key is ``.<key>`` for
    an unknown key, ``""`` for the claim as a whole. None for ``"reference"`` or a mapping with
    exactly one kind and no unknown key. The paper-YAML schema and :func:`judge` both read it."""
    if claim == "reference":
        return None
    if not isinstance(claim, dict):
        return "", f"claim {claim!r} is neither 'reference' nor a mapping with one of: {', '.join(KINDS)}"
    unknown = sorted(map(str, set(claim) - set(KINDS) - {"metric", "vs"}))
    if unknown:
        return (f".{unknown[0]}", f"claim {claim!r}: unknown key {unknown[0]!r}; a claim has exactly one of: "
                                  f"{', '.join(KINDS)}, plus `metric` and, for max_drop / max_ratio, `vs`")
    kinds = [k for k in KINDS if k in claim]
    if len(kinds) != 1:
        what = "no claim kind" if not kinds else f"several kinds ({', '.join(kinds)})"
        return "", f"claim {claim!r}: {what}; a claim has exactly one of: {', '.join(KINDS)}"
    return None


def claim_kind(claim, where: str) -> str:
    """``"reference"`` or the one kind of a claim mapping; ValueError naming ``where`` otherwise."""
    problem = claim_problem(claim)
    if problem is not None:
        raise ValueError(f"{where}: {problem[1]}")
    return "reference" if claim == "reference" else next(k for k in KINDS if k in claim)


def _within(verdict: str, margin: float, spread: float | None) -> str:
    """Turn a yes/no verdict into "inconclusive" when its margin is inside the seed spread."""
    if spread is None or abs(margin) > spread:
        return verdict
    return f"inconclusive: {verdict.split(' ', 1)[1][1:-1]}, within the seed spread {_num(spread)}"


def judge(spec_row: dict, metric: str, paper, reproduced: dict[str, dict], row_key: str,
          spread: float | None = None, where: str | None = None) -> str:
    """The verdict cell of (row, metric); ``where`` (the paper YAML file and row) names a
    malformed claim in the ValueError it raises."""
    where = where or f"paper table row '{row_key}'"
    verdicts = []
    mine = reproduced.get(row_key, {}).get(metric)
    for claim, key in zip(row_claims(spec_row), claim_keys(spec_row)):
        kind = claim_kind(claim, f"{where}.{key}")
        if kind == "reference":
            return "reference row"
        if claim.get("metric", metric) != metric:
            continue
        if kind in TOLERANCES and (_missing(paper) or (kind == "rel_tol" and paper == 0)):
            if "metric" in claim:
                raise ValueError(f"{where}.{key}: claim {claim!r} compares with the paper's {metric}, but the "
                                 f"row has {'a zero' if paper == 0 else 'no'} paper number for it")
            continue  # a claim on every metric: judged where the row has a paper number
        if kind in NEEDS_VS and "vs" not in claim:
            raise ValueError(f"{where}.{key}: claim {claim!r}: {kind} needs `vs` (the row it compares with)")
        if _missing(mine):
            return "not run"
        if kind == "rel_tol":
            rel = (mine - paper) / paper
            ok = abs(rel) <= claim["rel_tol"]
            verdicts.append(f"{'yes' if ok else 'no'} ({rel:+.1%}, tolerance ±{claim['rel_tol']:.0%})")
            continue
        if kind == "abs_tol":
            diff = mine - paper
            verdicts.append(f"{'yes' if abs(diff) <= claim['abs_tol'] else 'no'} ({_num(diff, True)} vs the "
                            f"paper, tolerance ±{claim['abs_tol']})")
            continue
        other_key = claim["vs"] if kind in NEEDS_VS else claim[kind]
        other = reproduced.get(other_key, {}).get(metric)
        if _missing(other):
            verdicts.append(f"not run ({other_key})")
        elif kind == "max_drop":
            drop = other - mine
            verdicts.append(_within(f"{'yes' if drop <= claim['max_drop'] else 'no'} "
                                    f"(drop {_num(drop)} vs {other_key}, allowed {claim['max_drop']})",
                                    drop - claim["max_drop"], spread))
        elif kind == "max_ratio":
            ratio = mine / other if other else float("inf")
            verdicts.append(f"{'yes' if ratio <= claim['max_ratio'] else 'no'} "
                            f"({ratio - 1:+.1%} vs {other_key}, needed <= {claim['max_ratio'] - 1:+.0%})")
        elif kind == "higher":
            verdicts.append(_within(f"{'yes' if mine > other else 'no'} ({_num(mine - other, True)} vs {other_key})",
                                    mine - other, spread))
        elif kind == "lower":
            verdicts.append(_within(f"{'yes' if mine < other else 'no'} ({_num(mine - other, True)} vs {other_key})",
                                    mine - other, spread))
        elif kind == "equal":
            same = abs(mine - other) <= 1e-9 * max(abs(mine), abs(other), 1.0)
            verdicts.append(f"{'yes' if same else 'no'} ({_num(mine - other, True)} vs {other_key})")
        else:
            sd = (reproduced[row_key].get(f"{metric}_sd", 0.0) + reproduced[other_key].get(f"{metric}_sd", 0.0))
            verdicts.append(f"{'yes' if mine - other > sd else 'no'} ({_num(mine - other, True)} vs "
                            f"{other_key}, seed spread {_num(sd)})")
    return "; ".join(verdicts) if verdicts else "—"
