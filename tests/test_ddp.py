"""torchrun DDP training and distributed eval on the CPU (gloo, 2 processes).

The equivalence config makes a 2 x b run comparable with a 1 x 2b run: every image at one
size (synth images are all 64 px; train_scales [64], no crop) so no batch pads differently
when split; frozen BatchNorm (batch statistics would be per rank); dropout 0 (each rank draws
its own masks); eos_coef 1 (DETR's class loss is a *weighted mean* over the queries of the
batch: its weight sum differs between the two halves unless every weight is 1, and DDP
averages the halves' means). The box losses need nothing: num_boxes is all-reduced. What
remains is float summation order (the all-reduce adds the two halves' gradients, one process
sums over all 2b images inside each op): gradients agree to ~5e-7 of each tensor's largest
element, so the first step's loss agrees to ~1e-7. AdamW then amplifies that noise: its step
g / (sqrt(v) + 1e-8) is close to lr * sign(g), so an element whose exact gradient is ~0 (an
attention key bias, whose exact gradient is 0; near-dead units of the tiny model) moves by
+-lr on either side depending on rounding. Hence the later losses (measured 4e-4 relative)
and the final weights (measured 6e-4, relative L2 over all tensors) agree within a tolerance,
not bitwise; element-wise weight equality is not a meaningful target under Adam.
"""
import json
import os
import re
import signal
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import BIN, TINY

HANG_S = 300  # a run that prints nothing for this long has hung (not a speed check)
EXP = "detr_dc5"


def require(ok, msg: str) -> None:
    if not ok:
        pytest.fail(msg)


def write_params(path: Path, batch: int, **train) -> Path:
    params = yaml.safe_load(TINY.read_text())
    s = params["profiles"]["synth"]
    s["model"]["backbone"].update(pretrained="none", freeze_bn=True)
    s["model"]["dropout"] = 0.0
    s["input"].update(train_scales=[64], crop_prob=0.0)
    s["loss"]["eos_coef"] = 1.0
    # max_iters_per_epoch 1: each epoch's train_loss in the history is one step's loss
    s["train"].update({"device": "cpu", "batch_size": batch, "epochs": 3, "max_iters_per_epoch": 1, "warmup_iters": 0,
                       "lr_drop": 10, **train})
    s["eval"].update(flops_images=0, fps_iters=0, batch_size=4)
    path.write_text(yaml.safe_dump(params))
    return path


def env_for(root: Path) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TINY.parents[2] / "src"),
            "MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlruns/mlflow.db"}


def effdetr(nproc: int, *args) -> list[str]:
    head = [str(BIN / "effdetr")] if nproc == 1 else \
        [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={nproc}", "-m", "effdetr.cli"]
    return head + list(args)


def train_args(params, out, data, work="work") -> list[str]:
    return ["train", "--params", str(params), "--experiment", EXP, "--data", str(data), "--out", f"{out}/model.pt",
            "--metrics", f"{out}/train.json", "--work-root", str(work)]


def run(cmd, root) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, cwd=root, env=env_for(root), capture_output=True, text=True, timeout=HANG_S)
    return r


def losses(root: Path, out: str) -> list[float]:
    return [e["train_loss"] for e in json.loads((root / out / "train_history.json").read_text())]


def weights(root: Path, out: str) -> dict:
    return torch.load(root / out / "model.pt", weights_only=True)["model"]


# --- unit: the shard stream, and the single-process path --------------------------------
def test_rank_shards_are_the_one_process_global_batches():
    """Rank r's batch at step s is the r-th share of the 1-process (batch W x b) batch at s,
    for a full and a short trailing batch; a trailing batch with fewer items than ranks is
    dropped on every rank alike (an empty rank would hang the all-reduce)."""
    from effdetr.utils.dist import ShardedBatches, steps_per_epoch
    for n, b, w in [(48, 4, 2), (13, 3, 2), (10, 4, 3), (9, 4, 2), (5, 2, 4)]:
        items = [(i, 1000 + i) for i in range(n)]
        ranks = [list(ShardedBatches(items, b, r, w)) for r in range(w)]
        one = list(ShardedBatches(items, b * w))
        steps = steps_per_epoch(n, b, w)
        assert all(len(rb) == steps for rb in ranks), (n, b, w)
        assert all(len(x) > 0 for rb in ranks for x in rb)
        assert [sum((rb[s] for rb in ranks), []) for s in range(steps)] == one[:steps]
        assert all(len(x) <= b for rb in ranks for x in rb)
    assert list(ShardedBatches(list(range(10)), 4)) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_every_model_family_uses_every_parameter(tiny_params):
    """DDP runs without find_unused_parameters (the cheap default) unless a model sets
    ``ddp_find_unused_parameters``; none needs it: each tiny family's loss reaches every
    trainable parameter (a family that left one unused would hang DDP's second step)."""
    import dataclasses

    from effdetr import config as C
    from effdetr.models import build_model
    from effdetr.models.criterion import build_criterion
    base = C.experiment_config(tiny_params, "deformable_detr_topk")[0]
    cfgs = {n: C.experiment_config(tiny_params, n)[0].model for n in ("detr_dc5", "deformable_detr_topk",
                                                                      "sparse_detr_rho0p3", "act_L16")}
    cfgs.update({n: dataclasses.replace(m, num_classes=base.model.num_classes)
                 for n, m in C.flops_model_configs(tiny_params).items()})  # Lite DETR among them
    tg = [{"labels": torch.tensor([1, 2]), "boxes": torch.tensor([[.5, .5, .2, .2], [.3, .3, .1, .2]])}] * 2
    for name, mcfg in cfgs.items():
        mcfg = dataclasses.replace(mcfg, backbone=dataclasses.replace(mcfg.backbone, pretrained="none"))
        torch.manual_seed(0)
        model = build_model(mcfg).train()
        crit = build_criterion(mcfg, base.loss)
        out = model(torch.randn(2, 3, 64, 64), torch.zeros(2, 64, 64, dtype=torch.bool))
        crit.total(crit(out, tg), mcfg.dec_layers - 1 if mcfg.aux_loss else 0).backward()
        unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert unused == [] or getattr(model, "ddp_find_unused_parameters", False), (name, unused)


def test_single_process_takes_no_distributed_branch(tmp_path, tiny_data, monkeypatch):
    """Without torchrun's environment no collective and no DDP wrapper is ever touched (the
    path whose numbers tests/test_resume.py pins bitwise)."""
    import torch.distributed as tdist

    from effdetr.config import experiment_config
    from effdetr.engine.train import train

    def boom(*a, **k):
        raise AssertionError("a distributed call in a single-process run")
    for name in ("all_reduce", "all_gather_object", "gather_object", "barrier", "init_process_group"):
        monkeypatch.setattr(tdist, name, boom)
    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", boom)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    params = write_params(tmp_path / "p.yaml", 4, epochs=1)
    cfg = experiment_config(params, EXP)[0]
    result = train(cfg, str(tiny_data), str(tmp_path / "m.pt"), str(tmp_path / "w"), "h")
    assert len(result["history"]) == 1 and (tmp_path / "w/last.pt").exists()


@pytest.mark.slow
def test_single_process_numbers_are_bitwise_the_pre_ddp_ones(tmp_path, tiny_data):
    """Three tiny trainings (DETR and focal criteria, an MTKD distillation) and an eval, run
    now and by the commit before DDP (tests/data/golden_single_process.json): every logged
    float and every final weight identical, where the recording's kernels are this machine's."""
    from tests.golden_single_process import fingerprint, matching_record, records, run_all
    recorded = json.loads((Path(__file__).parent / "data/golden_single_process.json").read_text())
    golden = matching_record(recorded, fingerprint())
    if golden is None:
        pytest.skip(f"golden numbers recorded on {[r['fingerprint'] for r in records(recorded)]}, this machine is "
                    f"{fingerprint()}: other kernels round differently (rerecord: see tests/golden_single_process.py)")
    now = run_all(Path(__file__).resolve().parents[1] / "src", tmp_path / "runs", tiny_data)
    for exp, want in golden["runs"].items():
        assert now["runs"][exp]["history"] == want["history"], exp
        assert now["runs"][exp]["model_sha256"] == want["model_sha256"], exp
    assert now["eval_detr_dc5"] == golden["eval_detr_dc5"]


# --- 2 processes -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory, tiny_data):
    """A 2-process (batch 4 each) and a 1-process (batch 8) training of the same 8-image global
    batches, in one scratch folder (its own MLflow store)."""
    root = tmp_path_factory.mktemp("ddp")
    p2, p1 = write_params(root / "p2.yaml", 4), write_params(root / "p1.yaml", 8)
    r = run(effdetr(2, *train_args(p2, "ddp", tiny_data)), root)
    require(r.returncode == 0, r.stdout + r.stderr)
    sidecars = [json.loads(p.read_text()) for p in (root / "mlruns/sidecars").glob("*.json")]
    with sqlite3.connect(root / "mlruns/mlflow.db") as con:
        runs = [r[0] for r in con.execute("SELECT name FROM runs")]
    r1 = run(effdetr(1, *train_args(p1, "one", tiny_data)), root)
    require(r1.returncode == 0, r1.stdout + r1.stderr)
    return root, p2, {"sidecars": sidecars, "runs": runs}


@pytest.mark.slow
def test_ddp_matches_one_process_at_the_same_global_batch(ddp_runs):
    """The first step's loss within 1e-6, the later ones within 2e-3, the final weights within
    5e-3 (relative L2); see the module docstring for why not bitwise. A rank on the wrong
    shard, or each rank normalising by its own box count (no all-reduce), moves the first
    step's loss by far more than 1e-6."""
    root, _, _ = ddp_runs
    a, b = losses(root, "ddp"), losses(root, "one")
    assert len(a) == len(b) == 3
    assert a[0] == pytest.approx(b[0], rel=1e-6)
    assert a[1:] == pytest.approx(b[1:], rel=2e-3)
    assert a[0] - a[-1] > 100 * abs(a[-1] - b[-1])  # it trained, by far more than the runs differ
    wa, wb = weights(root, "ddp"), weights(root, "one")
    assert wa.keys() == wb.keys()
    floats = [k for k in wa if wa[k].is_floating_point()]
    dist = sum(((wa[k] - wb[k]) ** 2).sum() for k in floats) ** 0.5
    norm = sum((wb[k] ** 2).sum() for k in floats) ** 0.5
    assert dist / norm < 5e-3, float(dist / norm)


@pytest.mark.slow
def test_ddp_training_leaves_one_mlflow_run_and_one_sidecar(ddp_runs):
    """Read right after the DDP run, in its own fresh store: one of each, rank 0's (pid)."""
    root, _, tracked = ddp_runs
    sidecars = tracked["sidecars"]
    assert [(s["run_name"], s["status"]) for s in sidecars] == [(f"train-{EXP}", "FINISHED")]
    assert sidecars[0]["params"]["experiment.train.batch_size"] == "4"
    assert tracked["runs"] == [f"train-{EXP}"]
    assert json.loads((root / "ddp/train.provenance.json").read_text())["world_size"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("edit, msg", [
    (lambda s: s["model"]["backbone"].update(freeze_bn=False), r"model\.backbone\.freeze_bn is false, but 2 processes"),
    (lambda s: s["train"].update(lr_scaling={"rule": "sqrt", "base_batch": 2}),
     r"train\.lr_scaling\.rule is 'sqrt', resolved for train\.gpus 0 \(one process\), but 2 processes"),
])
def test_multi_process_setups_a_global_batch_cannot_honour_are_refused(tmp_path, tiny_data, edit, msg):
    """Trainable BN (per-rank statistics) and an LR rule resolved for one CPU process: both
    fail on every rank before any data or model is built, and write nothing."""
    p = write_params(tmp_path / "p.yaml", 2)
    raw = yaml.safe_load(p.read_text())
    edit(raw["profiles"]["synth"])
    p.write_text(yaml.safe_dump(raw))
    r = run(effdetr(2, *train_args(p, "out", tiny_data)), tmp_path)
    assert r.returncode != 0 and re.search(msg, r.stderr), r.stderr[-3000:]
    assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()


@pytest.mark.slow
def test_resuming_at_another_world_size_is_an_error(ddp_runs, tiny_data):
    """The 2-process run's state, picked up by a 1-process rerun: an error naming the file."""
    root, p2, _ = ddp_runs
    r = run(effdetr(1, *train_args(p2, "again", tiny_data)), root)
    assert r.returncode == 2
    assert re.search(r"last\.pt: written by a run of 2 process\(es\), this one has 1", r.stderr), r.stderr
    assert not (root / "again/model.pt").exists()


@pytest.mark.slow
def test_distributed_eval_gives_the_single_process_stats(ddp_runs, tiny_data):
    """2 ranks each predict half the val split; rank 0's one COCOeval equals 1 process's."""
    root, p2, _ = ddp_runs
    stats = {}
    for n in (1, 2):
        r = run(effdetr(n, "eval", "--params", str(p2), "--experiment", EXP, "--data", str(tiny_data),
                        "--checkpoint", "ddp/model.pt", "--out", f"eval{n}.json"), root)
        require(r.returncode == 0, r.stdout + r.stderr)
        stats[n] = json.loads((root / f"eval{n}.json").read_text())
    timing = {"sec_per_image"}
    assert {k: v for k, v in stats[2].items() if k not in timing} == \
        {k: v for k, v in stats[1].items() if k not in timing}
    assert stats[2]["num_images"] == 16


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (from /proc): torchrun starts each worker in a session
    of its own, so killing torchrun's process group alone would leave the ranks running."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def kill_job(proc: subprocess.Popen) -> list[int]:
    """SIGKILL torchrun and all its workers at once, as a scheduler killing the job does."""
    pids = [proc.pid, *descendants(proc.pid)]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return pids


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
def test_ddp_kill_and_resume_matches_uninterrupted(tmp_path, tiny_data):
    """kill -9 of torchrun and its ranks mid-epoch 1, rerun: it resumes and ends bitwise
    equal to an uninterrupted 2-process run. Dropout 0.1 makes the end depend on every rank's
    restored RNG state (rank 1's is only in the state's ``rng_ranks``: restoring rank 0's on
    both ranks fails this test)."""
    params = write_params(tmp_path / "p.yaml", 2, epochs=2, checkpoint_every_iters=1)
    raw = yaml.safe_load(params.read_text())
    raw["profiles"]["synth"]["model"]["dropout"] = 0.1
    # one loader worker: it reseeds per sample in its own process, so each rank's main RNG is
    # drawn by dropout alone (with 0 workers the per-sample reseeding would hide the RNG state)
    raw["profiles"]["synth"]["train"].update(max_iters_per_epoch=4, num_workers=1)
    params.write_text(yaml.safe_dump(raw))
    ref = run(effdetr(2, *train_args(params, "ref", tiny_data, "work_ref")), tmp_path)
    require(ref.returncode == 0, ref.stdout + ref.stderr)

    proc = subprocess.Popen(effdetr(2, *train_args(params, "res", tiny_data, "work_res")), cwd=tmp_path,
                            env=env_for(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    hung = threading.Event()
    watchdog = threading.Timer(HANG_S, lambda: (hung.set(), kill_job(proc)))
    watchdog.start()
    killed, seen = [], []
    try:
        for line in proc.stdout:
            seen.append(line)
            if line.startswith("epoch 1 iter 2/"):
                killed = kill_job(proc)
                break
        proc.wait(timeout=HANG_S)
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            kill_job(proc)
    require(not hung.is_set() and killed, "".join(seen))
    require(len(killed) >= 3, f"torchrun and 2 ranks expected, found pids {killed}")
    deadline = time.time() + 30
    while any(alive(p) for p in killed) and time.time() < deadline:
        time.sleep(0.2)
    require(not any(alive(p) for p in killed), "ranks survived the kill")
    require(not (tmp_path / "res/model.pt").exists(), "the killed run wrote its model")
    r = run(effdetr(2, *train_args(params, "res", tiny_data, "work_res")), tmp_path)
    require(r.returncode == 0, r.stdout + r.stderr)
    require(re.search(r"resuming from \S+: epoch 1 iter [123]\n", r.stdout), r.stdout)
    strip = lambda h: [{k: v for k, v in e.items() if k != "epoch_seconds"} for e in h]  # noqa: E731
    hist = lambda out: strip(json.loads((tmp_path / out / "train_history.json").read_text()))  # noqa: E731
    assert hist("res") == hist("ref")
    a, b = weights(tmp_path, "ref"), weights(tmp_path, "res")
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


@pytest.mark.parametrize("n,batch,world", [(10, 3, 2), (7, 4, 3), (16, 4, 2), (5, 1, 2), (3, 4, 2)])
def test_eval_shards_keep_the_one_process_batches(n, batch, world):
    """Each image is padded to its batch's largest one, which changes its predictions: the
    ranks' batches together must be exactly the 1-process batches (a per-image split of 10
    images at batch 3 over 2 ranks would batch [3, 4] together, which one process never does)."""
    from effdetr.utils.dist import eval_shard
    one = [list(range(i, min(i + batch, n))) for i in range(0, n, batch)]
    shards = [eval_shard(n, batch, r, world) for r in range(world)]
    together = [s[i:i + batch] for s in shards for i in range(0, len(s), batch)]
    assert together == one and sorted(i for s in shards for i in s) == list(range(n))


def _average_gradients_worker(rank: int, store_file: str, out: str) -> None:
    import torch.distributed as tdist

    from effdetr.utils import dist
    tdist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=2)
    try:
        used_by_0, unused, used_by_both = (torch.nn.Parameter(torch.zeros(3)) for _ in range(3))
        if rank == 0:
            used_by_0.grad = torch.tensor([2.0, 4.0, 6.0])
        used_by_both.grad = torch.full((3,), float(rank + 1))
        dist.average_gradients([used_by_0, unused, used_by_both])
        torch.save({"used_by_0": used_by_0.grad, "unused": unused.grad, "used_by_both": used_by_both.grad},
                   f"{out}.{rank}")
    finally:
        tdist.destroy_process_group()


def test_adapter_gradients_unused_on_a_rank_average_as_zeros_there(tmp_path):
    """Distillation adapters sit outside DDP: a parameter only rank 0's share used is averaged
    with rank 1's zero (what one process over both shares would sum); one no rank used keeps
    no gradient, so AdamW skips it as it would in one process."""
    import torch.multiprocessing as mp
    mp.spawn(_average_gradients_worker, args=(str(tmp_path / "store"), str(tmp_path / "g")), nprocs=2)
    for rank in (0, 1):
        g = torch.load(tmp_path / f"g.{rank}")
        assert torch.equal(g["used_by_0"], torch.tensor([1.0, 2.0, 3.0]))
        assert g["unused"] is None
        assert torch.equal(g["used_by_both"], torch.full((3,), 1.5))


def test_step_bench_ddp_wrapper_changes_no_number(tmp_path):
    """`effdetr bench ddp --mode step` on the CPU: the wrapped and the plain step start from
    the same weights and batch, so their first-step loss and gradient norm are identical
    (a world-1 all-reduce is the identity), in fp32 and bf16; the figures are printed."""
    out = tmp_path / "step.json"
    r = subprocess.run([str(BIN / "effdetr"), "bench", "ddp", "--mode", "step", "--params", str(TINY),
                        "--experiment", EXP, "--device", "cpu", "--warmup", "0", "--repeats", "1",
                        "--out", str(out)], cwd=tmp_path, env=env_for(tmp_path), capture_output=True, text=True,
                       timeout=HANG_S)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert set(res["results"]) == {"plain_fp32", "ddp_fp32", "plain_bf16", "ddp_bf16"}
    for pr in ("fp32", "bf16"):
        assert res["results"][f"ddp_{pr}"]["first_step"] == res["results"][f"plain_{pr}"]["first_step"], pr
    assert res["results"]["plain_fp32"]["first_step"] != res["results"]["plain_bf16"]["first_step"]
    assert "DDP / plain (fp32)" in r.stdout


@pytest.mark.slow
def test_procs_bench_runs_both_launches(tmp_path, tiny_data):
    """`effdetr bench ddp` (procs): a 2-process and a 1-process training of the same global
    batches, in a scratch folder; prints each one's img/s and the ratio."""
    p = write_params(tmp_path / "p.yaml", 4)
    out = tmp_path / "procs.json"
    r = subprocess.run([str(BIN / "effdetr"), "bench", "ddp", "--params", str(p), "--experiment", EXP,
                        "--data", str(tiny_data), "--repeats", "2", "--out", str(out)],
                       cwd=tmp_path, env=env_for(tmp_path), capture_output=True, text=True, timeout=HANG_S)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert {k: (v["processes"], v["batch_per_process"], v["global_batch"]) for k, v in res["results"].items()} == {
        "ddp": (2, 4, 8), "single": (1, 8, 8)}
    assert all(v["images_per_s"] > 0 for v in res["results"].values()) and "processes vs 1" in r.stdout
    assert not list(tmp_path.glob("mlruns")) and not (tmp_path / "work").exists()  # touched no real run
