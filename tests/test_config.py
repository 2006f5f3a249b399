import copy

import pytest
import yaml

from effdetr.config import ConfigError, expand_experiments, experiment_config, load_params, validate_raw
from tests.conftest import REPO, TINY


@pytest.fixture
def raw():
    return yaml.safe_load(TINY.read_text())


def test_repo_params_are_valid():
    params, _ = load_params(REPO / "params.yaml")
    assert params.profile in ("synth", "coco")
    for name, (_, exp) in expand_experiments(params.experiments, "params.yaml").items():
        if exp.get("profiles") and params.profile not in exp["profiles"]:
            with pytest.raises(ConfigError, match="exists only in profiles"):
                experiment_config(REPO / "params.yaml", name)
        else:
            experiment_config(REPO / "params.yaml", name)


@pytest.mark.parametrize("mutate,path,msg", [
    (lambda e: e["detr_dc5_official"].pop("import_checkpoint"), "experiments.detr_dc5_official.import_checkpoint",
     "the import stage needs an import_checkpoint"),
    (lambda e: e["detr_dc5_official"]["import_checkpoint"].update(release="detr-r101"),
     "experiments.detr_dc5_official.import_checkpoint.release", "unknown release 'detr-r101'"),
    (lambda e: e["detr_dc5_official"]["import_checkpoint"].update(format="deformable_detr"),
     "experiments.detr_dc5_official.import_checkpoint.format", "is in the 'detr' layout"),
    (lambda e: e["detr_dc5_official"]["import_checkpoint"].update(release=None),
     "experiments.detr_dc5_official.import_checkpoint", "needs release"),
    (lambda e: e["detr_dc5"].update(import_checkpoint={"format": "detr", "release": "detr-r50-dc5"}),
     "experiments.detr_dc5.stages", "only read by the import stage"),
    (lambda e: e["act"].update(init_from="detr_dc5_official"), "init_from", "does not exist in profile 'synth'"),
    (lambda e: e["detr_dc5_official"].update(profiles=["cocoa"]), "experiments.detr_dc5_official.profiles",
     "no such profile 'cocoa'"),
    (lambda e: e["detr_dc5_official"].update(profiles=[]), "experiments.detr_dc5_official.profiles", "is empty"),
    (lambda e: e["detr_dc5_official"].update(import_checkpoint={"format": "sparse_detr", "file": "x.pth"}),
     "experiments.detr_dc5_official(profile coco).import_checkpoint.format",
     "'sparse_detr' checkpoints need model.arch: deformable with model.sparse.rho"),
    (lambda e: e["deformable_detr_topk_seed43"]["overrides"]["model"].update(dec_layers=4),
     "seed_spread.deformable", "'deformable_detr_topk_seed43' differs from 'deformable_detr_topk' in model.dec_layers"),
    (lambda e: e["act_L32_hashseed100"].update(init_from="act_mtkd_L32"), "seed_spread.act_hash",
     "differs from 'act_L32' in init_from"),
])
def test_import_experiments_are_checked_on_load(tmp_path, mutate, path, msg):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    mutate(raw["experiments"])
    f = tmp_path / "params.yaml"
    f.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as e:
        load_params(f)
    assert path in str(e.value) and msg in str(e.value) and str(f) in str(e.value)


@pytest.mark.parametrize("mutate,path,msg", [
    (lambda r: r["profiles"]["synth"]["train"].update(epochz=3), "profiles.synth.train.epochz", "unknown key"),
    (lambda r: r["profiles"]["synth"]["train"].update(epochs="ten"), "profiles.synth.train.epochs", "expected an integer"),
    (lambda r: r["profiles"]["synth"]["train"].update(epochs=0), "profiles.synth.train.epochs", "below the minimum"),
    (lambda r: r["profiles"]["synth"]["train"].update(amp="yes"), "profiles.synth.train.amp", "true/false"),
    (lambda r: r["profiles"]["synth"]["loss"].update(eos_coef=1.5), "profiles.synth.loss.eos_coef", "above the maximum"),
    (lambda r: r["profiles"]["synth"]["data"].update(dataset="voc"), "profiles.synth.data.dataset", "not one of"),
    (lambda r: r["profiles"]["synth"]["model"].update(nheads=5), "profiles.synth.model.nheads", "not divisible"),
    (lambda r: r.update(profile="imagenet"), "profile", "not one of"),
    (lambda r: r["experiments"]["detr_dc5"]["overrides"].update(model={"hiden_dim": 3}),
     "experiments.detr_dc5(profile synth).model.hiden_dim", "unknown key"),
    (lambda r: r["experiments"]["detr_dc5"].update(stages=["train", "dance"]), "experiments.detr_dc5.stages", "unknown stage"),
    (lambda r: r["profiles"]["synth"].pop("pretrain"),
     "profiles.synth.model.backbone.pretrained", "needs a pretrain section"),
    (lambda r: r["flops"].update(input_sizes=[[64]]), "flops.input_sizes[0]", "[height, width]"),
    (lambda r: r.pop("experiments"), "params.experiments", "missing required key"),
    # ACT: bad hash rounds / references fail at load time, before any compute
    (lambda r: r["experiments"]["act"]["sweep"].update(values=[32, 0]),
     "experiments.act.sweep.values[1] (act_L0, model.act.rounds)(profile synth).model.act.rounds", "below the minimum 1"),
    (lambda r: r["experiments"]["act"]["sweep"].update(values=[16.5]),
     "experiments.act.sweep.values[0] (act_L16p5, model.act.rounds)(profile synth).model.act.rounds",
     "expected an integer"),
    (lambda r: r["experiments"]["act"]["sweep"].update(values=[]), "experiments.act.sweep.values", "at least one"),
    (lambda r: r["experiments"]["act"]["sweep"].update(values=[16, 16]), "experiments.act.sweep.values", "repeat"),
    (lambda r: r["profiles"]["synth"]["model"]["act"].update(bucket_width=0), "profiles.synth.model.act.bucket_width",
     "below the minimum"),
    (lambda r: r["experiments"]["act"].update(init_from="detr_r18"), "experiments.act.init_from", "not an experiment"),
    (lambda r: r["experiments"]["act"].update(init_from="act_kmeans_L16"), "experiments.act.init_from",
     "has no train or import stage"),
    (lambda r: r["experiments"]["act"].pop("init_from"), "experiments.act.init_from", "must name the trained"),
    (lambda r: r["experiments"]["act_mtkd"]["distill"].update(teacher="nobody"), "experiments.act_mtkd.distill.teacher",
     "not an experiment"),
    (lambda r: r["experiments"]["act_mtkd"]["distill"].pop("teacher"), "experiments.act_mtkd.distill.teacher",
     "missing required key"),
    (lambda r: r["experiments"]["act"]["overrides"]["model"].update(encoder_attention="lsh"),
     "model.encoder_attention", "not one of"),
    (lambda r: r["speed"].update(experiment="detr_dc5"), "speed.experiment", "swept eval-only"),
    # init_from: the referenced experiment must build the same weights (kernels may differ)
    (lambda r: r["experiments"]["act"]["overrides"]["model"].update(hidden_dim=48),
     "experiments.act.sweep.values[0] (act_L32, model.act.rounds)(profile synth).init_from",
     "'detr_dc5' trains model.hidden_dim = 32 but this experiment builds 48"),
    (lambda r: r["experiments"]["detr_dc5"].update(profile_overrides={"synth": {"model": {"backbone": {
        "dilate_layer3": True}}}}),
     "experiments.act.sweep.values[0] (act_L32, model.act.rounds)(profile synth).init_from",
     "trains model.backbone.dilate_layer3 = True but this experiment builds False"),
    (lambda r: r["profiles"]["synth"]["model"].update(spatial_prior=True, box_reference=False),
     "profiles.synth.model.spatial_prior", "needs model.box_reference"),
    (lambda r: r["experiments"]["detr_dc5"].update(overrides={"model": {"backbone": {"dilation": False,
                                                                                       "dilate_layer3": True}}}),
     "experiments.detr_dc5(profile synth).model.backbone.dilate_layer3", "needs model.backbone.dilation: true"),
    (lambda r: r["experiments"]["deformable_detr_topk"].update(overrides={"model": {
        "arch": "deformable", "backbone": {"dilation": True, "dilate_layer3": True}}}),
     "experiments.deformable_detr_topk(profile synth).model.backbone.dilate_layer3", "needs model.arch: detr"),
    # Deformable / Sparse DETR
    (lambda r: r["profiles"]["synth"]["model"].update(sparse={"rho": 0.1}), "profiles.synth.model.sparse.rho",
     "needs model.arch: deformable"),
    (lambda r: r["experiments"]["sparse_detr"]["sweep"].update(values=[0.1, 0.0]),
     "experiments.sparse_detr.sweep.values[1] (sparse_detr_rho0p0, model.sparse.rho)(profile synth).model.sparse.rho",
     "below the minimum"),
    (lambda r: r["experiments"]["sparse_detr"]["sweep"].update(values=[1.5]), "model.sparse.rho", "above the maximum"),
    (lambda r: r["experiments"]["deformable_detr_topk"].update(overrides={"model": {"arch": "deformable", "encoder_attention": "act"}}),
     "experiments.deformable_detr_topk(profile synth).model.arch", "deformable has its own attention"),
    (lambda r: r["flops"].update(model_input_sizes={"nope": [[64, 64]]}), "flops.model_input_sizes.nope",
     "not a model under flops.models"),
    (lambda r: r["flops"].update(model_input_sizes={"detr_r50": [[64]]}), "flops.model_input_sizes.detr_r50[0]",
     "[height, width]"),
    (lambda r: r["profiles"]["synth"]["train"].update(threads=0), "profiles.synth.train.threads", "below the minimum"),
    # Lite DETR: bad H / B / A fail at load, before compute
    (lambda r: r["experiments"]["deformable_detr_topk"].update(
        overrides={"model": {"arch": "deformable", "lite": {"high_levels": 4}}}),
     "experiments.deformable_detr_topk(profile synth).model.lite.high_levels", "need H < model.deformable.num_levels"),
    (lambda r: r["experiments"]["deformable_detr_topk"].update(
        overrides={"model": {"arch": "deformable", "lite": {"high_levels": 1, "blocks": 0}}}),
     "experiments.deformable_detr_topk(profile synth).model.lite.blocks", "below the minimum 1"),
    (lambda r: r["experiments"]["deformable_detr_topk"].update(
        overrides={"model": {"arch": "deformable", "lite": {"high_levels": 1, "high_updates": 0}}}),
     "experiments.deformable_detr_topk(profile synth).model.lite.high_updates", "below the minimum 1"),
    (lambda r: r["profiles"]["synth"]["model"].update(lite={"key_aware": True}), "profiles.synth.model.lite",
     "needs model.arch: deformable"),
    (lambda r: r["experiments"]["deformable_detr_topk"].update(
        overrides={"model": {"arch": "deformable", "lite": {"blocks": 2}}}),
     "experiments.deformable_detr_topk(profile synth).model.lite.blocks", "set model.lite.high_levels"),
    (lambda r: r["experiments"]["deformable_detr_topk"].update(
        overrides={"model": {"arch": "deformable", "lite": {"high_levels": 1, "low_update": "after"}}}),
     "experiments.deformable_detr_topk(profile synth).model.lite.low_update", "joint"),
    (lambda r: r["experiments"]["deformable_detr_topk"].update(overrides={"model": {
        "arch": "deformable", "enc_layers": 3, "lite": {"high_levels": 3, "blocks": 3, "high_updates": 2}}}),
     "experiments.deformable_detr_topk(profile synth).model.enc_layers", "set enc_layers: 6"),
    (lambda r: r["profiles"]["synth"]["model"].update(deformable={"skip_finest": 1}),
     "profiles.synth.model.deformable.skip_finest", "needs model.arch: deformable"),
    (lambda r: r["experiments"]["deformable_detr_topk"].update(
        overrides={"model": {"arch": "deformable", "deformable": {"skip_finest": 3}}}),
     "experiments.deformable_detr_topk(profile synth).model.deformable.skip_finest", "above the maximum 2"),
    # DETRDistill pairs are checked at load, before anything trains
    (lambda r: r["experiments"].update(stu={"paper": "detrdistill", "table": "detrdistill_main",
                                            "distill": {"teacher": "deformable_detr_topk", "method": "detrdistill"}}),
     "experiments.stu(profile synth).distill.teacher", "DETRDistill's class terms need one family"),
    (lambda r: r["experiments"].update(stu={
        "paper": "detrdistill", "table": "detrdistill_main", "overrides": r["experiments"]["deformable_detr_topk"][
            "overrides"], "distill": {"teacher": "deformable_detr_topk", "method": "detrdistill"}}),
     "experiments.stu(profile synth).distill.detrdistill.assignment", "needs learned queries"),
    (lambda r: r["experiments"].update(stu={
        "paper": "detrdistill", "table": "detrdistill_main", "overrides": {"model": {"backbone": {"dilation": False}}},
        "distill": {"teacher": "detr_dc5", "method": "detrdistill"}}),
     "experiments.stu(profile synth).distill.detrdistill.feature", "same feature tokens"),
    (lambda r: r["experiments"].update(stu={
        "paper": "detrdistill", "table": "detrdistill_main", "overrides": {"model": {"backbone": {
            "dilation": True, "dilate_layer3": True}}}, "distill": {"teacher": "detr_dc5", "method": "detrdistill"}}),
     "experiments.stu(profile synth).distill.detrdistill.feature", "same feature tokens"),
])
def test_invalid_params_name_key_and_file(raw, tmp_path, mutate, path, msg):
    bad = copy.deepcopy(raw)
    mutate(bad)
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump(bad))
    with pytest.raises(ConfigError) as e:
        load_params(f)
    assert str(f) in str(e.value)
    assert path in str(e.value)
    assert msg in str(e.value)


def test_unknown_experiment_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="no such experiment"):
        experiment_config(TINY, "nope")
    with pytest.raises(ConfigError, match="params file not found"):
        load_params(tmp_path / "missing.yaml")
    (tmp_path / "x.yaml").write_text("a: [")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(tmp_path / "x.yaml")


def test_experiment_overrides_merge(raw):
    cfg, exp = experiment_config(TINY, "detr_dc5_wide")
    assert cfg.model.hidden_dim == 48 and cfg.model.nheads == 4
    assert exp.table == "act_main"
    validate_raw(raw, "x.yaml")


def test_sweep_expands_into_one_experiment_per_value():
    cfg16, exp = experiment_config(TINY, "act_L16")
    cfg32, _ = experiment_config(TINY, "act_L32")
    assert (cfg16.model.act.rounds, cfg32.model.act.rounds) == (16, 32)
    assert cfg16.model.encoder_attention == "act" and exp.init_from == "detr_dc5"
    with pytest.raises(ConfigError, match="no such experiment"):
        experiment_config(TINY, "act")


@pytest.mark.parametrize("sizes", [[], [4, 4]])
def test_fps_batch_sizes_need_each_size_once(raw, tmp_path, sizes):
    raw["profiles"]["synth"]["eval"]["fps_batch_sizes"] = sizes
    f = tmp_path / "p.yaml"
    f.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"profiles\.synth\.eval\.fps_batch_sizes: .* each once"):
        load_params(f)
