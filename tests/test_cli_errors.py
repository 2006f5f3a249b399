"""Bad checkpoints and params stop the CLI before compute with the file and field named."""
import torch

from effdetr.cli import main
from effdetr.engine.checkpoint import load_model_checkpoint
from effdetr.models.backbone import load_backbone_weights
from tests.conftest import TINY


def test_missing_and_garbage_checkpoints(tmp_path, capsys, tiny_data):
    args = ["eval", "--params", str(TINY), "--experiment", "detr_dc5", "--data", str(tiny_data),
            "--out", str(tmp_path / "e.json"), "--checkpoint"]
    assert main(args + [str(tmp_path / "none.pt")]) == 2
    assert "none.pt: checkpoint not found" in capsys.readouterr().err
    (tmp_path / "junk.pt").write_bytes(b"junk")
    assert main(args + [str(tmp_path / "junk.pt")]) == 2
    assert "junk.pt: not a readable effdetr checkpoint" in capsys.readouterr().err
    torch.save({"model": {}}, tmp_path / "partial.pt")
    assert main(args + [str(tmp_path / "partial.pt")]) == 2
    assert "partial.pt: checkpoint field 'model_config' is missing" in capsys.readouterr().err


def test_checkpoint_that_does_not_fit_the_config(tmp_path, capsys, tiny_data, tiny_cfg):
    import dataclasses
    torch.save({"model": {"x": torch.zeros(1)}, "model_config": dataclasses.asdict(tiny_cfg.model)}, tmp_path / "m.pt")
    assert load_model_checkpoint(tmp_path / "m.pt")["model"]
    assert main(["eval", "--params", str(TINY), "--experiment", "detr_dc5", "--data", str(tiny_data),
                 "--out", str(tmp_path / "e.json"), "--checkpoint", str(tmp_path / "m.pt")]) == 2
    assert "m.pt: model weights do not fit model_config" in capsys.readouterr().err


def test_backbone_weights_errors(tmp_path, tiny_cfg):
    from effdetr.models.backbone import Backbone
    import pytest
    body = Backbone(tiny_cfg.model.backbone).body
    with pytest.raises(FileNotFoundError, match="model.backbone.pretrained"):
        load_backbone_weights(body, str(tmp_path / "no.pt"))
    torch.save({"model": {}}, tmp_path / "empty.pt")
    with pytest.raises(ValueError, match="empty.pt: backbone checkpoint lacks"):
        load_backbone_weights(body, str(tmp_path / "empty.pt"))
    # equal stage widths: stride 16 has a layer3 shortcut that the stride-8 trunk does not
    import dataclasses
    same = dataclasses.replace(tiny_cfg.model.backbone, dilation=True, channels=[8, 16, 16, 32])
    torch.save({"model": Backbone(same).body.state_dict()}, tmp_path / "s16.pt")
    with pytest.raises(ValueError, match=r"s16.pt: backbone checkpoint has 6 trunk tensors .*layer3.0.downsample"):
        load_backbone_weights(Backbone(dataclasses.replace(same, dilate_layer3=True)).body, str(tmp_path / "s16.pt"))


def test_bad_params_fail_before_compute(tmp_path, capsys):
    bad = tmp_path / "p.yaml"
    bad.write_text(TINY.read_text().replace("epochs: 2,", "epochs: -1,"))
    assert main(["train", "--params", str(bad), "--experiment", "detr_dc5", "--data", "nowhere",
                 "--out", str(tmp_path / "m.pt"), "--metrics", str(tmp_path / "t.json")]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "profiles.synth.train.epochs" in err and "below the minimum" in err


def test_missing_data_fails_before_training(tmp_path, capsys):
    assert main(["train", "--params", str(TINY), "--experiment", "detr_dc5", "--data", str(tmp_path / "nodata"),
                 "--out", str(tmp_path / "m.pt"), "--metrics", str(tmp_path / "t.json")]) == 2
    assert "instances_val.json: <file>: annotation file not found" in capsys.readouterr().err


def test_act_experiments_need_their_teacher_before_compute(tmp_path, capsys, tiny_data):
    base = ["train", "--params", str(TINY), "--experiment", "act_mtkd_L16", "--data", str(tiny_data),
            "--out", str(tmp_path / "m.pt"), "--metrics", str(tmp_path / "t.json")]
    assert main(base) == 2
    assert "starts from detr_dc5: pass --init" in capsys.readouterr().err
    missing = str(tmp_path / "detr_dc5.pt")
    assert main(base + ["--init", missing, "--teacher", missing]) == 2
    assert "detr_dc5.pt: checkpoint not found" in capsys.readouterr().err
    assert not (tmp_path / "m.pt").exists() and not (tmp_path / "t.json").exists()


def test_act_eval_rejects_a_checkpoint_of_another_architecture(tmp_path, capsys, tiny_data, tiny_cfg):
    import dataclasses
    from effdetr.models import build_model
    cfg = dataclasses.replace(tiny_cfg.model, hidden_dim=48)
    torch.save({"model": build_model(cfg).state_dict(), "model_config": dataclasses.asdict(cfg)}, tmp_path / "w.pt")
    assert main(["eval", "--params", str(TINY), "--experiment", "act_L16", "--data", str(tiny_data),
                 "--out", str(tmp_path / "e.json"), "--checkpoint", str(tmp_path / "w.pt")]) == 2
    assert "w.pt: model_config.hidden_dim is 48 but the experiment needs 32" in capsys.readouterr().err


def test_os_errors_are_named_not_tracebacks(tmp_path, capsys):
    """An OSError other than a missing file (here: writing the DVC file onto a folder) is an
    error naming the path, exit 2, like every other bad input."""
    (tmp_path / "dvc.yaml").mkdir()
    assert main(["dag", "dvc", "--params", str(TINY), "--out", str(tmp_path / "dvc.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("effdetr dag: error:") and str(tmp_path / "dvc.yaml") in err
