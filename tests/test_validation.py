"""Validation during training (train.val_every): COCO AP on the val split every N epochs and
after the last, in the history; and the training itself exactly as without it (the same
losses and weights, bitwise: the validation neither draws from the global RNG nor leaves the
model in eval mode)."""
import dataclasses

import pytest
import torch
import yaml

from tests.conftest import TINY

pytestmark = pytest.mark.one_thread


def _cfg(tmp_path, **train):
    from effdetr.config import experiment_config
    raw = yaml.safe_load(TINY.read_text())
    s = raw["profiles"]["synth"]
    s["model"]["backbone"]["pretrained"] = "none"
    # dropout 0.1 and a loader worker: the main process's RNG is then drawn by dropout alone (in
    # the main process each sample reseeds it), so a validation drawing from it would shift the masks
    s["model"]["dropout"] = 0.1
    s["train"].update(epochs=3, max_iters_per_epoch=2, num_workers=1, **train)
    p = tmp_path / f"p{len(list(tmp_path.glob('p*.yaml')))}.yaml"
    p.write_text(yaml.safe_dump(raw))
    return experiment_config(p, "detr_dc5")[0]


def test_validation_reports_ap_every_n_epochs_and_leaves_training_unchanged(tmp_path, tiny_data):
    from effdetr.cli import _validation_dataset
    from effdetr.engine.train import train
    plain = _cfg(tmp_path)
    validated = _cfg(tmp_path, val_every=2, val_images=16)
    val = _validation_dataset(validated, str(tiny_data))
    assert len(val) == 16
    a = train(plain, str(tiny_data), str(tmp_path / "a.pt"), str(tmp_path / "wa"), "h")
    b = train(validated, str(tiny_data), str(tmp_path / "b.pt"), str(tmp_path / "wb"), "h", val_dataset=val)
    # epochs 0..2 with val_every 2: after epoch 1 (the 2nd) and after the last
    assert [("val_AP" in e) for e in b["history"]] == [False, True, True]
    assert all(0.0 <= e["val_AP"] <= 1.0 and "val_AP50" in e for e in b["history"] if "val_AP" in e)
    assert not any("val_AP" in e for e in a["history"])
    strip = lambda h: [{k: v for k, v in e.items() if k.startswith("train_")} for e in h]  # noqa: E731
    assert strip(a["history"]) == strip(b["history"])
    wa, wb = (torch.load(tmp_path / f, weights_only=True)["model"] for f in ("a.pt", "b.pt"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_val_every_is_validated(tmp_path):
    from effdetr.config import ConfigError
    with pytest.raises(ConfigError, match=r"val_every: -1 is below the minimum 0"):
        _cfg(tmp_path, val_every=-1)
    assert dataclasses.asdict(_cfg(tmp_path).train)["val_every"] == 0
