"""Render one paper table (reports/tables/<table>.{md,csv}) in the paper's layout.

Rows are models, columns the paper's metrics, each as a *paper* and an *ours* column, and a
last column with the claims judged on the reproduced numbers. Paper numbers come only from
the YAML data in ``reporting/paper``; reproduced numbers only from the metrics the stages
wrote. What a cell compares depends on the scale:

- **relative** (SynthCOCO, any data that is not the paper's): absolute values differ between
  datasets for no interesting reason, so every cell after the reference row also shows its
  change against that row, the paper's change beside ours;
- **absolute** (the paper's own data, and paper-scale FLOPs, which count the paper's model at
  the paper's input size whatever the profile): ours shows reproduced - paper.

The CSV holds the same cells in long form, one line per (row, metric), for scripts.

The Markdown is written here rather than with tabulate: tabulate pads every cell to its
column's width, so a rerun that lengthens one number rewrites every line of the table in a
diff; one unpadded line per row keeps a changed row a one-line change.
"""
from __future__ import annotations

import csv
import io
import math
import re
from pathlib import Path

from .claims import judge
from .plan import TablePlan
from .values import add_gains, experiment_values, flops_values, seed_spreads, seed_values, speed_values

CSV_COLUMNS = ["model", "row", "metric", "paper", "reproduced", "reference", "paper_change", "reproduced_change",
               "reproduced_minus_paper", "claim"]
DISPLAY = {"gflops": "GFLOPs", "gflops_total": "GFLOPs", "gflops_transformer": "GFLOPs (transformer)",
           "gflops_backbone": "GFLOPs (backbone)", "gflops_encoder": "GFLOPs (encoder)", "params_m": "Params (M)",
           "fps_b4": "FPS (batch 4)", "fps_b1": "FPS", "AP_sd": "AP sd", "AP_gain": "AP gain",
           "ms": "ms", "speedup": "speed-up", "score_mb": "score MB", "peak_mb": "peak MB",
           "encoder_tokens": "encoder tokens"}
NO_CHANGE = ("_sd", "_gain")  # already a spread or a difference: no change of a change


def display(metric: str) -> str:
    if metric in DISPLAY:
        return DISPLAY[metric]
    if metric.startswith("token_share_"):
        return f"tokens {metric.removeprefix('token_share_')} %"
    return metric


def fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if isinstance(v, float):
        return f"{v:.2f}" if round(abs(v), 2) >= 0.1 or v == 0 else f"{v:.3g}"
    return str(v)


def signed(v) -> str:
    if v is None:
        return "—"
    return "±0" if v == 0 else ("+" if v > 0 else "-") + fmt(abs(float(v)))


def comparison(plan: TablePlan, paper_scale: bool) -> str:
    return "absolute" if paper_scale or plan.spec.get("kind") == "flops" else "relative"


def reference_row(plan: TablePlan, key: str) -> str | None:
    """The row ``key``'s changes are taken against: its own ``ref``, else the nearest
    reference row above it (a table of pairs, e.g. ACT vs K-means at each L, has one per
    pair), else the table's first reference row (None: the table has none)."""
    rows = plan.spec["rows"]
    if rows.get(key, {}).get("ref"):
        return rows[key]["ref"]
    refs = [k for k in plan.rows if "reference" in _claims(rows.get(k, {}))]
    above = [k for k in plan.rows[:plan.rows.index(key) + 1] if k in refs]
    return above[-1] if above else (refs[0] if refs else None)


def _claims(row: dict) -> list:
    c = row.get("claims", row.get("claim"))
    return c if isinstance(c, list) else ([c] if c is not None else [])


def _num(v):
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def extra_row_label(key: str, spec: dict) -> str:
    """The label of a run the paper has no row for: a second seed of a paper row reads as that
    row's label and its seed (``sparse_detr_rho0p1_seed43`` -> ``Sparse DETR (rho=0.1), seed
    43``); any other run by its experiment name."""
    base, sep, seed = key.rpartition("_seed")
    if sep and seed.isdigit() and base in spec["rows"]:
        return f"{spec['rows'][base].get('label', base)}, seed {seed}"
    return key


def table_cells(plan: TablePlan, reproduced: dict[str, dict], spreads: dict[str, dict] | None = None,
                paper_scale: bool = False) -> list[dict]:
    """One dict per shown row: label, key, reference, claim, and per metric ``paper``,
    ``reproduced``, their changes against the reference row and reproduced - paper."""
    spec, mode = plan.spec, comparison(plan, paper_scale)
    out = []
    for key in plan.rows:
        row = spec["rows"].get(key, {"label": extra_row_label(key, spec)})
        got = reproduced.get(key, {})
        if key not in spec["rows"] and not got:
            continue  # an experiment of this repo's own, not run yet: named under the table
        ref = reference_row(plan, key)
        ref = None if ref == key else ref
        ref_paper, ref_got = spec["rows"].get(ref, {}) if ref else {}, reproduced.get(ref, {}) if ref else {}
        where = f"{spec['source']}: tables.{spec['table']}.rows.{key}" if "source" in spec else None
        spread = (spreads or {}).get(key, {})
        cells, verdicts, is_ref = {}, [], False
        for m in spec["metrics"]:
            paper, mine = _num(row.get(m)), _num(got.get(m))
            changes = ref is not None and not m.endswith(NO_CHANGE)
            cells[m] = {
                "paper": paper, "reproduced": mine,
                "paper_change": paper - ref_paper[m] if changes and paper is not None and _num(ref_paper.get(m)) is not None else None,
                "reproduced_change": mine - ref_got[m] if changes and mine is not None and _num(ref_got.get(m)) is not None else None,
                "reproduced_minus_paper": mine - paper if paper is not None and mine is not None else None}
            v = judge(row, m, row.get(m), reproduced, key, spread.get(m), where)
            if v == "reference row":
                is_ref = True
            elif v != "—":
                verdicts.append((m, v))
        claim = "reference" if is_ref else "; ".join(f"{display(m)}: {v}" for m, v in verdicts) or "—"
        out.append({"label": row.get("label", key), "key": key, "reference": ref, "claim": claim,
                    "run": key in plan.run and bool(got), "cells": cells, "mode": mode})
    return out


def _cell(c: dict, which: str, mode: str) -> str:
    v = c[which]
    if v is None:
        return "—"
    if mode == "relative" and c[f"{which}_change"] is not None:
        return f"{fmt(v)} ({signed(c[f'{which}_change'])})"
    if mode == "absolute" and which == "reproduced" and c["reproduced_minus_paper"] is not None:
        return f"{fmt(v)} ({signed(c['reproduced_minus_paper'])})"
    return fmt(v)


def markdown_table(plan: TablePlan, rows: list[dict]) -> str:
    metrics = plan.spec["metrics"]
    head = ["model"] + [f"{display(m)} {side}" for m in metrics for side in ("paper", "ours")] + ["claims"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (2 * len(metrics)) + "---|"]
    for r in rows:
        label = r["label"] + (" (reference)" if r["claim"] == "reference" else "")
        cells = [_cell(r["cells"][m], side, r["mode"]) for m in metrics for side in ("paper", "reproduced")]
        lines.append("| " + " | ".join([label] + cells + [r["claim"]]) + " |")
    return "\n".join(lines) + "\n"


def csv_rows(plan: TablePlan, rows: list[dict]) -> list[list[str]]:
    out = []
    for r in rows:
        for m in plan.spec["metrics"]:
            c = r["cells"][m]
            if c["paper"] is None and c["reproduced"] is None:
                continue
            out.append([r["label"], r["key"], m, fmt(c["paper"]), fmt(c["reproduced"]), r["reference"] or "",
                        fmt(c["paper_change"]), fmt(c["reproduced_change"]), fmt(c["reproduced_minus_paper"]),
                        r["claim"]])
    return out


def _legend(rows: list[dict]) -> str:
    refs = list(dict.fromkeys(r["reference"] for r in rows if r["reference"]))
    labels = {r["key"]: r["label"] for r in rows}
    if rows and rows[0]["mode"] == "absolute":
        return "In parentheses after ours: reproduced minus paper."
    if not refs:
        return ("No reference row: the cells are the values as measured. The profile's data is not the paper's: "
                "compare the claims, not the values, with the paper.")
    return (f"In parentheses: the change against the reference row ({', '.join(labels.get(k, k) for k in refs)}), "
            "the paper's beside ours. The profile's data is not the paper's, so compare these changes, and the "
            "claims, with the paper; the values themselves are not comparable.")


def render_markdown(plan: TablePlan, rows: list[dict], prov: list[dict], context: dict) -> str:
    spec = plan.spec
    out = io.StringIO()
    out.write(f"# {spec['title']}\n\n")
    out.write(f"Source: {spec['paper']} (paper numbers: `src/effdetr/reporting/paper/{spec['source']}`). "
              f"Profile: `{context['profile']}`. AP/AR in percent; GFLOPs = GMACs (one multiply-add = one FLOP).\n")
    low = sorted({p["what"].removeprefix("eval ") for p in prov if p.get("precision", "fp32") != "fp32"})
    out.write("Evaluated in fp32, as the papers. " if not low else
              f"Evaluated in fp32 except under bf16 autocast (eval.amp): {', '.join(low)}. ")
    out.write(_legend(rows) + "\n\n")
    out.write(markdown_table(plan, rows))
    not_run = [r["label"] for r in rows if not r["run"]]
    if not_run:
        out.write(f"\nPaper numbers only (not run): {', '.join(not_run)}.\n")
    pending = [k for k in plan.run if k not in spec["rows"] and k not in {r["key"] for r in rows}]
    if pending:
        out.write(f"\nNot run yet: {', '.join(pending)}.\n")
    out.write(f"\n**Protocol.** {spec.get('protocol', '').strip()}\n")
    if context.get("note"):
        out.write(f"\n{context['note']}\n")
    out.write("\n**Provenance.** Each number's metrics file, and the commit and params hash that made it "
              "(`git show <commit>`; `effdetr` keys resumable state by the params hash). MLflow run ids refer to "
              "the store of the machine that ran the stage.\n\n")
    for p in prov:
        git = p.get("git", {})
        out.write(f"- {p['what']}: `{p.get('file', '?')}`, commit `{git.get('sha', '?')[:12]}`"
                  f"{' (uncommitted changes)' if git.get('dirty') else ''}, params hash `{p.get('params_hash')}`"
                  f"{', ' + p['precision'] if 'precision' in p else ''}; MLflow run id `{p.get('mlflow_run_id')}`\n")
    out.write(f"- this table: params hash `{context['params_hash']}`; MLflow run id `{context['run_id']}`\n")
    return out.getvalue()


def spread_note(plan: TablePlan, spreads: dict[str, dict]) -> str:
    """Which rows rest on one run, and each family's measured AP spread."""
    seeded = {k for k in plan.run if plan.spec["rows"].get(k, {}).get("seeds")}
    fams = sorted(set(plan.families.values()))
    single = [k for k in plan.run if k not in seeded]
    parts = []
    for fam in fams:
        sp = spreads.get(fam)
        parts.append(f"`{fam}` {fmt(sp['AP'])} AP ({', '.join(sp['runs'])})" if sp and "AP" in sp
                     else f"`{fam}` not measured yet")
    text = "**Seeds.** " + (f"Rows with one run: {', '.join(single)}. " if single else "")
    text += ("Seed spread (max - min AP over repeated runs) per family: " + "; ".join(parts) +
             ". A claim between rows whose difference is within the spread reads inconclusive.") if parts \
        else "No seed spread is measured for these rows."
    return text


def table_values(plan: TablePlan, params, metrics_dir: Path) -> tuple[dict, list[dict], str, dict | None]:
    """(row -> reproduced values, provenance, note, row -> seed spread) for one table."""
    if plan.source == "flops":
        reproduced, prov, data = flops_values(metrics_dir)
        sizes = ({str(v) for k, v in data.get("input_sizes", {}).items() if k in plan.rows}
                 if data else {str(params.flops.input_sizes)})
        return reproduced, prov, f"Input sizes (h, w) averaged: {', '.join(sorted(sizes))}.", None
    if plan.source == "speed":
        reproduced, prov, data = speed_values(metrics_dir)
        note = (f"Device: `{data['device']}` ({data['environment'].get('cuda')}), "
                f"{data['environment'].get('threads')} CPU threads, torch {data['environment'].get('torch')}."
                if data else "Not run yet.")
        return reproduced, prov, note, None
    reproduced, prov = {}, []
    for key in plan.run:
        seeds = plan.spec["rows"].get(key, {}).get("seeds")
        reproduced[key], p = seed_values(metrics_dir, seeds) if seeds else experiment_values(metrics_dir, key)
        prov += p
    add_gains(plan.spec, reproduced)
    spreads = seed_spreads(metrics_dir, params.seed_spread)
    row_spreads = {k: spreads[f] for k, f in plan.families.items() if f in spreads}
    return reproduced, prov, spread_note(plan, spreads), row_spreads


def write_table(plan: TablePlan, params, metrics_dir: Path, out_dir: Path, context: dict,
                paper_scale: bool) -> list[Path]:
    """reports/tables/<tid>.md and .csv, and the table's figures (reports/figures/<tid>/);
    returns the files written."""
    from .figures import table_figures
    tables_dir = out_dir / "tables"
    tables_dir.mkdir(parents=True, exist_ok=True)
    reproduced, prov, note, spreads = table_values(plan, params, metrics_dir)
    rows = table_cells(plan, reproduced, spreads, paper_scale)
    md, csv_path = tables_dir / f"{plan.tid}.md", tables_dir / f"{plan.tid}.csv"
    md.write_text(render_markdown(plan, rows, prov, {**context, "note": note}))
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS)
        w.writerows(csv_rows(plan, rows))
    return [md, csv_path] + table_figures(plan, reproduced, metrics_dir, out_dir / "figures" / plan.tid)


class StaleTableError(ValueError):
    """A table file in a layout this code does not write (an earlier run's): rebuild it."""


VERDICT = re.compile(r"(?:^|: |; )(yes|no|inconclusive|not run)\b")


def claim_counts(csv_path: Path) -> dict[str, int]:
    """How many of a table's judged claims read yes / no / inconclusive / not run (each row's
    claim cell is repeated on its metric lines: counted once per row)."""
    counts: dict[str, int] = {}
    seen = set()
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        lacking = [c for c in ("row", "claim") if c not in (reader.fieldnames or ("row", "claim"))]
        if lacking:  # an empty file has no header and no rows: nothing to count
            raise StaleTableError(f"{csv_path}: no column {', '.join(lacking)}; written by an older "
                                  "effdetr (a different table layout)")
        for r in reader:
            if r["row"] in seen:
                continue
            seen.add(r["row"])
            for word in VERDICT.findall(r["claim"]):
                counts[word] = counts.get(word, 0) + 1
    return counts
