"""The coco profile's commands, end to end on CPU, over a fabricated COCO-layout tree.

Not SynthCOCO: JPEGs of varied sizes and aspect ratios (one grayscale), COCO's 91-id
category space with its holes, a crowd box, an image without annotations, and
``instances_*2017.json`` with COCO's fields. Chain: ``data coco`` (validate the existing
copy) -> ``import`` of an official-layout DETR-DC5 checkpoint (written from HF transformers'
model, random weights) -> ``eval`` -> ``report`` row; and ``train`` (ResNet-50, random
init, 2 iterations) -> ``eval``. This proves the coco DAG's commands run; it claims nothing
about accuracy.
"""
import json
import time

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from effdetr.cli import main
from effdetr.reporting.paper import load_paper_tables
from tests.conftest import REPO
from tests.table_check import check_table_cells

pytestmark = pytest.mark.slow

# COCO's 80 category ids in 1..90 (holes at 12, 26, 29, 30, 45, 66, 68, 69, 71, 83)
COCO_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]


def fabricate_coco(root, seed=0):
    rng = np.random.default_rng(seed)
    sizes = {"train2017": [(72, 96), (96, 64), (80, 80), (64, 112)],
             "val2017": [(72, 96), (96, 72), (64, 64), (88, 120), (100, 70)]}
    for split, shapes in sizes.items():
        (root / split).mkdir(parents=True)
        images, anns = [], []
        for i, (h, w) in enumerate(shapes):
            iid = 1000 * (split == "val2017") + 139 + 7 * i  # COCO-like sparse ids
            name = f"{iid:012d}.jpg"
            pixels = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
            img = Image.fromarray(pixels)
            if i == 1:
                img = img.convert("L")  # COCO has grayscale JPEGs
            img.save(root / split / name, quality=90)
            images.append({"id": iid, "file_name": name, "height": h, "width": w, "license": 1,
                           "coco_url": "", "flickr_url": "", "date_captured": "2013-11-14 11:18:45"})
            if i == len(shapes) - 1:
                continue  # an image without annotations
            for j in range(2 + i % 2):
                bw, bh = float(rng.integers(8, w // 2)), float(rng.integers(8, h // 2))
                x, y = float(rng.integers(0, w - int(bw))), float(rng.integers(0, h - int(bh)))
                anns.append({"id": len(anns) + 1 + 10000 * (split == "val2017"), "image_id": iid,
                             "category_id": COCO_IDS[(7 * i + 13 * j) % 80], "bbox": [x, y, bw, bh],
                             "area": bw * bh * 0.8, "iscrowd": int(j == 2),
                             "segmentation": [[x, y, x + bw, y, x + bw, y + bh]] if j != 2 else
                             {"counts": [0, 4], "size": [h, w]}})
        (root / "annotations").mkdir(exist_ok=True)
        doc = {"info": {"description": "fabricated COCO layout", "year": 2017}, "licenses": [{"id": 1, "name": "x"}],
               "images": images, "annotations": anns,
               "categories": [{"id": c, "name": f"class{c}", "supercategory": "s"} for c in COCO_IDS]}
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(doc))


def official_dc5_checkpoint(path):
    """An official-layout (facebookresearch/detr) DETR-DC5 file, from HF's model."""
    from transformers import DetrConfig, DetrForObjectDetection

    from tests.hf_layout import detr_hf_to_official
    torch.manual_seed(0)
    hf = DetrForObjectDetection(DetrConfig(use_pretrained_backbone=False, dilation=True, num_labels=91,
                                           auxiliary_loss=False))
    torch.save({"model": detr_hf_to_official(hf.state_dict()), "epoch": 499}, path)


def coco_params(tmp_path, coco_root, ckpt):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["profile"] = "coco"
    prof = raw["profiles"]["coco"]
    prof["data"]["coco"]["existing"] = str(coco_root)
    prof["input"].update(train_scales=[64, 72], max_size=120, val_scale=64, crop_scales=[56], crop_min=48,
                         crop_max=64)
    prof["model"]["backbone"]["pretrained"] = "none"  # no ImageNet download in CI
    prof["train"].update(epochs=1, lr_drop=1, batch_size=2, num_workers=0, device="cpu", log_every_s=0.0,
                         checkpoint_every_iters=1, max_iters_per_epoch=2, amp=False)
    prof["eval"].update(num_workers=0, flops_images=1, fps_iters=1, fps_warmup=0, fps_batch_sizes=[1])
    # one CPU process: the profile's 8-GPU trainings (and any experiment's own GPU count) off
    prof["train"]["gpus"] = 0
    for exp in raw["experiments"].values():
        exp.get("profile_overrides", {}).get("coco", {}).get("train", {}).pop("gpus", None)
        exp.get("overrides", {}).get("train", {}).pop("gpus", None)
    raw["experiments"]["detr_dc5_official"]["import_checkpoint"] = {"format": "detr", "file": str(ckpt)}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_coco_profile_commands_on_a_fabricated_coco_tree(tmp_path, monkeypatch, capsys):
    t0 = time.time()
    coco_root = tmp_path / "coco_src"
    fabricate_coco(coco_root)
    ckpt = tmp_path / "detr-r50-dc5-fabricated.pth"
    official_dc5_checkpoint(ckpt)
    params = coco_params(tmp_path, coco_root, ckpt)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    p = ["--params", str(params)]
    data, metrics = tmp_path / "data" / "coco", tmp_path / "reports" / "metrics"

    assert main(["data", "coco", *p, "--out", str(data)]) == 0
    assert (data / "val2017").is_dir()
    assert main(["import", *p, "--experiment", "detr_dc5_official", "--out", "data/checkpoints/detr_dc5_official.pt",
                 "--metrics", str(metrics / "detr_dc5_official" / "import.json")]) == 0
    imported = json.loads((metrics / "detr_dc5_official" / "import.provenance.json").read_text())["imported_from"]
    assert imported["format"] == "detr" and imported["epoch"] == 499 and len(imported["sha256"]) == 64
    assert main(["eval", *p, "--experiment", "detr_dc5_official", "--data", str(data),
                 "--checkpoint", "data/checkpoints/detr_dc5_official.pt",
                 "--out", str(metrics / "detr_dc5_official" / "eval.json")]) == 0
    ev = json.loads((metrics / "detr_dc5_official" / "eval.json").read_text())
    rec = json.loads((metrics / "detr_dc5_official" / "eval.provenance.json").read_text())
    assert ev["num_images"] == 5 and rec["precision"] == "fp32" and 0.0 <= ev["AP"] <= 1.0

    assert main(["train", *p, "--experiment", "detr_dc5", "--data", str(data), "--out", "data/checkpoints/detr_dc5.pt",
                 "--metrics", str(metrics / "detr_dc5" / "train.json"), "--work-root", "data/work"]) == 0
    tr = json.loads((metrics / "detr_dc5" / "train.json").read_text())
    history = json.loads((metrics / "detr_dc5" / "train_history.json").read_text())
    assert np.isfinite(tr["train_loss"]) and len(history) == 1
    assert main(["eval", *p, "--experiment", "detr_dc5", "--data", str(data), "--checkpoint",
                 "data/checkpoints/detr_dc5.pt", "--out", str(metrics / "detr_dc5" / "eval.json")]) == 0

    assert main(["report", *p, "--metrics", str(metrics), "--out", str(tmp_path / "reports")]) == 0
    table = (tmp_path / "reports" / "tables" / "act_main.md").read_text()
    row = [line for line in table.splitlines() if line.startswith("| DETR-DC5 (released checkpoint) |")]
    assert row, table
    cells = [c.strip() for c in row[0].strip("|").split("|")]
    ap = 1 + 2 * load_paper_tables()["act_main"]["metrics"].index("AP")
    # at the paper's own scale ours reads "value (reproduced - paper)"
    assert cells[ap] == "43.30" and float(cells[ap + 1].split()[0]) == pytest.approx(100 * ev["AP"], abs=0.006)
    assert check_table_cells(table, metrics, load_paper_tables()["act_main"], paper_scale=True) == {
        "DETR-DC5 (released checkpoint)": "detr_dc5_official", "DETR-DC5": "detr_dc5"}
    print(f"[coco path] fabricated-COCO run: {time.time() - t0:.1f} s")
