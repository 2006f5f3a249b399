"""workflow/profiles/slurm end to end against stand-in SLURM commands.

The real executor plugin submits each job with `sbatch`; the stand-ins (tests/data/fake_slurm.py)
record every call and run the job at once, through the plugin's own jobstep (`srun ...`) down to
the rule's command, where `torchrun` and `effdetr` are stand-ins that write the declared outputs.
So this checks what a cluster would be asked for and what each allocation would launch, with
no training.
"""
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys

import pytest
import yaml

from effdetr import stages
from tests.conftest import BIN, REPO, TINY

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("snakemake_executor_plugin_slurm") is None,
                       reason="snakemake-executor-plugin-slurm is not installed (pip install -e '.[slurm]')"),
]

FAKES = ("sbatch", "squeue", "sacct", "scancel", "srun", "sinfo", "scontrol", "sacctmgr", "sshare", "torchrun",
         "effdetr")


def tiny_ddp_params(path):
    """The tiny params cut to one backbone, a one-process and a two-GPU training of the same
    model (the second also evaluated on two GPUs), with per-kind and per-experiment resources."""
    raw = yaml.safe_load(TINY.read_text())
    base = raw["experiments"]["detr_dc5"]
    raw["experiments"] = {
        "detr_dc5": base,
        "detr_dc5_ddp": dict(base, overrides={"train": {"gpus": 2, "device": "auto"}}),
    }
    for key in ("speed", "seed_spread"):
        raw.pop(key, None)
    raw["flops"].update(models={}, model_input_sizes={})  # no flops stage
    raw["resources"] = {"synth": {
        "default": {"mem_mb": 1500, "runtime": 30, "cpus_per_task": 1},
        "train": {"mem_mb": 3000, "runtime": 90, "cpus_per_task": 2},
        "experiments": {"detr_dc5_ddp": {"train": {"runtime": 120, "cpus_per_task": 4},
                                         "eval": {"gpu": 2, "mem_mb": 2500}}},
    }}
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return raw


def install_fakes(bindir, state):
    bindir.mkdir()
    state.mkdir()
    fake = REPO / "tests" / "data" / "fake_slurm.py"
    for name in FAKES:
        script = bindir / name
        script.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} {shlex.quote(str(fake))} {name} \"$@\"\n")
        script.chmod(0o755)


def sbatch_flags(argv: list[str]) -> dict[str, str]:
    """--gpus/--mem/--time/--cpus-per-task of one sbatch call (as the plugin spells them)."""
    line = " ".join(a for a in argv if not a.startswith("--wrap="))
    flags = {}
    for key, pattern in (("gpus", r"--gpus=(\d+)"), ("mem", r"--mem (\d+)"), ("time", r"-t (\d+)"),
                         ("cpus", r"--cpus-per-task=(\d+)")):
        m = re.search(pattern, line)
        flags[key] = m.group(1) if m else None
    # one node, one task: a torchrun job started as one task per GPU would launch N torchruns
    assert re.search(r"--nodes=1\b", line), line
    assert "--ntasks-per-gpu" not in line and re.findall(r"--ntasks=(\d+)", line) in ([], ["1"]), line
    return flags


def test_slurm_profile_submits_every_rule_with_its_resources_and_launches_torchrun(workdir):
    tiny_ddp_params(workdir / "params.yaml")
    built = {st.name: st for st in stages.build_stages(stages.load_raw("params.yaml"))}
    from effdetr.config import profile_config
    from effdetr.data.synthcoco import generate
    data = profile_config("params.yaml").data
    generate(data.synth, data.root)  # real data: the data rule is then up to date, not submitted
    state, bindir = workdir / "fake_slurm", workdir / "fake_bin"
    install_fakes(bindir, state)
    env = dict(os.environ, PATH=f"{bindir}:{BIN}:{os.environ['PATH']}", FAKE_SLURM_DIR=str(state),
               EFFDETR_SRC=str(REPO / "src"),
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO / "src"), os.environ.get("PYTHONPATH")) if p))
    r = subprocess.run([str(BIN / "snakemake"), "--snakefile", "workflow/Snakefile", "--profile",
                        "workflow/profiles/slurm", "--slurm-init-seconds-before-status-checks", "1",
                        "--seconds-between-status-checks", "1", "--slurm-no-account", "all"],
                       cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]

    calls = [json.loads(line) for line in (state / "calls.jsonl").read_text().splitlines()]
    submitted = {}
    for c in (c for c in calls if c["cmd"] == "sbatch"):
        # the plugin's comment: rule_<rule>[_wildcards_<value>]; the stage is <rule>_<value>
        comment = re.search(r"--comment '?rule_(\S+?)'?(\s|$)", " ".join(c["argv"])).group(1)
        rule, _, value = comment.partition("_wildcards_")
        submitted[f"{rule}_{value}" if value else rule] = sbatch_flags(c["argv"])
    heavy = {name for name, st in built.items() if st.heavy}
    assert heavy <= set(submitted), f"not submitted: {heavy - set(submitted)}"
    assert {"train_detr_dc5_ddp", "eval_detr_dc5_ddp", "pretrain"} <= heavy
    for name in submitted:
        res = built[name].resources
        want = {"gpus": str(res["gpu"]) if res["gpu"] else None, "mem": str(res["mem_mb"]),
                "time": str(res["runtime"]), "cpus": str(res["cpus_per_task"])}
        assert submitted[name] == want, name
    # the params reached the table: per-kind, then per-experiment, then train.gpus
    assert built["train_detr_dc5_ddp"].resources == {"gpu": 2, "mem_mb": 3000, "runtime": 120, "cpus_per_task": 4}
    assert built["train_detr_dc5"].resources == {"gpu": 0, "mem_mb": 3000, "runtime": 90, "cpus_per_task": 2}
    assert built["eval_detr_dc5_ddp"].resources["gpu"] == 2 and built["report"].resources["runtime"] == 30

    # inside each allocation: srun (the plugin's jobstep) asks for the job's GPUs, and the
    # command it runs is torchrun with one process per GPU exactly where gpu > 1
    runs = [c["argv"] for c in calls if c["cmd"] == "torchrun"]
    assert sorted((a[:2], a[a.index("effdetr.cli") + 1], a[a.index("--experiment") + 1]) for a in runs) == [
        (["--standalone", "--nproc_per_node=2"], "eval", "detr_dc5_ddp"),
        (["--standalone", "--nproc_per_node=2"], "train", "detr_dc5_ddp")], runs
    # every GPU stage's command goes through the GPU pinning, which inside SLURM changes nothing
    pinned = sorted((c["argv"][1], c["argv"][c["argv"].index("--experiment") + 1])
                    for c in calls if c["cmd"] == "effdetr" and c["argv"][0] == "gpus")
    assert pinned == [(str(st.resources["gpu"]), st.cmd[st.cmd.index("--experiment") + 1])
                      for st in sorted(built.values(), key=lambda s: s.cmd[s.cmd.index("--experiment") + 1]
                                       if "--experiment" in s.cmd else "")
                      if st.resources["gpu"] and st.name in submitted], pinned
    direct = [c["argv"] for c in calls if c["cmd"] == "effdetr" and c["argv"][0] not in ("mlflow", "gpus")]
    single = sorted(a[a.index("--experiment") + 1] for a in direct if "--experiment" in a)
    # train + eval of each, once: detr_dc5 directly, detr_dc5_ddp only through torchrun
    assert single == ["detr_dc5", "detr_dc5", "detr_dc5_ddp", "detr_dc5_ddp"]
    srun_gpus = {re.search(r"--gpus=(\d+)", " ".join(c["argv"])) is not None for c in calls if c["cmd"] == "srun"}
    assert srun_gpus == {True, False}  # the jobstep hands the GPUs on to the GPU jobs only
    for name, st in built.items():
        if name in submitted:
            for out in st.all_outputs():
                assert (workdir / out).exists(), out
