"""Claim verdicts are computed from reproduced numbers only, per metric."""
from effdetr.reporting.claims import judge
from effdetr.reporting.tables import table_rows

SPEC = {
    "metrics": ["AP", "gflops"],
    "rows": {
        "base": {"label": "Base", "AP": 40.0, "gflops": 10.0, "claims": ["reference"]},
        "fast": {"label": "Fast", "AP": 39.0, "gflops": 8.0,
                 "claims": [{"metric": "AP", "max_drop": 1.5, "vs": "base"}, {"metric": "gflops", "lower": "base"}]},
        "tuned": {"label": "Tuned", "AP": 39.5, "claims": [{"metric": "AP", "higher": "fast"}]},
        "paper_scale": {"label": "P", "gflops": 100.0, "claim": {"rel_tol": 0.1}},
    },
}


def test_relations_between_reproduced_rows():
    rep = {"base": {"AP": 10.0, "gflops": 1.0}, "fast": {"AP": 8.0, "gflops": 0.9}, "tuned": {"AP": 8.5}}
    assert judge(SPEC["rows"]["base"], "AP", 40.0, rep, "base") == "reference row"
    assert judge(SPEC["rows"]["fast"], "AP", 39.0, rep, "fast").startswith("no (drop 2.00 vs base, allowed 1.5)")
    assert judge(SPEC["rows"]["fast"], "gflops", 8.0, rep, "fast").startswith("yes (-0.1 vs base)")
    rep["fast"]["gflops"] = 1.0004
    assert judge(SPEC["rows"]["fast"], "gflops", 8.0, rep, "fast").startswith("no (+0.0004 vs base)")
    rep["fast"]["gflops"] = 0.9
    assert judge(SPEC["rows"]["tuned"], "AP", 39.5, rep, "tuned").startswith("yes (+0.50 vs fast)")
    rep["fast"]["AP"] = 9.0
    assert judge(SPEC["rows"]["fast"], "AP", 39.0, rep, "fast").startswith("yes (drop 1.00")
    assert judge(SPEC["rows"]["tuned"], "AP", 39.5, rep, "tuned").startswith("no (-0.50 vs fast)")


def test_missing_numbers_say_not_run_and_paper_tolerance_uses_paper():
    assert judge(SPEC["rows"]["fast"], "AP", 39.0, {}, "fast") == "not run"
    assert judge(SPEC["rows"]["fast"], "AP", 39.0, {"fast": {"AP": 5.0}}, "fast") == "not run (base)"
    assert judge(SPEC["rows"]["paper_scale"], "gflops", 100.0, {"paper_scale": {"gflops": 95.0}},
                 "paper_scale").startswith("yes (-5.0%")
    assert judge(SPEC["rows"]["paper_scale"], "gflops", 100.0, {"paper_scale": {"gflops": 80.0}},
                 "paper_scale").startswith("no (-20.0%")


def test_table_rows_skip_empty_cells_and_add_extra_experiments():
    rows = table_rows(SPEC, {"base": {"AP": 10.0}, "extra": {"AP": 3.0}}, ["extra"])
    labels = [(r[0], r[1]) for r in rows]
    assert ("Tuned", "gflops") not in labels  # neither a paper nor a reproduced number
    assert ("extra", "AP") in labels and rows[-1][2] == "—"


def test_seed_rows_average_with_sample_sd_and_gains_use_the_means(tmp_path):
    import json

    import pytest

    from effdetr.reporting.tables import add_gains, seed_values
    for name, ap in (("s1", 0.30), ("s2", 0.34), ("d1", 0.35), ("d2", 0.37)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "eval.json").write_text(json.dumps({"stats": {"AP": ap, "gmacs_total": 1.5},
                                                               "provenance": {"git": {}}}))
    base, prov = seed_values(tmp_path, ["s1", "s2"])
    assert base["AP"] == pytest.approx(32.0) and base["AP_sd"] == pytest.approx(2 * 2 ** 0.5)
    assert base["seeds"] == 2 and len(prov) == 2
    assert seed_values(tmp_path, ["s1", "missing"])[0] == {}  # a seed not run yet: no row
    spec = {"rows": {"base": {}, "kd": {"gain_vs": "base"}}}
    rep = {"base": base, "kd": seed_values(tmp_path, ["d1", "d2"])[0]}
    add_gains(spec, rep)
    assert rep["kd"]["AP_gain"] == pytest.approx(4.0) and rep["kd"]["gflops_total_gain"] == 0.0
    row = {"claims": [{"metric": "AP", "beyond_spread": "base"}, {"metric": "gflops_total", "equal": "base"}]}
    assert judge(row, "AP", None, rep, "kd").startswith("no (+4.00 vs base, seed spread 4.24)")
    assert judge(row, "gflops_total", None, rep, "kd").startswith("yes (+0.00 vs base)")
    rep["kd"]["gflops_total"] = 1.6
    assert judge(row, "gflops_total", None, rep, "kd").startswith("no")


def test_converted_checkpoint_within_an_absolute_tolerance_of_the_paper():
    row = {"label": "official", "AP": 43.3, "claims": [{"metric": "AP", "abs_tol": 0.2}]}
    assert judge(row, "AP", 43.3, {"r": {"AP": 43.15}}, "r").startswith("yes (-0.15 vs the paper, tolerance ±0.2)")
    assert judge(row, "AP", 43.3, {"r": {"AP": 43.55}}, "r").startswith("no (+0.25 vs the paper")
    assert judge(row, "AP", 43.3, {"r": {}}, "r") == "not run"


def test_relations_within_the_seed_spread_are_inconclusive():
    rows = SPEC["rows"]
    rep = {"base": {"AP": 10.0}, "fast": {"AP": 9.0}, "tuned": {"AP": 9.4}}
    # tuned vs fast: +0.40, inside a spread of 0.5 -> inconclusive; outside 0.3 -> yes
    assert judge(rows["tuned"], "AP", 39.5, rep, "tuned", spread=0.5) == \
        "inconclusive: +0.40 vs fast, within the seed spread 0.50"
    assert judge(rows["tuned"], "AP", 39.5, rep, "tuned", spread=0.3).startswith("yes (+0.40 vs fast)")
    # fast vs base: drop 1.00 against 1.5 allowed; margin 0.5: a spread of 0.6 makes it inconclusive
    assert judge(rows["fast"], "AP", 39.0, rep, "fast", spread=0.6).startswith("inconclusive: drop 1.00 vs base")
    assert judge(rows["fast"], "AP", 39.0, rep, "fast", spread=0.4).startswith("yes (drop 1.00")
    assert judge(rows["fast"], "AP", 39.0, rep, "fast").startswith("yes (drop 1.00")  # no spread measured


def test_family_spread_is_measured_from_its_runs_and_named_under_the_table(tmp_path):
    import json

    import pytest

    from effdetr.reporting.tables import seed_spreads, spread_note, table_rows
    for name, ap in (("base", 0.300), ("base_s2", 0.312), ("fast", 0.295)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "eval.json").write_text(json.dumps({"stats": {"AP": ap}, "provenance": {"git": {}}}))
    spreads = seed_spreads(tmp_path, {"fam": ["base", "base_s2"], "later": ["fast", "not_run"]})
    assert spreads["fam"]["AP"] == pytest.approx(1.2) and "later" not in spreads
    spec = {"metrics": ["AP"], "rows": {"base": {"label": "B", "claims": ["reference"]},
                                         "fast": {"label": "F", "claims": [{"metric": "AP", "lower": "base"}]}}}
    rep = {"base": {"AP": 30.0}, "fast": {"AP": 29.5}}
    rows = table_rows(spec, rep, spreads={"fast": spreads["fam"]})
    assert rows[1][-1] == "inconclusive: -0.50 vs base, within the seed spread 1.20"
    assert table_rows(spec, rep)[1][-1] == "yes (-0.50 vs base)"
    experiments = {"base": ("base", {"family": "fam"}), "fast": ("fast", {"family": "fam"}),
                   "other": ("other", {"family": "later"})}
    note = spread_note(["base", "fast", "other"], experiments, spreads, {"base", "base_s2"})
    assert "Rows with one run: fast, other." in note
    assert "`fam` 1.20 AP (base, base_s2)" in note and "`later` not measured yet" in note
