"""kill -9 during training, rerun: it resumes and ends with the same weights and metrics
as an uninterrupted run (CPU, bitwise)."""
import json
import os
import shutil
import signal
import subprocess

import pytest
import torch
import yaml

from tests.conftest import BIN, TINY

pytestmark = pytest.mark.slow


def train_cmd(out, work):
    return [str(BIN / "effdetr"), "train", "--experiment", "detr_dc5", "--data", "data/synthcoco",
            "--out", f"{out}/model.pt", "--metrics", f"{out}/train.json", "--work-root", work]


def test_kill_and_resume_matches_uninterrupted(workdir):
    params = yaml.safe_load(TINY.read_text())
    params["profiles"]["synth"]["model"]["backbone"]["pretrained"] = "none"
    params["profiles"]["synth"]["train"].update(epochs=3, max_iters_per_epoch=6, checkpoint_every_iters=2)
    (workdir / "params.yaml").write_text(yaml.safe_dump(params))
    subprocess.run([str(BIN / "effdetr"), "data", "synth", "--out", "data/synthcoco"], check=True, capture_output=True)

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(train_cmd("ref", "work_ref"), check=True, capture_output=True, env=env)

    proc = subprocess.Popen(train_cmd("res", "work_res"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=env, text=True)
    killed_at = None
    for line in proc.stdout:  # kill mid-epoch 1, after at least one in-epoch snapshot
        if line.startswith("epoch 1 iter 3/"):
            proc.send_signal(signal.SIGKILL)
            killed_at = line
            break
    proc.wait()
    assert killed_at is not None and proc.returncode == -signal.SIGKILL
    assert not (workdir / "res/model.pt").exists()
    r = subprocess.run(train_cmd("res", "work_res"), capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert "resuming from" in r.stdout and "epoch 1 iter" in r.stdout  # iter 2 or 4: kill races the next snapshot

    ref = json.loads((workdir / "ref/train.json").read_text())
    res = json.loads((workdir / "res/train.json").read_text())
    strip = lambda h: [{k: v for k, v in e.items() if k != "epoch_seconds"} for e in h]  # noqa: E731
    assert strip(res["history"]) == strip(ref["history"])
    a = torch.load(workdir / "ref/model.pt", weights_only=True)["model"]
    b = torch.load(workdir / "res/model.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_source_hash_tracks_package_code(tmp_path):
    """Resumable state is keyed by the code too: any edit of a package source changes the key."""
    from effdetr.utils import repro
    pkg = tmp_path / "pkg"
    shutil.copytree(TINY.parents[2] / "src" / "effdetr", pkg, ignore=shutil.ignore_patterns("__pycache__"))
    before = repro.source_hash(pkg)
    assert before == repro.source_hash(pkg)
    (pkg / "models" / "detr.py").write_text((pkg / "models" / "detr.py").read_text() + "\n# edit\n")
    assert repro.source_hash(pkg) != before
