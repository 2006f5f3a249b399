"""Published numbers of each paper, as YAML data (never used to compute reproduced values).

Each file is checked against the schema below when it is loaded (so when the report is
built); a problem raises :class:`PaperSpecError` naming the file and the key path, e.g.
``sparse_detr.yaml: tables.sparse_main.rows.sparse_detr_rho0p1.claims[2].max_ratio: ...``.

Schema. Top level: ``paper`` (the citation) and ``tables`` (table id -> table). A table:
``title``, ``protocol``, ``metrics`` (the metric columns), ``rows`` (row key -> row), and
optionally ``kind: flops`` and ``figure`` (``file``, ``x`` and ``y`` metrics, ``rows``,
``baselines`` among them). A row: ``label``, paper numbers under metric names of the table,
``claim`` or ``claims`` (see reporting/claims.py), ``seeds`` (the experiments averaged into
the row), ``gain_vs`` (a row of the table), ``ref`` (the row its changes are shown against, where
not the nearest reference row above it) and ``profiles``. Claims compare with rows of the
same table. No other keys: a typo is an error, never a silently empty cell.
"""
from __future__ import annotations

import math
from importlib import resources
from pathlib import Path

import yaml

from ..claims import NEEDS_VS, TOLERANCES, claim_keys, claim_kind, claim_problem, row_claims

TOP_KEYS = {"paper", "tables"}
TABLE_KEYS = {"title", "protocol", "metrics", "rows", "kind", "figure"}
TABLE_KINDS = {"flops"}
ROW_KEYS = {"label", "claim", "claims", "seeds", "gain_vs", "profiles", "ref"}
FIGURE_KEYS = {"file", "x", "y", "rows", "baselines"}


class PaperSpecError(ValueError):
    """A paper YAML that does not fit the schema, naming the file and the key path."""

    def __init__(self, file: str | Path, key: str, message: str):
        self.file, self.key = str(file), key
        super().__init__(f"{file}: {key}: {message}")


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _name_list(v) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, str) and x for x in v)


def _check_claim(claim, key: str, row_key: str, row: dict, table: dict, err) -> None:
    problem = claim_problem(claim)
    if problem is not None:
        err(key + problem[0], problem[1])
    if claim == "reference":
        return
    kind = claim_kind(claim, key)
    metrics, rows = table["metrics"], table["rows"]
    if "metric" in claim and claim["metric"] not in metrics:
        err(f"{key}.metric", f"unknown metric {claim['metric']!r} (the table's metrics: {', '.join(metrics)})")
    value = claim[kind]
    if kind in TOLERANCES:
        if not _is_num(value) or value < 0:
            err(f"{key}.{kind}", f"a tolerance is a number >= 0, got {value!r}")
        if "vs" in claim:
            err(f"{key}.vs", f"{kind} compares with the paper's number, not with another row")
        papers = [m for m in ([claim["metric"]] if "metric" in claim else metrics) if _is_num(row.get(m))
                  and (kind != "rel_tol" or row[m] != 0)]
        if not papers:
            what = f"its {claim['metric']}" if "metric" in claim else "any of the table's metrics"
            err(f"{key}.{kind}", f"{kind} needs the paper's number, and row '{row_key}' has "
                                 f"{'no nonzero' if kind == 'rel_tol' else 'no'} paper number for {what}")
        return
    if kind in NEEDS_VS:
        if not (_is_num(value) and (kind != "max_ratio" or value > 0)):
            err(f"{key}.{kind}", f"expected a number{' > 0' if kind == 'max_ratio' else ''}, got {value!r}")
        if "vs" not in claim:
            err(key, f"{kind} needs `vs`, the row it compares with")
        other, other_key = claim["vs"], f"{key}.vs"
    else:
        if "vs" in claim:
            err(f"{key}.vs", f"{kind} names its row as its own value ({kind}: <row>), `vs` is not read")
        other, other_key = value, f"{key}.{kind}"
    if not isinstance(other, str) or other not in rows:
        err(other_key, f"{other!r} is not a row of this table (rows: {', '.join(rows)})")
    if other == row_key:
        err(other_key, "a row cannot be compared with itself")


def _check_table(table, tkey: str, err) -> None:
    if not isinstance(table, dict):
        err(tkey, f"expected a mapping, got {type(table).__name__}")
    for k in sorted(set(table) - TABLE_KEYS):
        err(f"{tkey}.{k}", f"unknown key (a table has: {', '.join(sorted(TABLE_KEYS))})")
    for k in ("title", "protocol", "metrics", "rows"):
        if k not in table:
            err(f"{tkey}.{k}", "missing")
    for k in ("title", "protocol"):
        if not isinstance(table[k], str) or not table[k].strip():
            err(f"{tkey}.{k}", "expected a non-empty string")
    if "kind" in table and table["kind"] not in TABLE_KINDS:
        err(f"{tkey}.kind", f"unknown table kind {table['kind']!r} (known: {', '.join(sorted(TABLE_KINDS))})")
    metrics = table["metrics"]
    if not _name_list(metrics):
        err(f"{tkey}.metrics", "expected a non-empty list of metric names")
    if len(set(metrics)) != len(metrics):
        err(f"{tkey}.metrics", f"a metric is listed twice in {metrics}")
    rows = table["rows"]
    if not isinstance(rows, dict) or not rows:
        err(f"{tkey}.rows", "expected a non-empty mapping of row key -> row")
    for rk, row in rows.items():
        rkey = f"{tkey}.rows.{rk}"
        if not isinstance(row, dict):
            err(rkey, f"expected a mapping, got {type(row).__name__}")
        for k, v in row.items():
            if k in metrics:
                if not _is_num(v):
                    err(f"{rkey}.{k}", f"a paper number must be a finite number, got {v!r}")
            elif k not in ROW_KEYS:
                err(f"{rkey}.{k}", f"neither a metric of the table ({', '.join(metrics)}) nor a row key "
                                   f"({', '.join(sorted(ROW_KEYS))})")
        if "label" in row and (not isinstance(row["label"], str) or not row["label"]):
            err(f"{rkey}.label", "expected a non-empty string")
        for k in ("seeds", "profiles"):
            if k in row and not _name_list(row[k]):
                err(f"{rkey}.{k}", "expected a non-empty list of names")
        if "gain_vs" in row and (row["gain_vs"] not in rows or row["gain_vs"] == rk):
            err(f"{rkey}.gain_vs", f"{row['gain_vs']!r} is not another row of this table")
        if "ref" in row and (row["ref"] not in rows or row["ref"] == rk):
            err(f"{rkey}.ref", f"{row['ref']!r} is not another row of this table")
        if "claim" in row and "claims" in row:
            err(f"{rkey}.claims", "give `claim` (one) or `claims` (a list), not both")
        if "claims" in row and (not isinstance(row["claims"], list) or not row["claims"]):
            err(f"{rkey}.claims", "expected a non-empty list of claims")
        for claim, ck in zip(row_claims(row), claim_keys(row)):
            _check_claim(claim, f"{rkey}.{ck}", rk, row, table, err)
    fig = table.get("figure")
    if fig is not None:
        fkey = f"{tkey}.figure"
        if not isinstance(fig, dict):
            err(fkey, "expected a mapping")
        for k in sorted(set(fig) - FIGURE_KEYS):
            err(f"{fkey}.{k}", f"unknown key (a figure has: {', '.join(sorted(FIGURE_KEYS))})")
        for k in ("file", "x", "y", "rows"):
            if k not in fig:
                err(f"{fkey}.{k}", "missing")
        if not isinstance(fig["file"], str) or not fig["file"].endswith(".png"):
            err(f"{fkey}.file", f"expected a .png file name, got {fig['file']!r}")
        for k in ("x", "y"):
            if fig[k] not in metrics:
                err(f"{fkey}.{k}", f"{fig[k]!r} is not a metric of the table")
        for k in ("rows", "baselines"):
            for r in fig.get(k, []):
                if r not in (rows if k == "rows" else fig["rows"]):
                    err(f"{fkey}.{k}", f"{r!r} is not a row of the {'table' if k == 'rows' else 'figure'}")


def check_paper_doc(doc, file: str | Path) -> None:
    """Raise PaperSpecError (file + key path) unless ``doc`` fits the schema above."""
    def err(key: str, message: str):
        raise PaperSpecError(file, key, message)

    if not isinstance(doc, dict):
        err("<root>", "expected a mapping with `paper` and `tables`")
    for k in sorted(set(doc) - TOP_KEYS):
        err(k, f"unknown key (the top level has: {', '.join(sorted(TOP_KEYS))})")
    if not isinstance(doc.get("paper"), str) or not doc["paper"].strip():
        err("paper", "missing or not a non-empty string (the paper's citation)")
    if not isinstance(doc.get("tables"), dict) or not doc["tables"]:
        err("tables", "missing or not a non-empty mapping of table id -> table")
    for tid, table in doc["tables"].items():
        _check_table(table, f"tables.{tid}", err)


def load_paper_tables(directory: str | Path | None = None) -> dict[str, dict]:
    """table id -> table spec (title, protocol, metrics, rows with paper numbers + claims),
    from every ``*.yaml`` of this package (or of ``directory``), each checked by check_paper_doc."""
    folder = Path(directory) if directory is not None else resources.files(__name__)
    tables, seen = {}, {}
    for f in sorted(folder.iterdir(), key=lambda p: p.name):
        if f.name.endswith(".yaml"):
            try:
                doc = yaml.safe_load(f.read_text())
            except yaml.YAMLError as e:
                raise PaperSpecError(f, "<yaml>", f"not valid YAML ({e})") from None
            check_paper_doc(doc, f)
            for tid, spec in doc["tables"].items():
                if tid in seen:
                    raise PaperSpecError(f, f"tables.{tid}", f"table id also defined in {seen[tid]}")
                seen[tid] = f
                tables[tid] = {**spec, "paper": doc["paper"], "source": f.name, "table": tid}
    return tables
