"""Keep Snakemake's and DVC's records in step after a run by either engine (``effdetr dag sync``).

Each engine records what it last ran: DVC in ``dvc.lock`` (hashes), Snakemake in
``.snakemake/metadata`` (params, code and inputs per output). After ``snakemake all`` DVC sees
changed outputs; after ``dvc repro`` Snakemake sees params it did not run with. Whichever
engine says the DAG is up to date vouches for the outputs, and the other one records them
as they are: ``dvc commit`` after Snakemake, ``snakemake --touch`` after DVC. Nothing is
rerun, and nothing is recorded while both engines still see work to do.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path


def _tool(name: str) -> str:
    here = Path(sys.executable).parent / name  # the venv's, as the Makefile's PATH gives it
    return str(here) if here.exists() else (shutil.which(name) or name)


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}):\n{(r.stdout + r.stderr)[-2000:]}")
    return r


def _snakemake(params_file: str, *args: str) -> list[str]:
    cmd = [_tool("snakemake"), "--snakefile", "workflow/Snakefile", "--cores", "1", *args]
    return cmd + (["--config", f"params={params_file}"] if params_file != "params.yaml" else [])


def dvc_in_step() -> bool:
    return json.loads(_run([_tool("dvc"), "status", "--json"]).stdout or "{}") == {}


def snakemake_in_step(params_file: str) -> bool:
    r = _run(_snakemake(params_file, "-n", "all"))
    return "Nothing to be done" in r.stdout + r.stderr


def sync(params_file: str = "params.yaml") -> str:
    """Record the finished run of one engine in the other's records; returns what was done."""
    dvc_ok, smk_ok = dvc_in_step(), snakemake_in_step(params_file)
    if dvc_ok and smk_ok:
        return "both engines are up to date: nothing to record"
    if smk_ok:
        _run([_tool("dvc"), "commit", "--force", "--quiet"])
        return "Snakemake's run recorded in dvc.lock (dvc commit)"
    if dvc_ok:
        _run(_snakemake(params_file, "--touch", "all"))
        return "DVC's run recorded in Snakemake's metadata (snakemake --touch)"
    raise RuntimeError("both Snakemake and DVC see stages to run: finish the run first "
                       "(`snakemake --snakefile workflow/Snakefile --cores all all` or `dvc repro`), then sync")
