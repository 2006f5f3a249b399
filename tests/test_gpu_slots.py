"""`effdetr gpus N -- CMD`: jobs side by side on one workstation get disjoint GPUs, a job killed
outright frees its GPUs, and a scheduler's or user's CUDA_VISIBLE_DEVICES is left alone.
GPUs are counted from EFFDETR_GPU_COUNT, so this runs without any."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# writes what it sees, then holds its GPUs until told to stop
HOLDER = ("import os, sys, time, pathlib\n"
          "out = pathlib.Path(sys.argv[1])\n"
          "out.write_text(os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>'))\n"
          "while not pathlib.Path(sys.argv[2]).exists(): time.sleep(0.05)\n")


def env_for(tmp_path: Path, count: int, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_ID")}
    env.update(EFFDETR_GPU_COUNT=str(count), EFFDETR_GPU_LOCKS=str(tmp_path / "locks"),
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO / "src"), env.get("PYTHONPATH")) if p), **extra)
    return env


STARTED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _no_holder_outlives_its_test():
    """A failing test must not leave its holders polling for their stop file forever."""
    yield
    while STARTED:
        proc = STARTED.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=60)


def start(tmp_path: Path, name: str, n: int, env: dict) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "effdetr.cli", "gpus", str(n), "--", sys.executable, "-c", HOLDER,
           str(tmp_path / f"{name}.seen"), str(tmp_path / f"{name}.stop")]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    STARTED.append(proc)
    return proc


def seen(tmp_path: Path, name: str, polls: int = 1200) -> str:
    """What the job saw, once it runs (a hang guard of ``polls`` x 50 ms, not a speed check)."""
    f = tmp_path / f"{name}.seen"
    for _ in range(polls):
        if f.exists() and f.read_text():
            return f.read_text()
        time.sleep(0.05)
    pytest.fail(f"{name} never started")


def stop(tmp_path: Path, name: str, proc: subprocess.Popen) -> None:
    (tmp_path / f"{name}.stop").write_text("")
    assert proc.wait(timeout=60) == 0, proc.stderr.read()


def test_side_by_side_jobs_get_disjoint_gpus_and_a_killed_job_frees_its_own(tmp_path):
    env = env_for(tmp_path, 3)
    a = start(tmp_path, "a", 1, env)
    got_a = seen(tmp_path, "a")
    b = start(tmp_path, "b", 2, env)
    got_b = seen(tmp_path, "b")
    assert got_a == "0" and got_b == "1,2"  # lowest free first; no GPU twice
    # every GPU is held: a third job waits, and runs on the GPU of a job killed outright
    c = start(tmp_path, "c", 1, env)
    time.sleep(1.0)
    assert not (tmp_path / "c.seen").exists() and c.poll() is None
    os.kill(a.pid, signal.SIGKILL)  # the locks die with the process, with no cleanup code run
    a.wait(timeout=60)
    assert seen(tmp_path, "c") == "0"
    stop(tmp_path, "b", b)
    stop(tmp_path, "c", c)


def test_a_schedulers_or_users_choice_is_kept_and_locks_nothing(tmp_path):
    for name, extra in (("user", {"CUDA_VISIBLE_DEVICES": "5"}), ("slurm", {"SLURM_JOB_ID": "77"})):
        p = start(tmp_path, name, 2, env_for(tmp_path, 2, **extra))
        assert seen(tmp_path, name) == extra.get("CUDA_VISIBLE_DEVICES", "<unset>")
        # nothing held: a pinned job can take both GPUs while it runs
        q = start(tmp_path, f"{name}_pinned", 2, env_for(tmp_path, 2))
        assert seen(tmp_path, f"{name}_pinned") == "0,1"
        stop(tmp_path, f"{name}_pinned", q)
        stop(tmp_path, name, p)


def test_no_gpus_runs_the_command_as_it_is(tmp_path):
    p = start(tmp_path, "cpu", 0, env_for(tmp_path, 0))
    assert seen(tmp_path, "cpu") == "<unset>"
    stop(tmp_path, "cpu", p)


@pytest.mark.parametrize("n, count, msg", [(3, 2, "asks for 3 GPU\\(s\\) but this machine has 2"),
                                           (-1, 2, "GPU count -1 is negative")])
def test_impossible_requests_fail_at_once_with_the_reason(tmp_path, n, count, msg):
    r = subprocess.run([sys.executable, "-m", "effdetr.cli", "gpus", str(n), "--", "true"],
                       env=env_for(tmp_path, count), capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert re.search(msg, r.stderr), r.stderr


def test_a_missing_command_is_an_error(tmp_path):
    r = subprocess.run([sys.executable, "-m", "effdetr.cli", "gpus", "1", "--"],
                       env=env_for(tmp_path, 1), capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "no command given" in r.stderr
