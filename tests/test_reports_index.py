"""reports/README.md: the built tables by paper with their claim counts, the ones not built
yet, and Snakemake's per-job benchmark records summarised per rule."""
import csv
from pathlib import Path

import pytest

from effdetr import config as C
from effdetr.reporting.index import benchmark_summary, build_index
from effdetr.reporting.plan import plan_tables
from effdetr.reporting.tables import CSV_COLUMNS
from tests.conftest import TINY

HEADER = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"


def write_table(out: Path, tid: str, claims: dict[str, str]) -> None:
    (out / "tables").mkdir(parents=True, exist_ok=True)
    (out / "tables" / f"{tid}.md").write_text(f"# {tid}\n")
    with open(out / "tables" / f"{tid}.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS)
        for row, claim in claims.items():
            w.writerow([row, row, "AP", "1", "1", "", "", "", "", claim])


def test_index_lists_built_tables_by_paper_with_claim_counts_and_names_the_rest(tmp_path):
    params, _ = C.load_params(TINY)
    plans = plan_tables(params)
    write_table(tmp_path, "act_main", {"a": "reference", "b": "AP: yes (+1 vs a)", "c": "AP: no (-1 vs a)"})
    write_table(tmp_path, "sparse_main", {"s": "AP: inconclusive: +0.1 vs a, within the seed spread 0.50"})
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "train_detr_dc5.tsv").write_text(HEADER + "120\t0:02:00\t1500.4\t1\t1\t1\t0\t0\t90\t200\n")
    (bench / "train_sparse_detr_rho0p3.tsv").write_text(HEADER + "60\t0:01:00\t900\t1\t1\t1\t0\t0\t90\t100\n")
    (bench / "data.tsv").write_text(HEADER + "6\t0:00:06\tNA\t1\t1\t1\t0\t0\t90\t5\n")
    from effdetr import stages as S
    table = S.build_stages(S.load_raw(str(TINY)), str(TINY))
    text = build_index(params, plans, tmp_path, bench, stages=table).read_text()
    assert "## ACT (Zheng et al., BMVC 2021) (`snakemake paper_act`)" in text
    assert "| 1 yes, 1 no | [csv](tables/act_main.csv) |" in text
    assert "1 inconclusive" in text
    built = {"act_main", "sparse_main"}
    missing = sorted(set(plans) - built)
    assert "Not built yet: " + ", ".join(f"`{t}`" for t in missing) + "." in text
    assert "| train | 2 | 3.0 min | train_detr_dc5 (2.0 min) | 1500 MB (train_detr_dc5) | 5.0 min |" in text
    assert "| data | 1 | 0.1 min | data (0.1 min) | — | 0.1 min |" in text
    # the chain through the teacher outweighs the one through the Sparse DETR training
    assert "Critical path: 2.1 min of wall time, data (0.1) -> train_detr_dc5 (2.0). All jobs: 5.1 CPU-minutes." in text


def test_critical_path_is_the_heaviest_chain_of_the_stage_graph():
    """A diamond a -> (b, c) -> d with b slow: a, b, d; stages without a record count 0."""
    from effdetr.stages import Stage, critical_path
    st = [Stage("a", ["x"], [], outs=["A"]), Stage("b", ["x"], [], deps=["A"], outs=["B"]),
          Stage("c", ["x"], [], deps=["A"], outs=["C"]), Stage("d", ["x"], [], deps=["B", "C"], outs=["D"]),
          Stage("e", ["x"], [], deps=["D"], outs=["E"])]
    assert critical_path(st, {"a": 1.0, "b": 5.0, "c": 2.0, "d": 1.0}) == (7.0, ["a", "b", "d", "e"])
    assert critical_path(st, {"c": 9.0}) == (9.0, ["a", "c", "d", "e"])


def test_no_benchmark_records_no_section(tmp_path):
    assert benchmark_summary(tmp_path / "none") == []


def test_a_table_in_an_older_layout_is_listed_as_stale_not_a_crash(tmp_path):
    """An earlier run's table (its CSV has no `row`/`claim` columns) stays listed, marked for a
    rebuild, while the current tables beside it are counted."""
    from effdetr.reporting.tables import StaleTableError, claim_counts
    params, _ = C.load_params(TINY)
    write_table(tmp_path, "act_main", {"a": "reference", "b": "AP: yes (+1 vs a)"})
    (tmp_path / "tables" / "sparse_main.md").write_text("# old\n")
    (tmp_path / "tables" / "sparse_main.csv").write_text(
        "model,metric,paper,reproduced,delta,claim holds at this scale\nDeformable DETR,AP,43.90,20.98,-22.92,—\n")
    with pytest.raises(StaleTableError, match=r"sparse_main\.csv: no column row, claim"):
        claim_counts(tmp_path / "tables" / "sparse_main.csv")
    (tmp_path / "empty.csv").write_text("")
    assert claim_counts(tmp_path / "empty.csv") == {}  # no header, no rows: not a stale layout
    text = build_index(params, plan_tables(params), tmp_path, tmp_path / "no_bench").read_text()
    assert "| 1 yes | [csv](tables/act_main.csv) |" in text
    assert "| older layout, from an earlier run: rebuild with `snakemake paper_sparse_detr` |" in text
