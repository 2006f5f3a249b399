"""Wall-clock timing: a trained DETR's encoder with different attention kernels, and the
whole-model FPS the Deformable/Sparse DETR tables report (:func:`measure_fps`).

Protocol (stated in every report that uses it): batch 1, real val images at the eval size;
the backbone and input projection run once per image outside the timed region; each kernel
setting encodes the same tensors; ``warmup`` untimed passes, then the median of ``repeats``
timed passes per image, averaged over ``num_images`` images. On CUDA every pass is fenced
with synchronize and peak memory is read from the allocator; on CPU the attention score
memory is computed (heads x queries-or-prototypes x keys x 4 bytes, largest layer).
"""
from __future__ import annotations

import statistics
import time

import torch



def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def encoder_inputs(model, image: torch.Tensor, device: torch.device):
    mask = torch.zeros(1, *image.shape[-2:], dtype=torch.bool, device=device)
    feats, fmask = model.backbone(image[None].to(device), mask)
    pos = model.position(fmask).to(feats.dtype)
    src = model.input_proj(feats)
    return (src.flatten(2).transpose(1, 2), fmask.flatten(1), pos.flatten(2).transpose(1, 2))


@torch.no_grad()
def time_encoder(model, dataset, settings: dict[str, tuple[str, object]], num_images: int,
                 warmup: int, repeats: int, amp: bool = False) -> dict[str, dict]:
    """settings: label -> (kernel kind, act config). Returns label -> {ms, score_mb, peak_mb}."""
    from ..models.detr import set_encoder_attention  # DETR's encoder only (the speed stage's deps)
    device = next(model.parameters()).device
    model.eval()
    tf = model.transformer
    heads = tf.encoder_attention_modules()[0].nheads if tf.encoder else 0
    results = {label: {"ms": [], "score_mb": [], "peak_mb": []} for label in settings}
    n = min(num_images, len(dataset))
    for i in range(n):
        image, _ = dataset[i]
        src, mask, pos = encoder_inputs(model, image, device)
        tokens = src.shape[1]
        for label, (kind, act_cfg) in settings.items():
            set_encoder_attention(tf, kind, act_cfg)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
                for _ in range(warmup):
                    tf.encode(src, mask, pos)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                times = []
                for _ in range(repeats):
                    _sync(device)
                    t0 = time.perf_counter()
                    tf.encode(src, mask, pos)
                    _sync(device)
                    times.append(time.perf_counter() - t0)
            rows = [getattr(a.kernel, "last_counts", None) for a in tf.encoder_attention_modules()]
            queries = max((int(c.max()) if c is not None else tokens) for c in rows) if rows else 0
            results[label]["ms"].append(1000 * statistics.median(times))
            results[label]["score_mb"].append(4 * heads * queries * tokens / 2**20)
            if device.type == "cuda":
                results[label]["peak_mb"].append(torch.cuda.max_memory_allocated() / 2**20)
    set_encoder_attention(tf, "dense")
    return {label: {k: (sum(v) / len(v) if v else None) for k, v in r.items()} for label, r in results.items()}


@torch.no_grad()
def measure_fps(model, dataset, warmup: int, iters: int, amp: bool = False,
                batch_sizes: tuple[int, ...] = (1,)) -> dict[str, float]:
    """Sparse DETR's ``util/benchmark.py`` protocol: the first val image repeated to each
    batch size, ``warmup`` untimed forward passes, then ``iters`` timed ones (synchronised on
    CUDA), no post-processing, in fp32 unless ``amp``. FPS = batch / *mean* latency, as there.
    Returns ``fps_b<N>`` and ``latency_ms_b<N>`` per batch size, and the CPU threads used."""
    device = next(model.parameters()).device
    model.eval()
    image, _ = dataset[0]
    out: dict[str, float] = {"fps_threads": float(torch.get_num_threads())}
    for batch in batch_sizes:
        images = image[None].expand(batch, -1, -1, -1).contiguous().to(device)
        mask = torch.zeros(batch, *image.shape[-2:], dtype=torch.bool, device=device)
        times = []
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
            for i in range(warmup + iters):
                _sync(device)
                t0 = time.perf_counter()
                model(images, mask)
                _sync(device)
                if i >= warmup:
                    times.append(time.perf_counter() - t0)
        latency = statistics.fmean(times)
        out[f"fps_b{batch}"] = batch / latency
        out[f"latency_ms_b{batch}"] = 1000 * latency
    return out
