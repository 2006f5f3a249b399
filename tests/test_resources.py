"""GPU counts, the LR rule and per-stage resources: validated at load, resolved once."""
import math

import pytest
import yaml

from effdetr import config as C
from effdetr import stages
from tests.conftest import REPO, TINY


def write(tmp_path, edit, base=TINY) -> str:
    raw = yaml.safe_load(base.read_text())
    edit(raw)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return str(path)


def train_of(raw, **kw):
    raw["profiles"]["synth"]["train"].update(kw)


def test_gpus_need_a_gpu_device(tmp_path):
    path = write(tmp_path, lambda r: train_of(r, gpus=2, device="cpu"))
    with pytest.raises(C.ConfigError, match=r"profiles\.synth\.train\.gpus.*device: cpu"):
        C.load_params(path)
    C.load_params(write(tmp_path, lambda r: train_of(r, gpus=2, device="auto")))
    with pytest.raises(C.ConfigError, match="below the minimum"):
        C.load_params(write(tmp_path, lambda r: train_of(r, gpus=-1)))


def test_sqrt_rule_scales_both_lrs_at_resolve_time_and_enters_the_hash(tmp_path):
    raw = yaml.safe_load(TINY.read_text())
    lr, lr_bb, batch = (raw["profiles"]["synth"]["train"][k] for k in ("lr", "lr_backbone", "batch_size"))
    plain = write(tmp_path, lambda r: train_of(r, gpus=4, device="auto"))
    cfg0, _ = C.experiment_config(plain, "detr_dc5")
    assert (cfg0.train.lr, cfg0.train.lr_backbone) == (lr, lr_bb)  # rule none: as written, bit for bit
    hash0 = C.params_hash(cfg0)
    scaled = write(tmp_path, lambda r: train_of(r, gpus=4, device="auto",
                                                lr_scaling={"rule": "sqrt", "base_batch": 16}))
    cfg, _ = C.experiment_config(scaled, "detr_dc5")
    factor = math.sqrt(batch * 4 / 16)
    assert C.global_batch(cfg.train) == batch * 4 and factor != 1
    assert cfg.train.lr == pytest.approx(lr * factor) and cfg.train.lr_backbone == pytest.approx(lr_bb * factor)
    assert C.canonical_json(cfg).count('"rule":"sqrt"') == 1 and C.params_hash(cfg) != hash0
    with pytest.raises(C.ConfigError, match="above the maximum 1.0"):
        C.load_params(write(tmp_path, lambda r: train_of(r, lr=0.9, gpus=4, device="auto",
                                                         lr_scaling={"rule": "sqrt", "base_batch": 1})))


def test_coco_batches_and_lr_rules_are_the_papers(tmp_path):
    p = write(tmp_path, lambda r: r.update(profile="coco"), base=REPO / "params.yaml")
    want = {"detr_dc5": (64, "none"), "deformable_detr": (32, "none"), "sparse_detr_rho0p1": (16, "sqrt"),
            "deformable_detr_topk": (16, "sqrt"), "lite_h3l1_2x3": (32, "none")}
    for name, (batch, rule) in want.items():
        t = C.experiment_config(p, name)[0].train
        assert (C.global_batch(t), t.lr_scaling.rule) == (batch, rule), name
        assert C.lr_factor(t) == 1.0, name  # each paper's LR at its own batch
    by_name = {st.name: st for st in stages.build_stages(stages.load_raw(p), p)}
    t = by_name["train_sparse_detr_rho0p1"]
    assert t.cmd[:10] == ["effdetr", "gpus", "8", "--",
                          "torchrun", "--standalone", "--nproc_per_node=8", "-m", "effdetr.cli", "train"]
    ev = by_name["eval_sparse_detr_rho0p1"]
    assert t.resources["gpu"] == 8 and ev.resources["gpu"] == 1
    assert ev.cmd[:5] == ["effdetr", "gpus", "1", "--", "effdetr"] and stages.stage_command(ev.cmd)[1] == "eval"


def test_synth_stays_one_cpu_process():
    built = stages.build_stages(stages.load_raw(str(REPO / "params.yaml")))
    assert all(st.cmd[0] == "effdetr" and st.resources["gpu"] == 0 for st in built)


def test_resources_merge_kind_then_experiment_and_rerun_nothing(tmp_path):
    def edit(r):
        r["resources"] = {"synth": {"default": {"runtime": 10}, "eval": {"gpu": 1, "mem_mb": 999},
                                    "experiments": {"act": {"eval": {"runtime": 77}},
                                                    "act_L16": {"eval": {"gpu": 3}}}}}
    path = write(tmp_path, edit)
    by_name = {st.name: st for st in stages.build_stages(stages.load_raw(path), path)}
    assert by_name["eval_act_L32"].resources == {"gpu": 1, "mem_mb": 999, "runtime": 77, "cpus_per_task": 2}
    assert by_name["eval_act_L16"].resources["gpu"] == 3 and stages.stage_command(by_name["eval_act_L16"].cmd)[:3] == [
        "torchrun", "--standalone", "--nproc_per_node=3"]
    assert by_name["train_detr_dc5"].resources == {"gpu": 0, "mem_mb": 4000, "runtime": 10, "cpus_per_task": 2}
    plain = {st.name: st for st in stages.build_stages(stages.load_raw(str(TINY)), str(TINY))}
    raw, raw_plain = stages.load_raw(path), stages.load_raw(str(TINY))
    for name, st in by_name.items():  # scheduling only: no stage's params change, no rerun
        assert st.params_json(raw) == plain[name].params_json(raw_plain), name
    assert C.params_hash(C.experiment_config(path, "detr_dc5")[0]) == C.params_hash(
        C.experiment_config(str(TINY), "detr_dc5")[0])


@pytest.mark.parametrize("table, key", [
    ({"synth": {"gpus": {"gpu": 1}}}, r"resources\.synth\.gpus: unknown stage kind"),
    ({"synth": {"eval": {"gpus": 1}}}, r"resources\.synth\.eval\.gpus: unknown key"),
    ({"synth": {"train": {"gpu": 2}}}, r"resources\.synth\.train\.gpu: .*train\.gpus"),
    ({"synth": {"pretrain": {"gpu": 2}}}, r"resources\.synth\.pretrain\.gpu: .*one process"),
    ({"synth": {"eval": {"runtime": 0}}}, r"resources\.synth\.eval\.runtime: 0 is below the minimum 1"),
    ({"synth": {"experiments": {"nope": {"eval": {"gpu": 1}}}}}, r"experiments\.nope: not an experiment"),
    ({"nope": {}}, r"resources\.nope: no such profile"),
])
def test_resources_are_validated_with_their_key(tmp_path, table, key):
    with pytest.raises(C.ConfigError, match=key):
        C.load_params(write(tmp_path, lambda r: r.update(resources=table)))


def test_rule_threads_local_and_cluster():
    st = stages.Stage("x", ["effdetr"], ["profile"], heavy=True, resources={"cpus_per_task": 6})
    assert st.rule_threads(2) == 2 and st.rule_threads(None) == 6
    st.threads = 1
    assert st.rule_threads(None) == 1
    assert stages.Stage("y", ["effdetr"], ["profile"], resources={"cpus_per_task": 6}).rule_threads(None) == 1
