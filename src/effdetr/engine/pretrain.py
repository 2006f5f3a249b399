"""Backbone pre-training on the pipeline's own train split (stand-in for ImageNet weights).

The papers start from ImageNet-pretrained ResNets; with no internet, the SynthCOCO profile
pre-trains its small backbone once in the DAG and every detector reuses it. Objective:
classify every ground-truth object from C5 features pooled inside its box (RoIAlign), so
the trunk learns to tell object kinds apart at every scale and position -- what a
detector needs -- at the cost of a backbone-only forward on full images.
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from torchvision.ops import roi_align

from ..data.coco import CocoDetection, collate, split_paths
from ..data.transforms import build_transforms
from ..models.backbone import Backbone
from ..utils.box_ops import box_cxcywh_to_xyxy
from ..utils.repro import resolve_device, seed_everything
from .checkpoint import save_atomic
from .train import EpochSampler, SeededSamples


class RoIClassifier(nn.Module):
    """Backbone + RoIAlign(3x3) over each box + linear classifier."""

    def __init__(self, backbone: Backbone, num_classes: int, pool: int = 3):
        super().__init__()
        self.backbone, self.pool = backbone, pool
        self.head = nn.Linear(backbone.num_channels * pool * pool, num_classes)

    def forward(self, images, mask, boxes_xyxy: list[torch.Tensor]):
        feats, _ = self.backbone(images, mask)
        pooled = roi_align(feats, boxes_xyxy, self.pool, spatial_scale=1.0 / self.backbone.stride,
                           sampling_ratio=2, aligned=True)
        return self.head(pooled.flatten(1))


def pretrain_backbone(cfg, data_root: str, out_path: str, run=None) -> dict:
    p = cfg.pretrain
    device = resolve_device(cfg.train.device)
    seed_everything(p.seed)
    img_dir, ann = split_paths(cfg.data, "train", data_root)
    dataset = CocoDetection(img_dir, ann, build_transforms(cfg.input, train=True), cfg.model.num_classes)
    bb_cfg = type(cfg.model.backbone)(**{**cfg.model.backbone.__dict__, "pretrained": "none", "freeze_bn": False})
    model = RoIClassifier(Backbone(bb_cfg), cfg.model.num_classes).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=p.lr, weight_decay=p.weight_decay)
    iters = p.epochs * math.ceil(len(dataset) / p.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=p.lr, total_steps=iters, pct_start=0.1)
    history = []
    for epoch in range(p.epochs):
        loader = DataLoader(SeededSamples(dataset), batch_size=p.batch_size,
                            sampler=EpochSampler(len(dataset), p.seed, epoch),
                            num_workers=cfg.train.num_workers, collate_fn=collate)
        model.train()
        t0, tot, correct, n = time.time(), 0.0, 0, 0
        for images, masks, targets in loader:
            # targets are normalised to each image's own (unpadded) size
            boxes = [box_cxcywh_to_xyxy(t["boxes"]) * t["size"].flip(0).repeat(2) for t in targets]
            labels = torch.cat([t["labels"] for t in targets]).to(device)
            if len(labels) == 0:
                continue
            images, masks = images.to(device), masks.to(device)
            logits = model(images, masks, [b.to(device) for b in boxes])
            loss = F.cross_entropy(logits, labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot += loss.item() * len(labels)
            correct += (logits.argmax(1) == labels).sum().item()
            n += len(labels)
        metrics = {"pretrain_loss": tot / max(n, 1), "pretrain_accuracy": correct / max(n, 1),
                   "epoch_seconds": time.time() - t0}
        history.append(metrics)
        print(f"[pretrain] epoch {epoch}: " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items()), flush=True)
        if run is not None:
            run.log_metrics(metrics, step=epoch)
    save_atomic({"model": model.backbone.body.state_dict()}, out_path)
    return {"final": history[-1], "history": history}
