"""kill -9 during training, rerun: it resumes and ends with the same weights and metrics
as an uninterrupted run (CPU, bitwise)."""
import json
import os
import re
import shutil
import signal
import subprocess
import threading

import pytest
import torch
import yaml

from tests.conftest import BIN, TINY

HANG_S = 300  # generous: a run that prints nothing for this long has hung (not a speed check)


def require(ok, msg: str) -> None:
    """A precondition of the scenario (pytest.fail: a broken setup reads as such, not as a
    resume that differs)."""
    if not ok:
        pytest.fail(msg)


def train_cmd(out, work, data):
    return [str(BIN / "effdetr"), "train", "--experiment", "detr_dc5", "--data", str(data),
            "--out", f"{out}/model.pt", "--metrics", f"{out}/train.json", "--work-root", work]


@pytest.mark.slow
def test_kill_and_resume_matches_uninterrupted(workdir, tiny_data):
    """A run killed (SIGKILL) mid-epoch 1 and rerun ends bitwise equal to an uninterrupted one.

    Dropout 0.1 and one loader worker make the resume depend on the saved RNG state: the
    worker reseeds per sample in its own process, so the main process's RNG is drawn only by
    dropout (and the loader's base seed). A resume that skipped ``set_rng_state`` would draw
    other dropout masks from the iteration it resumes at, and end with other weights and losses."""
    params = yaml.safe_load(TINY.read_text())
    synth = params["profiles"]["synth"]
    synth["model"]["backbone"]["pretrained"] = "none"
    synth["model"]["dropout"] = 0.1
    # val_every 1: a validation at each epoch's end is part of what must resume exactly
    synth["train"].update(epochs=2, max_iters_per_epoch=4, checkpoint_every_iters=1, num_workers=1,
                          val_every=1, val_images=8)
    (workdir / "params.yaml").write_text(yaml.safe_dump(params))

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(train_cmd("ref", "work_ref", tiny_data), check=False, capture_output=True, text=True,
                          env=env, timeout=HANG_S)
    require(done.returncode == 0, done.stderr)

    proc = subprocess.Popen(train_cmd("res", "work_res", tiny_data), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=env, text=True)
    hung = threading.Event()
    watchdog = threading.Timer(HANG_S, lambda: (hung.set(), proc.kill()))
    watchdog.start()
    killed_at, seen = None, []
    try:
        for line in proc.stdout:  # kill mid-epoch 1: iter 1's snapshot is written before iter 2 runs
            seen.append(line)
            if line.startswith("epoch 1 iter 2/"):
                proc.send_signal(signal.SIGKILL)
                killed_at = line
                break
        proc.wait(timeout=HANG_S)
    finally:
        watchdog.cancel()
        proc.kill()  # no-op when it is already dead
    require(not hung.is_set(), f"the run printed no 'epoch 1 iter 2/' line within {HANG_S} s:\n{''.join(seen)}")
    require(killed_at is not None and proc.returncode == -signal.SIGKILL, "".join(seen))
    require(not (workdir / "res/model.pt").exists(), "the killed run wrote its model")
    r = subprocess.run(train_cmd("res", "work_res", tiny_data), check=False, capture_output=True, text=True,
                       env=env, timeout=HANG_S)
    require(r.returncode == 0, r.stderr)
    # iter 1, 2 or 3: the kill races the next snapshots; either way mid-epoch 1, iterations left to run
    require(re.search(r"resuming from \S+: epoch 1 iter [123]\n", r.stdout), r.stdout)

    ref = json.loads((workdir / "ref/train_history.json").read_text())
    res = json.loads((workdir / "res/train_history.json").read_text())
    strip = lambda h: [{k: v for k, v in e.items() if k != "epoch_seconds"} for e in h]  # noqa: E731
    assert strip(res) == strip(ref) and all("val_AP" in e for e in res)
    a = torch.load(workdir / "ref/model.pt", weights_only=True)["model"]
    b = torch.load(workdir / "res/model.pt", weights_only=True)["model"]
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def test_source_hash_tracks_package_code(tmp_path):
    """Resumable state is keyed by the code too: any edit of a package source changes the key."""
    from effdetr.utils import repro
    pkg = tmp_path / "pkg"
    shutil.copytree(TINY.parents[2] / "src" / "effdetr", pkg, ignore=shutil.ignore_patterns("__pycache__"))
    before = repro.source_hash(pkg)
    assert before == repro.source_hash(pkg)
    (pkg / "models" / "detr.py").write_text((pkg / "models" / "detr.py").read_text() + "\n# edit\n")
    assert repro.source_hash(pkg) != before
