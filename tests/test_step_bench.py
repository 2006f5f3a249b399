"""`effdetr bench step` builds an experiment as its train stage does and times TrainStep's
phases. Only the structure of its figures is checked: tests never assert wall-clock time."""
from __future__ import annotations

import subprocess

import pytest

from tests.conftest import BIN, REPO, TINY


def test_step_bench_times_every_phase_and_names_what_it_replaced(tiny_data, tmp_path, monkeypatch):
    from effdetr.evaluation.step_bench import format_result, run_step_bench
    monkeypatch.chdir(tmp_path)  # no data/checkpoints here: every weight file is missing
    r = run_step_bench(TINY, "act_mtkd_L16", data=str(tiny_data), warmup=1, iters=1, threads=1)
    assert list(r["phases"]) == ["forward", "teacher", "loss", "backward", "optimizer"]
    assert all(v["cpu_ms"] > 0 and v["wall_ms"] > 0 for v in r["phases"].values())
    assert r["step_cpu_ms"] == pytest.approx(sum(v["cpu_ms"] for v in r["phases"].values()))
    # the MTKD student starts from the teacher and distils it: both files are missing here,
    # so both are random weights, and the result says so
    assert any(s.startswith("--teacher data/checkpoints/detr_dc5.pt") for s in r["substituted"])
    assert any(s.startswith("--init data/checkpoints/detr_dc5.pt") for s in r["substituted"])
    assert "teacher" in format_result(r)
    plain = run_step_bench(TINY, "sparse_detr_rho0p3", data=str(tiny_data), warmup=1, iters=1, threads=1)
    assert list(plain["phases"]) == ["forward", "loss", "backward", "optimizer"]


def test_step_bench_refuses_an_experiment_without_a_train_stage(tiny_data):
    r = subprocess.run([str(BIN / "effdetr"), "bench", "step", "--params", str(TINY), "--experiment", "act_L16",
                        "--data", str(tiny_data)], cwd=REPO, capture_output=True, text=True)
    assert r.returncode != 0 and "'act_L16' has no train stage" in r.stderr


def test_step_bench_baseline_must_be_a_revision_with_the_benchmark(tiny_data, tmp_path):
    out = tmp_path / "r.json"
    r = subprocess.run([str(BIN / "effdetr"), "bench", "step", "--params", str(TINY), "--experiment", "sparse_detr_rho0p3",
                        "--data", str(tiny_data), "--baseline", "no-such-rev", "--out", str(out)],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode != 0 and "no-such-rev: not a revision" in r.stderr and not out.exists()
