"""The evaluation protocol of the papers' code: fp32 unless asked, Sparse DETR's FPS
definition, batch-1 COCO evaluation, torchvision's ImageNet V1 ResNet-50."""
import json

import pytest
import timm
import yaml

from effdetr import cli
from effdetr.config import expand_experiments, experiment_config
from effdetr.evaluation import speed
from tests.conftest import REPO, TINY


class _NoRun:
    run_id, uid = "run", "uid"

    def __init__(self, *a, **k):
        self.tags = a[2]

    def __enter__(self):
        return self

    def __exit__(self, *a):
        pass

    def log_metrics(self, *a, **k):
        pass

    def log_artifact(self, *a, **k):
        pass


@pytest.mark.parametrize("eval_amp", [None, True])
def test_eval_precision_is_eval_amp_not_train_amp(eval_amp, tmp_path, monkeypatch, tiny_data, tiny_cfg):
    """The tiny profile trains with amp: true; evaluation must not inherit it."""
    raw = yaml.safe_load(TINY.read_text())
    if eval_amp is not None:
        raw["profiles"]["synth"]["eval"]["amp"] = eval_amp
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    seen = {}

    def fake_evaluate(model, dataset, device, *a, amp, **k):
        seen["amp"] = amp
        return {"AP": 0.5}

    from effdetr.models import build_model
    monkeypatch.setattr("effdetr.engine.evaluate.evaluate_dataset", fake_evaluate)
    monkeypatch.setattr("effdetr.engine.checkpoint.build_trained_model",
                        lambda path, cfg=None: (build_model(tiny_cfg.model), {}))
    monkeypatch.setattr("effdetr.tracking.Run", _NoRun)
    out = tmp_path / "eval.json"
    assert cli.main(["eval", "--params", str(params), "--experiment", "detr_dc5", "--data", str(tiny_data),
                     "--checkpoint", "unused.pt", "--out", str(out)]) == 0
    assert seen["amp"] is bool(eval_amp)
    assert json.loads(out.with_name(f"{out.stem}.provenance.json").read_text())["precision"] == "fp32"  # autocast is CUDA-only: CPU stays fp32


def test_fps_is_batch_over_mean_latency(monkeypatch, tiny_cfg, tiny_data):
    """Sparse DETR's util/benchmark.py: FPS = batch / mean latency of the timed passes, at
    every batch size; a fake clock makes the latencies known (1, 2, 6 ticks: median 2, mean 3)."""
    from effdetr.data.coco import CocoDetection, split_paths
    from effdetr.data.transforms import build_transforms
    from effdetr.models import build_model
    img_dir, ann = split_paths(tiny_cfg.data, "val", tiny_data)
    dataset = CocoDetection(img_dir, ann, build_transforms(tiny_cfg.input, train=False), tiny_cfg.model.num_classes)
    model = build_model(tiny_cfg.model)
    batches, clock = [], {"t": 0.0}
    durations = iter([0.5, 1.0, 2.0, 6.0] * 2)  # per pass: one warm-up, then three timed
    real_forward = model.forward

    def timed_forward(images, mask):  # the fake clock moves only while the model runs
        batches.append(images.shape[0])
        clock["t"] += next(durations)
        return real_forward(images, mask)

    model.forward = timed_forward
    monkeypatch.setattr(speed.time, "perf_counter", lambda: clock["t"])
    out = speed.measure_fps(model, dataset, warmup=1, iters=3, batch_sizes=(1, 4))
    assert batches == [1] * 4 + [4] * 4
    assert out["latency_ms_b1"] == pytest.approx(3000.0) and out["fps_b1"] == pytest.approx(1 / 3)
    assert out["fps_b4"] == pytest.approx(4 / 3)


@pytest.fixture(scope="module")
def coco_configs(tmp_path_factory):
    """Every experiment of the repo's params.yaml, resolved under the coco profile."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["profile"] = "coco"
    path = tmp_path_factory.mktemp("coco") / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return {n: experiment_config(path, n)[0] for n in expand_experiments(raw["experiments"], path)}


def test_coco_profile_evaluates_in_fp32_at_batch_1(coco_configs):
    for name, cfg in coco_configs.items():
        assert cfg.eval.amp is False, name
        if cfg.model.arch == "detr" and cfg.model.backbone.dilation:
            assert cfg.eval.batch_size == 1, name  # facebookresearch/detr#239


def test_coco_profile_backbone_is_torchvision_imagenet_v1(coco_configs):
    names = {cfg.model.backbone.name for cfg in coco_configs.values()}
    for name in names:
        model = timm.create_model(name, pretrained=False)
        assert model.pretrained_cfg["tag"] == "tv_in1k", name
        assert model.pretrained_cfg["url"].startswith("https://download.pytorch.org/models/resnet")  # torchvision V1
