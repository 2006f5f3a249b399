"""Golden single-process numbers: what `effdetr train` / `eval` gave before DDP existed.

`record` runs a few tiny trainings (DETR's criterion, the focal criterion of Deformable /
Sparse DETR, and an MTKD distillation, whose gradients the DDP code touches) plus one eval,
with the code under ``--src``, one thread each, and writes every logged float as hex and a
SHA-256 of each final model. tests/test_ddp.py reruns them with the current code and
compares bitwise, on a machine with a recording's fingerprint (torch version, CPU kernel
capability, CPU model): elsewhere other kernels give other roundings and the comparison is
skipped. Two AVX512 machines of different CPU models round differently, so the file keeps one
record per fingerprint (a record from before the CPU model was part of it, on a machine no
longer known, was dropped).

Recorded from 029e114 (the last change to src/ before DDP) with:
    python tests/golden_single_process.py --src <checkout of that commit>/src --out tests/data/golden_single_process.json
which adds (or replaces) this machine's record.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
TINY = HERE / "data" / "params_tiny.yaml"
# act_mtkd_L16 starts from and distils detr_dc5, so it runs after it
RUNS = ("detr_dc5", "sparse_detr_rho0p3", "act_mtkd_L16")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def fingerprint() -> dict:
    import torch
    return {"torch": torch.__version__, "machine": platform.machine(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu_model": cpu_model()}


def records(golden: dict) -> list[dict]:
    """The file's records (the first format held one, at the top level)."""
    return golden["records"] if "records" in golden else [golden]


def matching_record(golden: dict, fp: dict) -> dict | None:
    """The record of exactly this fingerprint, or None (the comparison is then skipped: a
    CPU of unknown rounding must not read as a regression)."""
    return next((r for r in records(golden) if r["fingerprint"] == fp), None)


def _params(path: Path) -> Path:
    raw = yaml.safe_load(TINY.read_text())
    s = raw["profiles"]["synth"]
    s["model"]["backbone"]["pretrained"] = "none"  # no pretrain stage needed
    s["train"].update(device="cpu", max_iters_per_epoch=3)
    s["eval"].update(flops_images=0, fps_iters=0)
    path.write_text(yaml.safe_dump(raw))
    return path


def _model_sha(path: Path) -> str:
    import torch
    sd = torch.load(path, map_location="cpu", weights_only=True)["model"]
    h = hashlib.sha256()
    for k in sorted(sd):
        h.update(k.encode())
        h.update(sd[k].contiguous().numpy().tobytes())
    return h.hexdigest()


def _floats(obj):
    """Every float of a metrics record as its exact hex form (ints and strings as they are)."""
    if isinstance(obj, float):
        return obj.hex()
    if isinstance(obj, dict):
        return {k: _floats(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_floats(v) for v in obj]
    return obj


def run_all(src: Path, work: Path, data: Path) -> dict:
    """The golden record of the code under ``src`` (trainings in ``work``, on the synth ``data``)."""
    work.mkdir(parents=True, exist_ok=True)
    params = _params(work / "params.yaml")
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "MLFLOW_TRACKING_URI": f"sqlite:///{work}/mlruns/mlflow.db"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(var, None)
    base = [sys.executable, "-m", "effdetr.cli"]
    out: dict = {"fingerprint": fingerprint(), "runs": {}}

    def call(*args):
        r = subprocess.run([*base, *args], cwd=work, env=env, capture_output=True, text=True, timeout=900)
        if r.returncode != 0:
            raise RuntimeError(f"effdetr {' '.join(args)} failed:\n{r.stderr[-3000:]}")

    for exp in RUNS:
        extra = ["--init", str(work / "detr_dc5/model.pt"), "--teacher", str(work / "detr_dc5/model.pt")] \
            if exp == "act_mtkd_L16" else []
        call("train", "--params", str(params), "--experiment", exp, "--data", str(data),
             "--out", str(work / exp / "model.pt"), "--metrics", str(work / exp / "train.json"),
             "--work-root", str(work / "state"), *extra)
        m = json.loads((work / exp / "train.json").read_text())
        # the history: in train.json before metrics files held numbers only, now beside it
        hist_file = work / exp / "train_history.json"
        raw_history = json.loads(hist_file.read_text()) if hist_file.exists() else m["history"]
        history = [{k: v for k, v in e.items() if not k.endswith("_seconds")} for e in raw_history]  # wall time
        out["runs"][exp] = {"history": _floats(history), "model_sha256": _model_sha(work / exp / "model.pt")}
    call("eval", "--params", str(params), "--experiment", "detr_dc5", "--data", str(data),
         "--checkpoint", str(work / "detr_dc5/model.pt"), "--out", str(work / "detr_dc5/eval.json"))
    ev = json.loads((work / "detr_dc5/eval.json").read_text())
    stats = ev.get("stats", ev)  # under "stats" before metrics files held numbers only
    out["eval_detr_dc5"] = _floats({k: v for k, v in stats.items() if k.startswith(("AP", "AR"))})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", required=True, help="the src/ folder of the code to record")
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    a = ap.parse_args()
    import tempfile
    work = Path(a.work or tempfile.mkdtemp(prefix="golden-"))
    sys.path.insert(0, a.src)
    from effdetr.config import experiment_config
    from effdetr.data.synthcoco import generate
    data = work / "synth"
    generate(experiment_config(TINY, "detr_dc5")[0].data.synth, data)
    record = run_all(Path(a.src).resolve(), work / "runs", data)
    out = Path(a.out)
    kept = [r for r in records(json.loads(out.read_text())) if r["fingerprint"] != record["fingerprint"]] \
        if out.exists() else []
    out.write_text(json.dumps({"records": kept + [record]}, indent=1, sort_keys=True) + "\n")
    print(f"wrote {a.out}: {', '.join(record['runs'])} + eval, fingerprint {record['fingerprint']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
