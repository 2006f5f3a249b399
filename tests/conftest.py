import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "data" / "params_tiny.yaml"
BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def tiny_params() -> Path:
    return TINY


@pytest.fixture(scope="session")
def tiny_cfg():
    from effdetr.config import experiment_config
    return experiment_config(TINY, "detr_dc5")[0]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory, tiny_cfg) -> Path:
    from effdetr.data.synthcoco import generate
    root = tmp_path_factory.mktemp("synth")
    generate(tiny_cfg.data.synth, root)
    return root


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A scratch copy of the repo's workflow files, as a user's checkout would have them."""
    for name in ("workflow", "params.yaml", ".dvcignore"):
        src = REPO / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, tmp_path / name)
    (tmp_path / "src").symlink_to(REPO / "src")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    monkeypatch.setenv("PATH", f"{BIN}:{__import__('os').environ['PATH']}")
    return tmp_path


@pytest.fixture(scope="module", autouse=True)
def one_thread(request):
    """For modules marked ``one_thread``: the tiny profile's ``threads: 1``, which the CLI
    applies and ``train()`` does not. On a busy 2-core machine a second intra-op thread makes
    tiny training steps several times slower, and bitwise comparisons between runs in one
    process need one thread count. Module-scoped and autouse, so it is set before any module
    fixture trains."""
    if request.node.get_closest_marker("one_thread") is None:
        yield
        return
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def planned_stages(dry_run_stdout: str) -> dict[str, str]:
    """Stage name -> its job block, for each job of a `snakemake -n` printout: ``rule train``
    with ``wildcards: experiment=x`` is stage ``train_x`` (as in dvc.yaml); named targets
    (all, released, paper_*) by their rule name."""
    import re

    from effdetr.rules import job_stage_name
    jobs = {}
    for block in re.split(r"^(?=(?:local)?rule \w+:)", dry_run_stdout, flags=re.M):
        head = re.match(r"(?:local)?rule (\w+):", block)
        if not head:
            continue
        wc = re.search(r"^\s+wildcards: (.+)$", block, flags=re.M)
        wildcards = dict(kv.split("=", 1) for kv in wc.group(1).split(", ")) if wc else {}
        jobs[job_stage_name(head.group(1), wildcards)] = block
    return jobs
