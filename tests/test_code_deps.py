"""Each stage depends on the source files its command runs, not on every folder: the declared
files (codedeps: static imports plus the modules a configuration switches on) cover what
building, training and evaluating each experiment's model really imports, and editing Lite
DETR's module reruns no DETR stage under Snakemake or DVC."""
import json
import shutil
import subprocess
import sys

import pytest

from effdetr import codedeps, stages
from tests.conftest import BIN, REPO

# Builds the experiment's model (random weights), runs what its stage runs on a random batch
# (train: forward in training mode, the loss, the distiller; eval: inference and
# postprocessing) and prints the effdetr modules that were imported.
WORKER = r"""
import dataclasses, json, sys
import torch
from effdetr.config import experiment_config
params, name, kind = sys.argv[1:4]
cfg, exp = experiment_config(params, name)
def random_weights(c):
    return dataclasses.replace(c, backbone=dataclasses.replace(c.backbone, pretrained="none"))
from effdetr.models import build_model
torch.manual_seed(0)
model = build_model(random_weights(cfg.model))
images, masks = torch.randn(2, 3, 64, 64), torch.zeros(2, 64, 64, dtype=torch.bool)
targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.3, 0.3]])} for _ in range(2)]
if kind == "train":
    import effdetr.engine.train  # noqa: F401
    from effdetr.models.criterion import build_criterion
    model.train()
    out = model(images, masks)
    criterion = build_criterion(cfg.model, cfg.loss)
    losses = criterion(out, targets)
    if exp.distill is not None:
        from effdetr.distill import build_distiller
        tcfg = experiment_config(params, exp.distill.teacher)[0]
        teacher = build_model(random_weights(tcfg.model)).eval()
        distiller = build_distiller(exp.distill, teacher, model)
        with torch.no_grad():
            t_out = teacher(images, masks)
        num_aux = cfg.model.dec_layers - 1 if cfg.model.aux_loss else 0
        distiller(out, t_out, targets=targets, student=model, teacher=teacher, criterion=criterion, num_aux=num_aux)
else:
    import effdetr.engine.checkpoint, effdetr.engine.evaluate  # noqa: F401
    from effdetr.models.postprocess import postprocess
    model.eval()
    with torch.no_grad():
        postprocess(model(images, masks), torch.tensor([[64, 64], [64, 64]]))
print(json.dumps(sorted(m for m in sys.modules if m == "effdetr" or m.startswith("effdetr."))))
"""


def _imported(stage: stages.Stage) -> set[str]:
    args = [str(REPO / "params.yaml"), stage.key, stage.kind]
    r = subprocess.run([sys.executable, "-c", WORKER, *args], capture_output=True, text=True, timeout=600,
                       env={"PYTHONPATH": str(REPO / "src"), "PATH": str(BIN), "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    files = {codedeps.module_file(m) for m in json.loads(r.stdout.splitlines()[-1])}
    return {str(f.relative_to(REPO)) for f in files if f is not None}


def _one_stage_per_code(kind: str) -> list[stages.Stage]:
    """One stage of ``kind`` per distinct set of declared source files (same files, same check)."""
    built = stages.build_stages(stages.load_raw(str(REPO / "params.yaml")))
    seen, out = set(), []
    for st in built:
        if st.kind == kind:
            code = tuple(sorted(d for d in st.deps if d.startswith("src/")))
            if code not in seen:
                seen.add(code)
                out.append(st)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["train", "eval"])
def test_declared_code_covers_what_each_experiment_imports(kind):
    checked = _one_stage_per_code(kind)
    assert len(checked) >= 5  # DETR, ACT, Deformable, Sparse, Lite, distilled students ...
    for st in checked:
        declared = set(stages.expand_deps([d for d in st.deps if d.startswith("src/")], REPO))
        missing = _imported(st) - declared
        assert not missing, f"{st.name} imports {sorted(missing)}, not among its deps"


def test_model_code_is_per_architecture_and_feature():
    built = {st.name: st for st in stages.build_stages(stages.load_raw(str(REPO / "params.yaml")))}
    src = "src/effdetr/"
    detr = set(built["train_detr_dc5"].deps)
    assert f"{src}models/detr.py" in detr
    for other in ("models/deformable.py", "models/lite_detr.py", "models/sparse_detr.py", "ops/act.py",
                  "ops/kda.py", "distill/__init__.py"):
        assert src + other not in detr, other
    assert f"{src}ops/act.py" in built["eval_act_L32"].deps
    assert f"{src}engine/evaluate.py" in detr  # synth trainings validate every few epochs (train.val_every)
    assert f"{src}distill/mtkd.py" in built["train_act_mtkd_L16"].deps
    lite = set(built["train_lite_h3l1_2x3"].deps)
    assert {f"{src}models/lite_detr.py", f"{src}ops/kda.py"} <= lite and f"{src}models/detr.py" not in lite
    assert f"{src}ops/kda.py" not in built["train_lite_h3l1_2x3_no_kda"].deps
    sparse = set(built["train_sparse_detr_rho0p1"].deps)
    assert f"{src}models/sparse_detr.py" in sparse and f"{src}models/lite_detr.py" not in sparse
    assert f"{src}models/sparse_detr.py" not in built["train_deformable_detr"].deps
    readers = {n for n, st in built.items() if f"{src}models/lite_detr.py" in stages.expand_deps(st.deps, REPO)}
    assert readers == {n for n in built if n.startswith(("train_lite", "eval_lite"))} | {"flops"}


@pytest.mark.slow
def test_editing_lite_detr_reruns_no_detr_stage_under_either_engine(workdir):
    """The tiny DAG up to date (stand-in outputs), with a copy of the sources: Lite DETR's
    module edited, Snakemake plans and DVC reports the paper-scale FLOPs (which count a
    Lite model) and what reads them, and nothing that trains or evaluates DETR."""
    from tests.conftest import TINY, planned_stages
    from tests.test_dag import _tiny_dag_up_to_date
    (workdir / "src").unlink()
    shutil.copytree(REPO / "src", workdir / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    _tiny_dag_up_to_date(workdir)
    assert TINY.exists()
    run = lambda *cmd: subprocess.run([str(c) for c in cmd], cwd=workdir, capture_output=True,  # noqa: E731
                                      text=True, timeout=600)
    for cmd in (("git", "init", "-q"), (BIN / "dvc", "init", "-q"), (BIN / "effdetr", "dag", "dvc", "--out", "dvc.yaml"),
                (BIN / "dvc", "commit", "-f", "-q")):
        r = run(*cmd)
        assert r.returncode == 0, r.stdout + r.stderr
    lite = workdir / "src/effdetr/models/lite_detr.py"
    lite.write_text(lite.read_text() + "\n# an edit\n")
    r = run(BIN / "snakemake", "--snakefile", "workflow/Snakefile", "--cores", "1", "-n", "all")
    assert r.returncode == 0, r.stderr
    planned = set(planned_stages(r.stdout)) - {"all"}
    assert planned == {"flops", "table_flops", "table_sparse_flops", "table_lite_flops", "report"}, planned
    r = run(BIN / "dvc", "status", "--json")
    assert r.returncode == 0, r.stderr
    assert set(json.loads(r.stdout)) == {"flops"}  # DVC names the stages whose own deps changed
