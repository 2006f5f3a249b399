"""A stand-in for the SLURM commands (and `torchrun`, `effdetr`) in tests/test_slurm_profile.py.

A shell wrapper under each command's name, in a folder put first on PATH, passes that name
first. Every call is appended as {"cmd", "argv"} to $FAKE_SLURM_DIR/calls.jsonl; then sbatch
runs its --wrap job at once (its state in $FAKE_SLURM_DIR/jobs/<id>, which sacct and squeue
report); srun and torchrun run the command they launch; effdetr writes the outputs its stage
declares (no training); sinfo names one default partition; the rest print nothing.
"""
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

STATE = Path(os.environ["FAKE_SLURM_DIR"])


def record(cmd: str, argv: list[str]) -> None:
    with open(STATE / "calls.jsonl", "a") as f:
        f.write(json.dumps({"cmd": cmd, "argv": argv}) + "\n")


def sbatch(argv: list[str]) -> int:
    wrap = next(a[len("--wrap="):] for a in argv if a.startswith("--wrap="))
    jobs = STATE / "jobs"
    jobs.mkdir(exist_ok=True)
    job_id = str(1000 + len(list(jobs.iterdir())))
    log = argv[argv.index("--output") + 1].replace("%j", job_id)
    gpus = next((a.split("=", 1)[1] for a in argv if a.startswith("--gpus=")), None)
    env = dict(os.environ, SLURM_JOB_ID=job_id, SLURM_JOBID=job_id)
    if gpus:
        env["SLURM_GPUS"] = gpus
    Path(log).parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        rc = subprocess.run(wrap, shell=True, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
    (jobs / job_id).write_text("COMPLETED" if rc == 0 else "FAILED")
    print(job_id)
    return 0


def job_states(sep: str) -> int:
    for job in sorted((STATE / "jobs").glob("*")):
        print(f"{job.name}{sep}{job.read_text()}")
    return 0


def launched(argv: list[str]) -> list[str]:
    """The command after a launcher's own options (all leading ``-x``/``--x=y`` ones)."""
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        i += 1
    return argv[i:]


def torchrun(argv: list[str]) -> int:
    # torchrun [--opts] -m effdetr.cli <args>: one stand-in process is enough here
    i = argv.index("-m")
    assert argv[i + 1] == "effdetr.cli", argv
    return subprocess.run(["effdetr", *argv[i + 2:]]).returncode


def effdetr(argv: list[str]) -> int:
    if argv[0] == "mlflow":
        return 0
    sys.path.insert(0, os.environ["EFFDETR_SRC"])
    if argv[0] == "gpus":  # the real pinning, which inside a SLURM job runs CMD as it is
        from effdetr.utils.gpu_slots import run_pinned
        assert argv[2] == "--", argv
        run_pinned(int(argv[1]), argv[3:])
    from effdetr import stages
    params = argv[argv.index("--params") + 1]
    for st in stages.build_stages(stages.load_raw(params), params):
        cmd = stages.stage_command(st.cmd)
        args = cmd[1:] if cmd[0] == "effdetr" else cmd[cmd.index("effdetr.cli") + 1:]
        if args == argv:
            for out in st.outs + st.metrics + st.plots:
                Path(out).parent.mkdir(parents=True, exist_ok=True)
                Path(out).write_text("{}")
            for out in st.out_dirs:
                Path(out).mkdir(parents=True, exist_ok=True)
            return 0
    print(f"fake effdetr: no stage runs {shlex.join(argv)}", file=sys.stderr)
    return 2


def main() -> int:
    cmd, argv = sys.argv[1], sys.argv[2:]
    record(cmd, argv)
    if cmd == "sbatch":
        return sbatch(argv)
    if cmd == "sacct" and "--name" in argv:
        return job_states("|")
    if cmd == "squeue":
        return job_states("|")
    if cmd == "sinfo":
        print("PARTITION\ngpu*")
        return 0
    if cmd == "srun":
        return subprocess.run(launched(argv)).returncode
    if cmd == "torchrun":
        return torchrun(argv)
    if cmd == "effdetr":
        return effdetr(argv)
    return 0  # scancel, scontrol, sacctmgr, sshare, other sacct queries


if __name__ == "__main__":
    sys.exit(main())
