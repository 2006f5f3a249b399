"""The stage table as Snakemake rules: one rule per kind of stage (data, pretrain, train,
eval, import, flops, speed, table, report), the experiment or the table id as its wildcard.

So ``snakemake --rulegraph`` draws a handful of nodes and a user reads ``rule train`` with
``wildcards: experiment=sparse_detr_rho0p1``, as in any Snakemake workflow. Every value a
rule needs (inputs, command, params JSON, threads, resources) is still the stage's own, looked
up from its wildcard: the stage table stays the single description of the DAG, which
``dvc.yaml`` is generated from too. No torch import here: Snakemake parses this module.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from .stages import Stage, expand_deps

WILDCARD = {"train": "experiment", "eval": "experiment", "import": "experiment", "table": "table"}


def _pattern(path: str, key: str, wildcard: str) -> str:
    """``path`` with the stage's key (as a whole path part or file stem) as ``{wildcard}``."""
    parts = path.split("/")
    for i, part in enumerate(parts):
        stem, dot, ext = part.partition(".")
        if stem == key:
            parts[i] = f"{{{wildcard}}}{dot}{ext}"
    return "/".join(parts)


@dataclass
class RuleKind:
    name: str
    wildcard: str | None
    stages: dict[str, Stage] = field(default_factory=dict)  # wildcard value ("" alone) -> stage
    outs: list[str] = field(default_factory=list)
    out_dirs: list[str] = field(default_factory=list)
    metrics: list[str] = field(default_factory=list)
    plots: list[str] = field(default_factory=list)

    def stage(self, wildcards) -> Stage:
        return self.stages[wildcards[self.wildcard]] if self.wildcard else self.stages[""]

    def _file(self, folder: str, ext: str) -> str:
        return f"{folder}/{self.name}_{{{self.wildcard}}}.{ext}" if self.wildcard else f"{folder}/{self.name}.{ext}"

    @property
    def log(self) -> str:
        return self._file("logs", "log")

    @property
    def benchmark(self) -> str:
        """Snakemake's per-job record: wall time, max RSS, CPU time (summarised in reports/)."""
        return self._file("logs/benchmarks", "tsv")

    @property
    def constraints(self) -> dict[str, str]:
        """The wildcard matches exactly this kind's stages (train and import both write
        ``data/checkpoints/{experiment}.pt``, for different experiments)."""
        if not self.wildcard:
            return {}
        return {self.wildcard: "|".join(re.escape(k) for k in sorted(self.stages, key=len, reverse=True))}

    def report_items(self) -> dict[str, dict]:
        """Outputs shown by ``snakemake --report report.html``: each paper table (its CSV, which
        the report renders as a table) and its figures, by table."""
        if self.name != "table":
            return {}
        return {"reports/tables/{table}.csv": {"category": "Tables", "subcategory": "{table}",
                                               "caption": "../report/table.rst"},
                "reports/figures/{table}": {"category": "Figures", "subcategory": "{table}",
                                            "patterns": ["{name}.png"], "caption": "../report/figure.rst"}}

    # callables of the job's wildcards, as Snakemake takes them
    def inputs(self, wildcards) -> list[str]:
        return expand_deps(self.stage(wildcards).deps)

    def command(self, wildcards) -> str:
        return self.stage(wildcards).shell

    def params_json(self, raw: dict):
        return lambda wildcards: self.stage(wildcards).params_json(raw)

    def threads(self, cores: int | None):
        return lambda wildcards: self.stage(wildcards).rule_threads(cores)

    def priority(self, wildcards) -> int:
        return self.stage(wildcards).priority

    def resource(self, key: str):
        return lambda wildcards: self.stage(wildcards).resources[key]


def rule_kinds(stages: list[Stage]) -> list[RuleKind]:
    """The stages grouped by kind, in table order; every stage of a kind must write the same
    files up to its wildcard (ValueError names the one that does not)."""
    kinds: dict[str, RuleKind] = {}
    for st in stages:
        wc = WILDCARD.get(st.kind)
        kind = kinds.setdefault(st.kind, RuleKind(st.kind, wc))
        key = st.key if wc else ""
        if key in kind.stages:
            raise ValueError(f"stages {kind.stages[key].name} and {st.name}: the same {st.kind} rule job")
        pats = {part: [_pattern(p, st.key, wc) if wc else p for p in getattr(st, part)]
                for part in ("outs", "out_dirs", "metrics", "plots")}
        if kind.stages and pats != {part: getattr(kind, part) for part in pats}:
            first = next(iter(kind.stages.values())).name
            raise ValueError(f"stage {st.name} writes {pats}, not the {st.kind} rule's files as {first} does")
        kind.outs, kind.out_dirs, kind.metrics, kind.plots = (pats[k] for k in ("outs", "out_dirs", "metrics", "plots"))
        kind.stages[key] = st
    return list(kinds.values())


def job_stage_name(rule: str, wildcards: dict[str, str]) -> str:
    """The stage (and dvc.yaml stage) a Snakemake job runs: ``train`` + experiment=x -> train_x."""
    wc = WILDCARD.get(rule)
    return f"{rule}_{wildcards[wc]}" if wc and wc in wildcards else rule
