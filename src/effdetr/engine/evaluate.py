"""Run a detector over a dataset and score it with COCOeval.

Under torchrun each rank predicts a contiguous run of whole batches (in rank order) and rank
0 concatenates the shards' detections -- the list a single process makes, in its order --
for one COCOeval; the other ranks return None.
"""
from __future__ import annotations

import time

import torch
from torch.utils.data import DataLoader, Subset

from ..data.coco import CocoDetection, collate
from ..evaluation.coco_eval import coco_evaluate, load_coco_gt
from ..evaluation.flops import count_flops, token_shares
from ..evaluation.speed import measure_fps
from ..models.postprocess import postprocess
from ..utils import dist
from .checkpoint import NonFiniteError, check_finite


def _check_outputs(out: dict, targets: list[dict]) -> None:
    """NaN/Inf scores or boxes would be scored as misses (AP 0) instead of reported."""
    for key in ("pred_logits", "pred_boxes"):
        if key not in out:
            continue
        finite = torch.isfinite(out[key].float()).flatten(1).all(1)
        if not bool(finite.all()):
            iid = int(targets[int((~finite).nonzero()[0])]["image_id"])
            raise NonFiniteError(f"model output {key} has NaN/Inf values for image id {iid}; not scoring it")


@torch.no_grad()
def predict(model, loader: DataLoader, device: torch.device, amp: bool = False) -> tuple[list[dict], list[int], float]:
    """COCO-format detections, evaluated image ids, and seconds per image (model only)."""
    model.eval()
    post = getattr(model, "postprocess", postprocess)  # multi-scale models bring their own
    detections, image_ids, model_time = [], [], 0.0
    for images, masks, targets in loader:
        images, masks = images.to(device), masks.to(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
            out = model(images, masks)
        if device.type == "cuda":
            torch.cuda.synchronize()
        model_time += time.perf_counter() - t0
        _check_outputs(out, targets)
        orig = torch.stack([t["orig_size"] for t in targets]).to(device)
        for tgt, res in zip(targets, post(out, orig)):
            iid = int(tgt["image_id"])
            image_ids.append(iid)
            boxes = res["boxes"].cpu()
            boxes[:, 2:] -= boxes[:, :2]
            for score, label, box in zip(res["scores"].tolist(), res["labels"].tolist(), boxes.tolist()):
                detections.append({"image_id": iid, "category_id": int(label), "bbox": box, "score": float(score)})
    return detections, image_ids, model_time / max(len(image_ids), 1)


def cost_depends_on_content(model) -> bool:
    """True when a forward's cost is not a function of the input's shape alone: a kernel
    that reports its own ``exact_macs()`` (ACT, K-means: prototypes per image)."""
    return any(callable(getattr(m, "exact_macs", None)) for m in model.modules())


@torch.no_grad()
def image_flops(model, img: torch.Tensor, parts: dict[str, str], kernels: list) -> dict[str, float]:
    """One image's GMACs per part, token shares, encoder token counts and (clustering
    kernels) prototypes per layer."""
    device = next(model.parameters()).device
    mask = torch.zeros(1, *img.shape[-2:], dtype=torch.bool, device=device)
    outputs: dict = {}
    stats = {f"gmacs_{k}": v for k, v in count_flops(model, img[None].to(device), mask, parts, outputs).items()}
    stats.update(token_shares(model, outputs))
    for key in ("tokens", "kept_tokens"):  # multi-scale models: encoder tokens, Sparse DETR's kept ones
        if key in outputs:
            stats[f"encoder_{key}"] = float(outputs[key])
    for layer, kernel in enumerate(kernels):
        counts = getattr(kernel, "last_counts", None)
        if counts is not None:  # clustering kernels: prototypes per head, this image
            stats[f"prototypes_layer{layer}"] = float(counts.float().mean())
            stats["encoder_tokens"] = float(kernel.last_tokens)
    return stats


def mean_flops(model, dataset: CocoDetection, num_images: int) -> dict[str, float]:
    """GMACs per part averaged over the first images, one at a time at their own size
    (attention cost depends on the token count, and for ACT on the image content). A model
    whose cost depends on the shape alone is counted once per distinct image shape: the
    same per-image numbers, summed in the same order."""
    parts = model.flops_parts
    transformer = getattr(model, "transformer", None)
    kernels = [attn.kernel for attn in transformer.encoder_attention_modules()] if transformer else []
    per_shape = not cost_depends_on_content(model)
    seen: dict[tuple[int, ...], dict[str, float]] = {}
    sums: dict[str, float] = {}
    n = min(num_images, len(dataset))
    if n == 0:
        raise ValueError(f"{getattr(dataset, 'ann_file', 'dataset')}: no images to count FLOPs on")
    for i in range(n):
        img, _ = dataset[i]
        shape = tuple(img.shape)
        stats = seen.get(shape) if per_shape else None
        if stats is None:
            stats = image_flops(model, img, parts, kernels)
            if per_shape:
                seen[shape] = stats
        for k, v in stats.items():
            sums[k] = sums.get(k, 0.0) + v / n
    sums["gmacs_transformer"] = sums["gmacs_total"] - sums["gmacs_backbone"]
    return sums


def evaluate_dataset(model, dataset: CocoDetection, device, batch_size: int, num_workers: int,
                     area_ranges, amp: bool = False, flops_images: int = 0, fps_iters: int = 0,
                     fps_warmup: int = 0, fps_batch_sizes: tuple[int, ...] = (1,),
                     generator: torch.Generator | None = None) -> dict | None:
    """COCO AP (and optionally FLOPs / FPS) of ``model`` on ``dataset``; fails before any
    compute on an empty split or non-finite weights, which could only give a fake AP.
    Distributed: rank 0's stats over every rank's shard, None on the other ranks."""
    if not len(dataset):
        raise ValueError(f"{dataset.ann_file}: the split has no images to evaluate")
    check_finite(model.state_dict(), "model to evaluate")
    world = dist.world_size()
    part = dataset if world == 1 else Subset(dataset, dist.eval_shard(len(dataset), batch_size, dist.rank(), world))
    # ``generator``: the loader's base seed from it, not the global RNG (a validation inside
    # training must not shift the training's dropout stream)
    loader = DataLoader(part, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate,
                        generator=generator)
    dets, ids, sec_per_img = predict(model, loader, device, amp)
    if world > 1:
        shards = dist.gather_to_main((dets, ids, sec_per_img * len(ids)))
        if not dist.is_main():
            return None
        dets = [d for s in shards for d in s[0]]
        ids = [i for s in shards for i in s[1]]
        sec_per_img = sum(s[2] for s in shards) / max(len(ids), 1)
    gt = load_coco_gt(str(dataset.ann_file))
    # Labels without a category (e.g. the holes in COCO ids) can never match; drop them.
    valid = set(gt.getCatIds())
    dets = [d for d in dets if d["category_id"] in valid]
    stats = coco_evaluate(gt, dets, ids, area_ranges)
    stats["sec_per_image"] = sec_per_img
    stats["num_images"] = len(ids)
    stats["params_m"] = sum(p.numel() for p in model.parameters()) / 1e6
    if flops_images:
        stats.update(mean_flops(model, dataset, flops_images))
    if fps_iters:
        stats.update(measure_fps(model, dataset, fps_warmup, fps_iters, amp, fps_batch_sizes))
    return stats
