"""Which tables the active profile builds, which rows each shows, and exactly which metrics
files and figures each one reads and writes.

One plan serves both sides: the stage table gives every table its own stage whose inputs are
the files listed here (so ``snakemake reports/tables/act_main.md`` runs only what that table
needs), and the renderer reads the same rows. No torch or matplotlib import: Snakemake parses
this module.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..config import expand_experiments
from ..utils.records import history_path, provenance_path
from .paper import load_paper_tables

METRICS = "reports/metrics"


@dataclass
class TablePlan:
    tid: str
    spec: dict
    source: str  # eval (experiments' metrics), flops (flops.json) or speed (speed.json)
    rows: list[str]  # row keys shown: the paper's rows (of this profile), then extra experiments
    run: list[str] = field(default_factory=list)  # the shown rows this profile computes
    inputs: list[str] = field(default_factory=list)  # metrics files (paths from the repo root)
    figures: list[str] = field(default_factory=list)  # figure file names under reports/figures
    families: dict[str, str] = field(default_factory=dict)  # row -> seed-spread family
    curves: list[str] = field(default_factory=list)  # experiments whose training curves it draws
    swaps: list[str] = field(default_factory=list)  # ACT swaps of its prototypes-per-layer figure

    @property
    def paper_key(self) -> str:
        """The paper YAML's stem (act, sparse_detr, ...): the per-paper target's name."""
        return self.spec["source"].removesuffix(".yaml")


def active_experiments(params) -> tuple[dict, set[str]]:
    """The active profile's experiments (name -> (source, mapping)) and the names that exist
    only in other profiles (e.g. released COCO checkpoints in a SynthCOCO run)."""
    everywhere = expand_experiments(params.experiments, "params.yaml")
    active = {n: (src, e) for n, (src, e) in everywhere.items()
              if not e.get("profiles") or params.profile in e["profiles"]}
    return active, set(everywhere) - set(active)


def _files(name: str, exp: dict) -> list[str]:
    stages = exp.get("stages", ["train", "eval"])
    return [f"{METRICS}/{name}/{s}.json" for s in ("train", "eval") if s in stages]


def _swaps(experiments: dict) -> list[str]:
    """ACT's drop-in swaps: eval-only experiments with ACT kernels (one line each in the
    prototypes-per-layer figure)."""
    return sorted(n for n, (_, e) in experiments.items() if "train" not in e.get("stages", ["train"])
                  and e.get("overrides", {}).get("model", {}).get("encoder_attention") == "act")


def plan_tables(params, specs: dict | None = None) -> dict[str, TablePlan]:
    """tid -> plan, for every table an experiment, the FLOPs or the speed section names."""
    specs = load_paper_tables() if specs is None else specs
    experiments, other = active_experiments(params)
    wanted: list[str] = [e["table"] for _, e in experiments.values()]
    if params.flops.models:
        wanted.append(params.flops.table)
        wanted += [tid for tid, s in specs.items()  # other papers' paper-scale FLOPs tables
                   if s.get("kind") == "flops" and any(k in params.flops.models for k in s["rows"])]
    if params.speed is not None:
        wanted.append(params.speed.table)
    family_runs = {fam: runs for fam, runs in params.seed_spread.items()}
    swaps = _swaps(experiments)
    plans: dict[str, TablePlan] = {}
    for tid in dict.fromkeys(wanted):
        if tid not in specs:
            raise ValueError(f"params.yaml: experiments/flops/speed name table '{tid}', which has no paper data "
                             f"(known: {', '.join(sorted(specs))})")
        spec = specs[tid]
        paper_rows = spec["rows"]
        shown = [k for k, r in paper_rows.items() if k not in other
                 and (not r.get("profiles") or params.profile in r["profiles"])]
        if spec.get("kind") == "flops":
            plans[tid] = TablePlan(tid, spec, "flops", shown, [k for k in shown if k in params.flops.models],
                                   [f"{METRICS}/flops.json"])
            continue
        if params.speed is not None and tid == params.speed.table:
            plans[tid] = TablePlan(tid, spec, "speed", shown, list(shown), [f"{METRICS}/speed.json"])
            continue
        seeded = {n for r in paper_rows.values() for n in r.get("seeds", [])}
        run = [k for k in shown
               if k in experiments or (paper_rows[k].get("seeds") and all(n in experiments for n in paper_rows[k]["seeds"]))]
        extra = [n for n, (_, e) in experiments.items() if e["table"] == tid and n not in paper_rows
                 and n not in seeded]
        plan = TablePlan(tid, spec, "eval", shown + extra, run + extra)
        runs = [n for k in plan.run for n in (paper_rows.get(k, {}).get("seeds") or [k])]
        for k in plan.run:
            first = (paper_rows.get(k, {}).get("seeds") or [k])[0]
            fam = experiments.get(k, (None, {}))[1].get("family") or experiments.get(first, (None, {}))[1].get("family")
            if fam:
                plan.families[k] = fam
        # the seed spreads of the rows' families: every repeated run of each is read
        for fam in dict.fromkeys(plan.families.values()):
            runs += [r for r in family_runs.get(fam, []) if r in experiments]
        for n in dict.fromkeys(runs):
            plan.inputs += _files(n, experiments[n][1])
        if spec.get("figure"):
            plan.figures.append(spec["figure"]["file"])
        plan.curves = [n for n, (_, e) in experiments.items()
                       if e["table"] == tid and "train" in e.get("stages", ["train"])]
        plan.figures += [f"{n}_training.png" for n in plan.curves]
        if swaps and experiments[swaps[0]][1]["table"] == tid:
            plan.swaps = swaps
            plan.figures.append("prototypes_per_layer.png")
            plan.inputs += [f for n in swaps for f in _files(n, experiments[n][1]) if f not in plan.inputs]
        # an experiment's training curve lives with its own table, read from its train.json
        for n, (_, e) in experiments.items():
            if e["table"] == tid:
                plan.inputs += [f for f in _files(n, e) if f not in plan.inputs]
        plan.inputs += [str(history_path(f"{METRICS}/{n}/train.json")) for n in plan.curves]
        plans[tid] = plan
    for plan in plans.values():  # each metrics file's provenance sidecar is read beside it
        plan.inputs += [str(provenance_path(f)) for f in plan.inputs if f.endswith(".json")
                        and not f.endswith(("_history.json", ".provenance.json"))]
    return dict(sorted(plans.items()))


def paper_targets(plans: dict[str, TablePlan]) -> dict[str, list[str]]:
    """paper key (act, sparse_detr, ...) -> its tables' ids, in table order."""
    out: dict[str, list[str]] = {}
    for tid, plan in plans.items():
        out.setdefault(plan.paper_key, []).append(tid)
    return out
