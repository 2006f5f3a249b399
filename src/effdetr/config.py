"""params.yaml: load, validate, and resolve one experiment's configuration.

The file is the single source of truth. Every section is a typed dataclass; unknown keys,
wrong types and out-of-range values raise :class:`ConfigError` naming the file and the
dotted key path, before any compute starts. An experiment's config is the active profile
deep-merged with the experiment's overrides (and its per-profile overrides).
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml


class ConfigError(ValueError):
    """A params problem, always naming the file and the key path."""

    def __init__(self, file: str | Path, path: str, message: str):
        self.file, self.path = str(file), path
        super().__init__(f"{file}: {path}: {message}")


def _f(default: Any = dataclasses.MISSING, *, lo: float | None = None, hi: float | None = None,
       factory: Any = None, doc: str = ""):
    meta = {"lo": lo, "hi": hi, "doc": doc}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


# ---------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------
@dataclass
class SynthConfig:
    """SynthCOCO generator settings (see effdetr.data.synthcoco)."""
    seed: int = _f(0, lo=0)
    num_train: int = _f(2000, lo=1)
    num_val: int = _f(250, lo=1)
    image_size: int = _f(128, lo=32, hi=2048)
    num_classes: int = _f(6, lo=1, hi=8)
    min_objects: int = _f(1, lo=0)
    max_objects: int = _f(6, lo=1, hi=50)
    min_side: int = _f(8, lo=2)
    max_side: int = _f(80, lo=4)
    max_overlap: float = _f(0.5, lo=0.0, hi=1.0, doc="max fraction of an object hidden by later ones")
    category_id_offset: int = _f(1, lo=0, doc="first category id; ids skip one every 3 to mimic COCO holes")
    hue_jitter: float = _f(0.6, lo=0.0, hi=10.0, doc="std of an object's hue around its class hue, in class gaps")
    background_saturation: float = _f(1.0, lo=0.0, hi=1.0, doc="colourfulness of the background noise")
    background_contrast: float = _f(1.0, lo=0.0, hi=1.0, doc="texture amplitude around mid-grey")


@dataclass
class CocoConfig:
    """COCO 2017 source: download from base_url, or validate an existing copy."""
    existing: Optional[str] = _f(None, doc="path of an existing COCO root to validate instead of downloading")
    base_url: str = "http://images.cocodataset.org"
    splits: list[str] = _f(factory=lambda: ["train2017", "val2017", "annotations_trainval2017"])


@dataclass
class DataConfig:
    dataset: Literal["synth", "coco"] = "synth"
    root: str = "data/synthcoco"
    area_ranges: list[float] = _f(factory=lambda: [32.0, 96.0],
                                  doc="side lengths splitting small/medium/large (area = side^2)")
    synth: Optional[SynthConfig] = None
    coco: Optional[CocoConfig] = None


@dataclass
class InputConfig:
    """DETR's transforms: multi-scale shorter-side resize, optional crop branch, flip."""
    train_scales: list[int] = _f(factory=lambda: [480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800])
    max_size: int = _f(1333, lo=16)
    val_scale: int = _f(800, lo=16)
    crop_prob: float = _f(0.5, lo=0.0, hi=1.0)
    crop_scales: list[int] = _f(factory=lambda: [400, 500, 600])
    crop_min: int = _f(384, lo=1)
    crop_max: int = _f(600, lo=1)
    hflip_prob: float = _f(0.5, lo=0.0, hi=1.0)


@dataclass
class BackboneConfig:
    name: str = _f("resnet50.tv_in1k", doc="timm model name with its weights tag; the papers use torchvision's "
                   "ImageNet V1 ResNet-50 (resnet50.tv_in1k); 'tiny' = the small SynthCOCO ResNet")
    pretrained: str = _f("imagenet", doc="'imagenet' (timm weights), 'none', 'pipeline' (the DAG's "
                         "pretrain_backbone stage), or a checkpoint path")
    dilation: bool = _f(False, doc="DC5: dilate the last stage (stride 16)")
    dilate_layer3: bool = _f(False, doc="also dilate the third stage (output stride 8; needs dilation)")
    freeze_bn: bool = True
    train_stem_and_layer1: bool = False
    channels: Optional[list[int]] = _f(None, doc="stage widths for the small 'tiny' backbone")


@dataclass
class ClusterAttentionConfig:
    """ACT's E2LSH clustering (and the matched K-means baseline) for the encoder."""
    rounds: int = _f(32, lo=1, hi=1024, doc="E2LSH hash rounds L (more rounds -> more prototypes)")
    bucket_width: float = _f(8.0, lo=1e-9, doc="E2LSH bucket width r (the paper's code: 8)")
    seed: int = _f(0, lo=0, doc="seeds the hash projections (layer i uses seed + i)")
    kmeans_iters: int = _f(10, lo=1, doc="Lloyd iterations of the K-means baseline")


@dataclass
class DeformableConfig:
    """Deformable DETR (arch: deformable): multi-scale deformable attention everywhere."""
    num_levels: int = _f(4, lo=1, hi=6, doc="backbone maps C3..C5 (the last min(n, 3 - skip_finest)) plus "
                         "stride-2 extra levels up to n")
    num_points: int = _f(4, lo=1, hi=16, doc="sampling points per head and level")
    two_stage: bool = _f(False, doc="decoder queries from the top-k encoder tokens (their refined anchors "
                         "as references)")
    two_stage_variant: Literal["deformable_detr", "sparse_detr"] = _f(
        "deformable_detr", doc="deformable_detr: Deformable DETR's ++two-stage (rank by the class-0 logit, "
        "positional and content queries from one 2d->2d projection of the anchors' sine embedding); "
        "sparse_detr: Sparse DETR's --eff_query_init --eff_specific_head (rank by the best class logit, "
        "content = the top-k memory, positional from a 2d->d projection). Both: the proposal head's "
        "input projection is what the scoring network reads; two-stage decoders always refine their "
        "boxes; deformable_detr trains its proposals class-agnostic, sparse_detr class-specific")
    box_refine: bool = _f(False, doc="iterative box refinement: unshared per-layer heads move the references")
    skip_finest: int = _f(0, lo=0, hi=2, doc="leave out the finest backbone maps (1 = no C3/S4: Lite DETR's "
                          "3-scale model, with num_levels: 3 -> C4, C5 + one extra level)")


@dataclass
class SparseConfig:
    """Sparse DETR's encoder sparsification (arch: deformable)."""
    rho: Optional[float] = _f(None, lo=1e-6, hi=1.0, doc="fraction of tokens the encoder updates (null = all)")
    saliency: Literal["dam", "objectness"] = _f(
        "dam", doc="scoring-network target: decoder cross-attention map, or an objectness set loss (ablation)")
    enc_aux_loss: bool = _f(True, doc="detection heads + set loss on the kept tokens after every encoder "
                            "layer but the last")


@dataclass
class LiteConfig:
    """Lite DETR's efficient encoder (arch: deformable)."""
    high_levels: Optional[int] = _f(None, lo=1, doc="H: the coarsest H scales are high-level tokens (null = the "
                                    "standard encoder, every token every layer)")
    blocks: int = _f(3, lo=1, doc="B: interleaved blocks")
    high_updates: int = _f(2, lo=1, doc="A: high-level updates per block (the low-level tokens get one)")
    low_update: Literal["joint", "separate"] = _f(
        "joint", doc="joint: the block's last layer updates every token (released code, A*B layers); separate: "
        "a low-level-only layer after the A high-level ones (paper figure, A*B + B layers)")
    low_ffn_dim: Optional[int] = _f(None, lo=1, doc="FFN width for low-level queries (null = ffn_dim; the "
                                    "released code's small_expand uses hidden_dim)")
    key_aware: bool = _f(False, doc="KDA: attention weights from the sampled keys (encoder and decoder)")


@dataclass
class ModelConfig:
    arch: Literal["detr", "deformable"] = "detr"
    backbone: BackboneConfig = _f(factory=BackboneConfig)
    hidden_dim: int = _f(256, lo=8)
    nheads: int = _f(8, lo=1)
    enc_layers: int = _f(6, lo=0)
    dec_layers: int = _f(6, lo=1)
    ffn_dim: int = _f(2048, lo=1)
    dropout: float = _f(0.1, lo=0.0, hi=1.0)
    num_queries: int = _f(100, lo=1)
    num_classes: int = _f(91, lo=1, doc="largest category id + 1 (COCO: 91)")
    aux_loss: bool = True
    pre_norm: bool = False
    box_reference: bool = _f(False, doc="learned per-query reference point; boxes are predicted as offsets "
                             "from it (Deformable DETR's parametrization). Off = DETR.")
    spatial_prior: bool = _f(False, doc="decoder cross-attention logits get -|p - r_q|^2 / (2 s_q^2) around the "
                             "query's reference point r_q with a learned scale s_q (a static form of SMCA's "
                             "Gaussian co-attention); needs box_reference. Off = DETR.")
    encoder_attention: Literal["dense", "act", "kmeans"] = _f(
        "dense", doc="encoder self-attention kernel; act/kmeans can be swapped into a trained model")
    act: ClusterAttentionConfig = _f(factory=ClusterAttentionConfig)
    deformable: DeformableConfig = _f(factory=DeformableConfig)
    sparse: SparseConfig = _f(factory=SparseConfig)
    lite: LiteConfig = _f(factory=LiteConfig)


@dataclass
class LossConfig:
    ce: float = _f(1.0, lo=0.0)
    l1: float = _f(5.0, lo=0.0)
    giou: float = _f(2.0, lo=0.0)
    eos_coef: float = _f(0.1, lo=0.0, hi=1.0)
    cost_class: float = _f(1.0, lo=0.0)
    cost_l1: float = _f(5.0, lo=0.0)
    cost_giou: float = _f(2.0, lo=0.0)
    focal_alpha: float = _f(0.25, lo=0.0, hi=1.0, doc="sigmoid focal loss (arch: deformable)")
    focal_gamma: float = _f(2.0, lo=0.0)
    saliency: float = _f(1.0, lo=0.0, doc="Sparse DETR scoring-network loss weight")


@dataclass
class LrScalingConfig:
    """How the LR follows the global batch (train.batch_size x max(train.gpus, 1)).

    none: the LRs as written (DETR, Deformable DETR: a fixed LR at their batch); sqrt:
    lr and lr_backbone times sqrt(global / base_batch) (Sparse DETR's main.py)."""
    rule: Literal["none", "sqrt"] = "none"
    base_batch: int = _f(16, lo=1, doc="the global batch the written LRs are for")


@dataclass
class TrainConfig:
    epochs: int = _f(300, lo=1)
    lr: float = _f(1e-4, lo=0.0, hi=1.0)
    lr_backbone: float = _f(1e-5, lo=0.0, hi=1.0)
    weight_decay: float = _f(1e-4, lo=0.0)
    lr_drop: int = _f(200, lo=1, doc="epoch at which the LR is multiplied by 0.1")
    warmup_iters: int = _f(0, lo=0)
    clip_max_norm: float = _f(0.1, lo=0.0)
    batch_size: int = _f(4, lo=1, doc="images per GPU (per process); the global batch is batch_size x "
                         "max(gpus, 1)")
    gpus: int = _f(0, lo=0, hi=1024, doc="GPUs (one torchrun process each) of this experiment's training; "
                   "0 = one process on the CPU; > 1 = the DAG launches torchrun --nproc_per_node=gpus")
    lr_scaling: LrScalingConfig = _f(factory=LrScalingConfig)
    num_workers: int = _f(2, lo=0)
    seed: int = _f(42, lo=0)
    amp: bool = _f(True, doc="bf16 autocast on CUDA; ignored on CPU")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    log_every_s: float = _f(30.0, lo=0.0)
    val_every: int = _f(0, lo=0, doc="evaluate the val split every N epochs while training (and after the "
                        "last): val_AP, val_AP50, ... in the history and MLflow; 0 = never")
    val_images: Optional[int] = _f(None, lo=1, doc="those evaluations use the first N val images (null = all)")
    checkpoint_every_iters: int = _f(200, lo=1)
    max_iters_per_epoch: Optional[int] = _f(None, lo=1, doc="cap (tiny test profile only)")
    threads: Optional[int] = _f(None, lo=1, doc="CPU threads of this experiment's train/eval jobs (null = all "
                                "the scheduler gives); 1 lets Snakemake run models that gain little from a "
                                "second thread side by side")


@dataclass
class EvalConfig:
    batch_size: int = _f(8, lo=1)
    num_workers: int = _f(2, lo=0)
    max_images: Optional[int] = _f(None, lo=1)
    flops_images: int = _f(20, lo=0, doc="val images over which GFLOPs are averaged (0 = skip)")
    fps_iters: int = _f(0, lo=0, doc="timed forward passes of the first val image per FPS batch size (0 = skip)")
    fps_warmup: int = _f(5, lo=0, doc="untimed passes before the FPS timing")
    fps_batch_sizes: list[int] = _f(factory=lambda: [1, 4], lo=1, doc="batches the FPS is measured at (the "
                                    "first val image repeated), as Sparse DETR's util/benchmark.py: fps_b<N>")
    amp: bool = _f(False, doc="evaluate (AP, FLOPs, FPS) under bf16 autocast on CUDA; the papers evaluate in "
                   "fp32, so the tables name the precision when this is on")


@dataclass
class PretrainConfig:
    """Backbone pre-training in the DAG (models with backbone.pretrained: pipeline)."""
    epochs: int = _f(3, lo=1)
    lr: float = _f(2e-3, lo=0.0, hi=1.0)
    weight_decay: float = _f(1e-4, lo=0.0)
    batch_size: int = _f(32, lo=1)
    seed: int = _f(0, lo=0)


@dataclass
class ProfileConfig:
    data: DataConfig
    input: InputConfig
    model: ModelConfig
    loss: LossConfig
    train: TrainConfig
    eval: EvalConfig
    pretrain: Optional[PretrainConfig] = None


@dataclass
class SweepConfig:
    """Expand one experiment into one per value of a profile key (e.g. ACT's rounds L)."""
    key: str = _f(doc="dotted key inside the profile, e.g. model.act.rounds")
    values: list = _f(factory=list)
    label: str = _f("", doc="name suffix: <experiment>_<label><value>, e.g. act_L32")


@dataclass
class DETRDistillConfig:
    """DETRDistill's parts and weights; a part is off at weight 0."""
    instance: float = _f(1.0, lo=0.0, doc="progressive instance distillation (per decoder stage, matched pairs)")
    instance_class: float = _f(1.0, lo=0.0, doc="class divergence weight within the instance term")
    instance_l1: float = _f(5.0, lo=0.0, doc="box L1 weight within the instance term")
    instance_giou: float = _f(2.0, lo=0.0, doc="1 - GIoU weight within the instance term")
    relation: float = _f(1.0, lo=0.0, doc="query-relation term (part of progressive instance distillation)")
    cost_class: float = _f(1.0, lo=0.0, doc="teacher-student matching cost: class divergence")
    cost_l1: float = _f(5.0, lo=0.0, doc="teacher-student matching cost: box L1")
    cost_giou: float = _f(2.0, lo=0.0, doc="teacher-student matching cost: -GIoU")
    feature: float = _f(1.0, lo=0.0, doc="attention-agnostic feature distillation")
    feature_source: Literal["encoder_input", "memory"] = _f(
        "encoder_input", doc="the imitated features: encoder_input = the projected backbone maps the encoder reads "
        "(official code: the neck outputs; DETR: the projected C5), memory = the encoder output (effdetr's first "
        "reading)")
    feature_mask: Literal["cosine_stages", "sigmoid_last"] = _f(
        "cosine_stages", doc="cosine_stages (official code): per teacher decoder stage, the quality-weighted cosine "
        "of its queries with the features, clamped >= 0.01, / its max per image and level; MSE(M*Ft, M*Fs) summed "
        "over stages. sigmoid_last (effdetr's first reading): sigmoid(q.F/sqrt(C)) of the last stage's queries, "
        "weighted by max score x IoU; mask-normalised squared error")
    feature_topk: int = _f(100, lo=1, doc="cosine_stages: the top-k (query, class) teacher scores that weight the "
                           "mask (official: test_cfg.max_per_img = 100)")
    assignment: float = _f(1.0, lo=0.0, doc="teacher-assisted assignment stream (weight of its set loss)")
    assignment_stages: Literal["per_stage", "final"] = _f(
        "per_stage", doc="the teacher assignment the stream is supervised with: per_stage (official pseudo_loss: "
        "stream stage k under the teacher's stage-k Hungarian matching) or final (effdetr's first reading: the "
        "teacher's last-stage matching for every stage)")


@dataclass
class DistillConfig:
    """Distil a trained teacher experiment into this one while it trains."""
    teacher: str = _f(doc="experiment whose checkpoint is the (frozen) teacher")
    method: Literal["mtkd", "detrdistill"] = _f(
        "mtkd", doc="mtkd: ACT's multi-task KD (teacher's class + box outputs, query i to query i); "
        "detrdistill: DETRDistill (matched instances, masked features, teacher-assisted assignment)")
    detrdistill: DETRDistillConfig = _f(factory=DETRDistillConfig)
    ce: float = _f(1.0, lo=0.0, doc="weight of KL(teacher || student) on class distributions")
    l1: float = _f(5.0, lo=0.0, doc="weight of L1 between teacher and student boxes")
    giou: float = _f(2.0, lo=0.0, doc="weight of 1 - GIoU between teacher and student boxes")
    temperature: float = _f(1.0, lo=1e-3, doc="softmax temperature of the class KL")


@dataclass
class ImportConfig:
    """A released checkpoint of an official repository (experiments with stages [import, eval])."""
    format: Literal["detr", "deformable_detr", "sparse_detr"] = _f(doc="its repository's state-dict layout")
    release: Optional[str] = _f(None, doc="a name in src/effdetr/convert/releases.yaml (downloaded and "
                                "verified into data/releases/)")
    file: Optional[str] = _f(None, doc="a local copy instead of the download")


@dataclass
class ExperimentConfig:
    """One row-producing experiment: the profile merged with these overrides."""
    paper: str
    table: str
    description: str = ""
    stages: list[str] = _f(factory=lambda: ["train", "eval"])
    overrides: dict = _f(factory=dict)
    profile_overrides: dict = _f(factory=dict)
    init_from: Optional[str] = _f(None, doc="experiment whose trained weights this one starts from "
                                  "(train) or evaluates (eval-only experiments)")
    sweep: Optional[SweepConfig] = None
    distill: Optional[DistillConfig] = None
    import_checkpoint: Optional[ImportConfig] = _f(None, doc="the released weights the import stage converts")
    profiles: Optional[list[str]] = _f(None, doc="profiles this experiment exists in (null = all), e.g. [coco] "
                                       "for released COCO checkpoints")
    family: Optional[str] = _f(None, doc="model family whose measured seed spread (params seed_spread) "
                               "decides when a claim between two of its rows is inconclusive")


@dataclass
class FlopsConfig:
    """Paper-scale FLOPs/params table: models are ModelConfig overrides of the coco profile."""
    input_sizes: list[list[int]] = _f(factory=lambda: [[800, 1066]])
    models: dict = _f(factory=dict)
    model_input_sizes: dict = _f(factory=dict, doc="model name -> its own input sizes, where its paper's "
                                 "protocol used other inputs (Sparse DETR: one 850x1040 proxy)")
    paper: str = "detr"
    table: str = "flops"


@dataclass
class SpeedConfig:
    """Encoder wall-clock, dense vs each clustered setting of a swept eval-only experiment
    (protocol in evaluation/speed.py)."""
    experiment: str = _f(doc="swept eval-only experiment (e.g. act): its init_from weights and its values")
    num_images: int = _f(20, lo=1)
    warmup: int = _f(2, lo=0)
    repeats: int = _f(5, lo=1)
    paper: str = "act"
    table: str = "act_speed"


@dataclass
class StageResources:
    """What one DAG job asks the scheduler for (Snakemake ``resources:``, SLURM sbatch flags).
    Scheduling only: no stage reads these, so editing them reruns nothing and leaves every
    params hash alone."""
    gpu: int = _f(0, lo=0, hi=1024, doc="GPUs; > 1 runs the command under torchrun (train: set train.gpus)")
    mem_mb: int = _f(4000, lo=1, doc="host memory, MB (sbatch --mem)")
    runtime: int = _f(60, lo=1, doc="wall-clock limit, minutes (sbatch --time)")
    cpus_per_task: int = _f(2, lo=1, doc="CPU cores (sbatch --cpus-per-task; data loaders included)")


# stage kinds of the DAG (stages.py); `default` applies to all of them
RESOURCE_KINDS = ("default", "data", "pretrain", "train", "import", "eval", "flops", "speed", "report")
# kinds whose command runs under torchrun when it asks for more than one GPU
DISTRIBUTED_KINDS = ("train", "eval")


@dataclass
class TrackingConfig:
    experiment: str = "effdetr"


@dataclass
class Params:
    profile: Literal["synth", "coco"]
    profiles: dict
    experiments: dict
    flops: FlopsConfig = _f(factory=FlopsConfig)
    speed: Optional[SpeedConfig] = None
    tracking: TrackingConfig = _f(factory=TrackingConfig)
    seed_spread: dict[str, list[str]] = _f(factory=dict, doc="family -> the experiments that repeat one "
                                           "representative with other seeds (training or hashing)")
    resources: dict = _f(factory=dict, doc="profile -> {<stage kind>: StageResources, experiments: {<experiment>: "
                         "{<stage kind>: StageResources}}}; see stage_resources")


# ---------------------------------------------------------------------------------------
# Generic conversion with errors that name file + key path
# ---------------------------------------------------------------------------------------
def _check_range(value, meta, file, path):
    lo, hi = meta.get("lo"), meta.get("hi")
    if value is None or not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    if lo is not None and value < lo:
        raise ConfigError(file, path, f"{value} is below the minimum {lo}")
    if hi is not None and value > hi:
        raise ConfigError(file, path, f"{value} is above the maximum {hi}")


_INT = re.compile(r"[-+]?[0-9]+")
_NUMBER = re.compile(r"[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?")


def _quoted_number_hint(value, pattern) -> str:
    """A number in quotes reaches us as text; say how to write it so YAML reads a number."""
    if isinstance(value, str) and pattern.fullmatch(value.strip()):
        return f" (text, not a number: write it without quotes, e.g. {value.strip()})"
    return ""


def _convert(tp, value, file, path, meta=None):
    meta = meta or {}
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, file, path, meta)
    if origin is Literal:
        if value not in args:
            raise ConfigError(file, path, f"{value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        return build(tp, value, file, path)
    if tp is list:
        if not isinstance(value, list):
            raise ConfigError(file, path, f"expected a list, got {type(value).__name__}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(file, path, f"expected a list, got {type(value).__name__}")
        return [_convert(args[0], v, file, f"{path}[{i}]", meta) for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(file, path, f"expected a mapping, got {type(value).__name__}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(file, path, f"expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(file, path, f"expected an integer, got {value!r}{_quoted_number_hint(value, _INT)}")
        _check_range(value, meta, file, path)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(file, path, f"expected a number, got {value!r}{_quoted_number_hint(value, _NUMBER)}")
        _check_range(float(value), meta, file, path)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(file, path, f"expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp} at {path}")


def build(cls, data, file, path, partial: bool = False):
    """Convert a mapping into dataclass ``cls``; ``partial`` checks an override only."""
    if not isinstance(data, dict):
        raise ConfigError(file, path, f"expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            raise ConfigError(file, f"{path}.{key}", f"unknown key (allowed: {', '.join(names)})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        sub = f"{path}.{f.name}"
        if f.name not in data:
            no_default = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            if no_default and not partial:
                raise ConfigError(file, sub, "missing required key")
            continue
        tp = hints[f.name]
        if partial and dataclasses.is_dataclass(_strip_optional(tp)) and isinstance(data[f.name], dict):
            kwargs[f.name] = build(_strip_optional(tp), data[f.name], file, sub, partial=True)
        else:
            kwargs[f.name] = _convert(tp, data[f.name], file, sub, dict(f.metadata))
    return kwargs if partial else cls(**kwargs)


def _strip_optional(tp):
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return inner[0]
    return tp


def deep_merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in (override or {}).items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def to_dict(obj) -> Any:
    if dataclasses.is_dataclass(obj):
        return dataclasses.asdict(obj)
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def canonical_json(obj) -> str:
    return json.dumps(to_dict(obj), sort_keys=True, separators=(",", ":"))


def params_hash(obj) -> str:
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------
class _DuplicateKey(yaml.YAMLError):
    """Raised while composing; read_yaml turns it into a ConfigError at the key's path."""

    def __init__(self, key_path: str, first: yaml.Mark, again: yaml.Mark):
        self.key_path, self.first, self.again = key_path, first, again
        if first.line == again.line:
            where = f"line {first.line + 1} (columns {first.column + 1} and {again.column + 1})"
        else:
            where = f"line {first.line + 1} and again at line {again.line + 1}"
        super().__init__(f"duplicate key, at {where}: YAML would silently keep only the last")


class ParamsLoader(yaml.SafeLoader):
    """SafeLoader for params files. Duplicate keys are errors (plain YAML keeps the last one,
    silently dropping the first), and YAML 1.2 floats such as ``1e-3`` are numbers (YAML 1.1
    needs a dot and a signed exponent, so it reads ``1e-3`` as text)."""

    def __init__(self, stream):
        super().__init__(stream)
        self._path: list[str] = []  # key path of the node being composed, e.g. [".train", ".lr"]

    def compose_node(self, parent, index):
        if isinstance(index, yaml.Node):  # a mapping value; index is its key
            part = f".{index.value}" if isinstance(index, yaml.ScalarNode) else ".<key>"
        elif isinstance(parent, yaml.SequenceNode):
            part = f"[{index}]"
        else:  # the root, or a mapping key
            return super().compose_node(parent, index)
        self._path.append(part)
        try:
            return super().compose_node(parent, index)
        finally:
            self._path.pop()

    def compose_mapping_node(self, anchor):
        # Checked on the composed node, before merge keys (<<) are flattened into it: a key
        # that overrides a merged one is not a duplicate.
        node = super().compose_mapping_node(anchor)
        seen: dict[Any, yaml.Mark] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:value":  # a plain "=" key, as PyYAML's merge reads it
                key_node.tag = "tag:yaml.org,2002:str"
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self._key(key_node)
            if key in seen:
                dotted = "".join(self._path + [f".{key_node.value}"]).lstrip(".")
                raise _DuplicateKey(dotted, seen[key], key_node.start_mark)
            seen[key] = key_node.start_mark
        return node

    def flatten_mapping(self, node):
        """Merge keys (<<) with YAML's rules: own keys beat merged ones, an earlier merged
        mapping beats a later one. PyYAML's own version keeps the first merged pair by the
        identity of the key string, so a chained merge (b: {<<: *a, y: 2}, c: {<<: *b}) gave c
        a's y, or b's, depending on whether the two strings happened to be one object."""
        merged, own = [], []
        for key_node, value_node in node.value:
            if key_node.tag != "tag:yaml.org,2002:merge":
                own.append((key_node, value_node))
                continue
            sources = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
            for source in sources:
                if not isinstance(source, yaml.MappingNode):
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping", node.start_mark,
                        f"expected a mapping or list of mappings for merging, but found {source.id}",
                        source.start_mark)
                self.flatten_mapping(source)  # now its keys are unique, own ones included
                merged.extend(source.value)
        taken = {self._key(k) for k, _ in own}
        kept = []
        for key_node, value_node in merged:
            if self._key(key_node) not in taken:
                taken.add(self._key(key_node))
                kept.append((key_node, value_node))
        node.value = kept + own

    def _key(self, key_node):
        return self.construct_object(key_node) if isinstance(key_node, yaml.ScalarNode) else id(key_node)


ParamsLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def _decode(data: bytes, path: Path) -> str:
    """UTF-8 text, or an error naming the line and column of the first bad byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line_start = data.rfind(b"\n", 0, e.start) + 1
        line, column = data.count(b"\n", 0, e.start) + 1, e.start - line_start + 1
        raise ConfigError(path, "<file>", f"not UTF-8 text: byte 0x{data[e.start]:02x} at line {line}, "
                          f"column {column} (byte offset {e.start}); save the file as UTF-8") from None


def read_yaml(path: str | Path) -> dict:
    """Parse a params file with :class:`ParamsLoader`; every failure is a ConfigError."""
    path = Path(path)
    return _parse_yaml(_read_bytes(path), path)


def _read_bytes(path: Path) -> bytes:
    if not path.exists():
        raise ConfigError(path, "<file>", "params file not found")
    if path.is_dir():
        raise ConfigError(path, "<file>", "is a directory, not a params file")
    try:
        return path.read_bytes()
    except OSError as e:
        raise ConfigError(path, "<file>", f"cannot read the params file: {e.strerror or e}") from None


def _parse_yaml(data: bytes, path: Path) -> dict:
    loader = ParamsLoader(_decode(data, path))
    loader.name = str(path)  # YAML error marks then name the file, not "<unicode string>"
    try:
        raw = loader.get_single_data()
    except _DuplicateKey as e:
        raise ConfigError(path, e.key_path, str(e)) from None
    except yaml.YAMLError as e:
        raise ConfigError(path, "<file>", f"not valid YAML: {e}") from None
    finally:
        loader.dispose()
    if not isinstance(raw, dict):
        raise ConfigError(path, "<root>", "expected a mapping at the top level")
    return raw


def validate_raw(raw: dict, file: str | Path) -> Params:
    """Validate the whole file: every profile fully, every experiment's merged config."""
    params = build(Params, raw, file, "params")
    for name, prof in params.profiles.items():
        _profile_from_dict(prof, file, f"profiles.{name}")
    if params.profile not in params.profiles:
        raise ConfigError(file, "profile", f"{params.profile!r} has no entry under profiles "
                          f"(have: {sorted(params.profiles)})")
    expanded = expand_experiments(params.experiments, file)
    resolved: dict[tuple[str, str], tuple[ExperimentConfig, str, ProfileConfig]] = {}
    for name, (source, exp) in expanded.items():
        e = build(ExperimentConfig, exp, file, f"experiments.{source}")
        for stage in e.stages:
            if stage not in ("train", "eval", "import"):
                raise ConfigError(file, f"experiments.{source}.stages", f"unknown stage {stage!r} "
                                  "(train, import, eval)")
        _check_import(e, file, f"experiments.{source}")
        if e.profiles is not None and not e.profiles:
            raise ConfigError(file, f"experiments.{source}.profiles", "is empty: list the profiles the experiment "
                              "exists in, or leave the key out for all")
        for pname in list(e.profile_overrides) + (e.profiles or []):
            if pname not in params.profiles:
                raise ConfigError(file, f"experiments.{source}.profile_overrides.{pname}"
                                  if pname in e.profile_overrides else f"experiments.{source}.profiles",
                                  f"no such profile {pname!r}")
        _check_references(name, source, e, expanded, file)
        where = f"experiments.{source}"
        if e.sweep:
            raw_sweep = params.experiments[source]["sweep"]
            i = [sweep_name(source, raw_sweep, v) for v in e.sweep.values].index(name)
            where += f".sweep.values[{i}] ({name}, {e.sweep.key})"
        for pname in e.profiles or params.profiles:
            merged = deep_merge(deep_merge(params.profiles[pname], e.overrides),
                                e.profile_overrides.get(pname, {}))
            where_p = f"{where}(profile {pname})"
            resolved[name, pname] = e, where_p, _profile_from_dict(merged, file, where_p)
            if e.import_checkpoint is not None:
                _check_import_model(e.import_checkpoint, resolved[name, pname][2].model, file, where_p)
    # Pairs (weights reused, teacher distilled), now that every experiment resolved alone.
    for (name, pname), (e, where_p, prof) in resolved.items():
        for ref in (e.init_from, e.distill.teacher if e.distill else None):
            if ref and (ref, pname) not in resolved:
                raise ConfigError(file, f"{where_p}.{'init_from' if ref == e.init_from else 'distill.teacher'}",
                                  f"{ref!r} does not exist in profile {pname!r} (its experiments.{ref}.profiles); "
                                  f"restrict this experiment with profiles: too")
        if e.init_from:
            _check_init_architecture(prof.model, resolved[e.init_from, pname][2].model, e.init_from, file,
                                     f"{where_p}.init_from")
        if e.distill and e.distill.method == "detrdistill":
            _check_detrdistill_pair(resolved[e.distill.teacher, pname][2].model, prof.model, e.distill.detrdistill,
                                    file, f"experiments.{expanded[name][0]}(profile {pname}).distill")
    for fam, runs in params.seed_spread.items():
        if not isinstance(runs, list) or len(runs) < 2:
            raise ConfigError(file, f"seed_spread.{fam}", "needs a list of at least two runs to measure a spread")
        for i, run in enumerate(runs):
            if run not in expanded:
                raise ConfigError(file, f"seed_spread.{fam}[{i}]", f"{run!r} is not an experiment")
    for fam, runs in params.seed_spread.items():
        _check_seed_runs(fam, runs, resolved, params.profiles, file)
    for name, (source, exp) in expanded.items():
        fam = exp.get("family")
        if fam is not None and fam not in params.seed_spread:
            raise ConfigError(file, f"experiments.{source}.family", f"{fam!r} has no runs under seed_spread "
                              f"(have: {', '.join(params.seed_spread) or 'none'})")
    _check_resources(params, expanded, file)
    if params.speed is not None:
        src = params.experiments.get(params.speed.experiment)
        if not isinstance(src, dict) or not src.get("sweep") or not src.get("init_from") \
                or "train" in src.get("stages", ["train"]):
            raise ConfigError(file, "speed.experiment", f"{params.speed.experiment!r} must be a swept "
                              "eval-only experiment with init_from (e.g. act)")
    coco_model = params.profiles.get("coco", {}).get("model", {})
    for name, over in params.flops.models.items():
        build(ModelConfig, deep_merge(coco_model, over), file, f"flops.models.{name}")
    sizes = {"flops.input_sizes": params.flops.input_sizes}
    for name, value in params.flops.model_input_sizes.items():
        if name not in params.flops.models:
            raise ConfigError(file, f"flops.model_input_sizes.{name}", "not a model under flops.models")
        sizes[f"flops.model_input_sizes.{name}"] = value
    for key, value in sizes.items():
        if not isinstance(value, list) or not value:
            raise ConfigError(file, key, "expected a non-empty list of [height, width]")
        for i, size in enumerate(value):
            if not isinstance(size, list) or len(size) != 2 or not all(isinstance(x, int) for x in size) \
                    or min(size) < 16:
                raise ConfigError(file, f"{key}[{i}]", "expected [height, width], integers >= 16")
    return params


def _check_resources(params: Params, expanded: dict, file) -> None:
    for pname, table in params.resources.items():
        where = f"resources.{pname}"
        if pname not in params.profiles:
            raise ConfigError(file, where, f"no such profile {pname!r} (have: {sorted(params.profiles)})")
        if not isinstance(table, dict):
            raise ConfigError(file, where, f"expected a mapping, got {type(table).__name__}")
        _check_resource_kinds(table, file, where, allow_experiments=True)
        exps = table.get("experiments") or {}
        if not isinstance(exps, dict):
            raise ConfigError(file, f"{where}.experiments", f"expected a mapping, got {type(exps).__name__}")
        known = set(expanded) | {source for source, _ in expanded.values()}
        for name, kinds in exps.items():
            if name not in known:
                raise ConfigError(file, f"{where}.experiments.{name}", "not an experiment (a swept experiment's "
                                  "name covers all its values, <name>_<label><value> one of them)")
            if not isinstance(kinds, dict):
                raise ConfigError(file, f"{where}.experiments.{name}", "expected a mapping of stage kinds")
            _check_resource_kinds(kinds, file, f"{where}.experiments.{name}", allow_experiments=False)


def _check_resource_kinds(table: dict, file, where: str, allow_experiments: bool) -> None:
    for kind, values in table.items():
        if kind == "experiments" and allow_experiments:
            continue
        if kind not in RESOURCE_KINDS:
            raise ConfigError(file, f"{where}.{kind}", f"unknown stage kind (allowed: {', '.join(RESOURCE_KINDS)}"
                              f"{', experiments' if allow_experiments else ''})")
        build(StageResources, values, file, f"{where}.{kind}", partial=True)
        if kind == "train" and "gpu" in values:
            raise ConfigError(file, f"{where}.train.gpu", "a training's GPUs are train.gpus (they set the global "
                              "batch, so they are a training param): set that instead")
        if kind not in DISTRIBUTED_KINDS and values.get("gpu", 0) > 1:
            raise ConfigError(file, f"{where}.{kind}.gpu", f"{values['gpu']}: {kind} runs in one process, so one "
                              f"GPU at most (only {', '.join(DISTRIBUTED_KINDS)} run under torchrun)")


def stage_resources(raw: dict, kind: str, experiment: tuple[str, str] | None = None,
                    train_gpus: int | None = None) -> dict:
    """One stage's resources: code defaults <- resources.<profile>.default <- .<kind> <- the
    experiment's (its params name, then its swept name) <- train.gpus for training."""
    table = (raw.get("resources") or {}).get(raw["profile"]) or {}
    merged = dataclasses.asdict(StageResources())
    layers = [table.get("default") or {}, table.get(kind) or {}]
    if experiment:
        name, source = experiment
        exps = table.get("experiments") or {}
        layers += [(exps.get(source) or {}).get(kind) or {}]
        if name != source:
            layers += [(exps.get(name) or {}).get(kind) or {}]
    for layer in layers:
        merged.update(layer)
    if kind == "train" and train_gpus is not None:
        merged["gpu"] = train_gpus
    return merged


def _nest(dotted: str, value) -> dict:
    out: Any = value
    for part in reversed(dotted.split(".")):
        out = {part: out}
    return out


def sweep_name(name: str, sweep: dict, value) -> str:
    text = str(value).replace(".", "p").replace("-", "m")
    return f"{name}_{sweep.get('label', '')}{text}"


def expand_experiments(experiments: dict, file) -> dict[str, tuple[str, dict]]:
    """name -> (name in params.yaml, experiment mapping): a swept experiment becomes one
    experiment per value, the value folded into its overrides (``sweep`` kept for labels)."""
    out: dict[str, tuple[str, dict]] = {}
    for name, exp in experiments.items():
        if not isinstance(exp, dict):
            raise ConfigError(file, f"experiments.{name}", f"expected a mapping, got {type(exp).__name__}")
        if exp.get("sweep") is None:
            out[name] = (name, exp)
            continue
        sweep = build(SweepConfig, exp["sweep"], file, f"experiments.{name}.sweep")
        if not all(part.strip() for part in sweep.key.split(".")):
            raise ConfigError(file, f"experiments.{name}.sweep.key", f"{sweep.key!r} must be a dotted key path "
                              "inside the profile, like model.act.rounds, with no empty parts")
        if not sweep.values:
            raise ConfigError(file, f"experiments.{name}.sweep.values", "needs at least one value")
        if len(set(map(str, sweep.values))) != len(sweep.values):
            raise ConfigError(file, f"experiments.{name}.sweep.values", "values repeat")
        for i, value in enumerate(sweep.values):
            if not isinstance(value, (int, float, str)) or isinstance(value, bool):
                raise ConfigError(file, f"experiments.{name}.sweep.values[{i}]", f"{value!r} is not a scalar")
            child = dict(exp, overrides=deep_merge(exp.get("overrides", {}), _nest(sweep.key, value)))
            out[sweep_name(name, exp["sweep"], value)] = (name, child)
    return out


# Model fields that may differ between a checkpoint and the config using it: they change how
# trained weights are used (ACT's drop-in kernels), never which weights exist.
INFERENCE_ONLY = ("encoder_attention", "act")


def architecture(model: dict) -> dict:
    """The part of a model config (as a dict) that fixes its weights."""
    out = {k: v for k, v in model.items() if k not in INFERENCE_ONLY}
    out["backbone"] = {k: v for k, v in model.get("backbone", {}).items() if k != "pretrained"}
    return out


def first_difference(a, b, prefix: str = ""):
    """(dotted key, a's value, b's value) of the first nested difference, or None."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            d = first_difference(a.get(k), b.get(k), f"{prefix}{k}.")
            if d:
                return d
        return None
    return (prefix.rstrip("."), a, b) if a != b else None


def _check_references(name: str, source: str, e: ExperimentConfig, expanded: dict, file) -> None:
    """init_from / distill.teacher must name a trained experiment (not this one); an
    eval-only experiment must say which weights it evaluates."""
    refs = [("init_from", e.init_from)] + ([("distill.teacher", e.distill.teacher)] if e.distill else [])
    for key, ref in refs:
        if ref is None:
            continue
        if ref == name or ref == source:
            raise ConfigError(file, f"experiments.{source}.{key}", "an experiment cannot start from itself")
        if ref not in expanded:
            raise ConfigError(file, f"experiments.{source}.{key}",
                              f"{ref!r} is not an experiment (have: {', '.join(sorted(expanded))})")
        ref_stages = build(ExperimentConfig, expanded[ref][1], file, f"experiments.{ref}").stages
        if "train" not in ref_stages and "import" not in ref_stages:
            raise ConfigError(file, f"experiments.{source}.{key}", f"{ref!r} has no train or import stage, "
                              "so no checkpoint")
    if "train" not in e.stages and "import" not in e.stages and e.init_from is None:
        raise ConfigError(file, f"experiments.{source}.init_from",
                          "an eval-only experiment must name the trained experiment it evaluates")
    if e.distill and "train" not in e.stages:
        raise ConfigError(file, f"experiments.{source}.distill", "distillation needs a train stage")


def _seedless(e: ExperimentConfig, prof: ProfileConfig) -> dict:
    """What a spread run shares with the other runs of its family: everything but the seeds."""
    cfg = dataclasses.asdict(prof)
    cfg["train"].pop("seed")
    cfg["model"]["act"].pop("seed")
    return {**cfg, "init_from": e.init_from, "distill": dataclasses.asdict(e.distill) if e.distill else None,
            "stages": e.stages}


def _check_seed_runs(fam: str, runs: list[str], resolved: dict, profiles: dict, file) -> None:
    """A family's repeated runs must be one experiment with other seeds (training or hash),
    else their spread would measure an architecture or schedule difference."""
    for pname in profiles:
        have = [r for r in runs if (r, pname) in resolved]
        if not have:
            continue
        if len(have) != len(runs):
            raise ConfigError(file, f"seed_spread.{fam}", f"runs {sorted(set(runs) - set(have))} do not exist in "
                              f"profile {pname!r} while {have} do")
        base = _seedless(resolved[have[0], pname][0], resolved[have[0], pname][2])
        for run in have:
            e, _, prof = resolved[run, pname]
            if "eval" not in e.stages:
                raise ConfigError(file, f"seed_spread.{fam}", f"{run!r} has no eval stage to measure")
            diff = first_difference(base, _seedless(e, prof))
            if diff:
                key, a, b = diff
                raise ConfigError(file, f"seed_spread.{fam}", f"{run!r} differs from {have[0]!r} in {key} ({b!r} vs "
                                  f"{a!r}, profile {pname}); a spread run may differ only in train.seed or "
                                  "model.act.seed")


def _check_import(e: ExperimentConfig, file, path: str) -> None:
    """stages [import, eval] <-> an import_checkpoint naming a known release or a file."""
    has_stage = "import" in e.stages
    if has_stage != (e.import_checkpoint is not None):
        raise ConfigError(file, f"{path}.import_checkpoint" if has_stage else f"{path}.stages",
                          "the import stage needs an import_checkpoint" if has_stage else
                          "import_checkpoint is only read by the import stage (stages: [import, eval])")
    if not has_stage:
        return
    if "train" in e.stages or e.init_from:
        raise ConfigError(file, f"{path}.stages", "an imported experiment's weights come from the release: "
                          "no train stage and no init_from")
    imp = e.import_checkpoint
    if not imp.release and not imp.file:
        raise ConfigError(file, f"{path}.import_checkpoint", "needs release (a name in "
                          "src/effdetr/convert/releases.yaml) or file (a local checkpoint)")
    if imp.release:
        from .convert.releases import releases
        known = releases()
        if imp.release not in known:
            raise ConfigError(file, f"{path}.import_checkpoint.release", f"unknown release {imp.release!r} "
                              f"(known: {', '.join(known)})")
        if known[imp.release]["format"] != imp.format:
            raise ConfigError(file, f"{path}.import_checkpoint.format", f"{imp.format!r}, but release "
                              f"{imp.release!r} is in the {known[imp.release]['format']!r} layout")


def _check_import_model(imp: ImportConfig, m: ModelConfig, file, path: str) -> None:
    """The model an import fills must be one its repository can have built, checked before
    anything is downloaded."""
    need = {"detr": (m.arch == "detr", "model.arch: detr"),
            "deformable_detr": (m.arch == "deformable" and m.sparse.rho is None and m.lite.high_levels is None
                                and not m.lite.key_aware and (not m.deformable.two_stage or (
                                    m.deformable.box_refine and m.deformable.two_stage_variant == "deformable_detr")),
                                "model.arch: deformable without sparse/lite; two-stage only with box_refine and "
                                "two_stage_variant deformable_detr"),
            "sparse_detr": (m.arch == "deformable" and m.sparse.rho is not None and m.lite.high_levels is None
                            and (not m.deformable.two_stage or m.deformable.two_stage_variant == "sparse_detr"),
                            "model.arch: deformable with model.sparse.rho; two-stage with two_stage_variant "
                            "sparse_detr")}
    ok, what = need[imp.format]
    if not ok:
        raise ConfigError(file, f"{path}.import_checkpoint.format", f"{imp.format!r} checkpoints need {what}")


def _check_init_architecture(model: ModelConfig, ref_model: ModelConfig, ref: str, file, path) -> None:
    """An experiment starting from (or evaluating) ``ref``'s weights must build the same
    weights: caught here, before ``ref`` trains, not when its checkpoint fails to load."""
    diff = first_difference(architecture(dataclasses.asdict(model)), architecture(dataclasses.asdict(ref_model)))
    if diff:
        key, mine, theirs = diff
        raise ConfigError(file, path, f"{ref!r} trains model.{key} = {theirs!r} but this experiment builds "
                          f"{mine!r}; its weights would not fit (only {', '.join(INFERENCE_ONLY)} may differ)")


def _check_detrdistill_pair(teacher: ModelConfig, student: ModelConfig, dd: DETRDistillConfig, file, path) -> None:
    """What DETRDistill needs of a teacher/student pair, checked before anything trains."""
    if teacher.arch != student.arch:
        raise ConfigError(file, f"{path}.teacher", f"teacher arch {teacher.arch!r} and student arch "
                          f"{student.arch!r} differ; DETRDistill's class terms need one family")
    if dd.feature > 0:
        # the token grid, not the trunk: R101 -> R50 (the paper's pairs) share every stride
        layout = lambda m: (m.backbone.dilation, m.backbone.dilate_layer3,  # noqa: E731
                            m.deformable.num_levels, m.deformable.skip_finest)
        if layout(teacher) != layout(student):
            raise ConfigError(file, f"{path}.detrdistill.feature", "feature distillation needs the same feature "
                              f"tokens in teacher and student (backbone dilation/dilate_layer3, levels): teacher "
                              f"{layout(teacher)}, student {layout(student)}")
    if dd.assignment > 0:
        two_stage = [who for who, m in (("teacher", teacher), ("student", student))
                     if m.arch == "deformable" and m.deformable.two_stage]
        if two_stage:
            raise ConfigError(file, f"{path}.detrdistill.assignment", f"the {' and '.join(two_stage)} draw(s) decoder "
                              "queries from the image (deformable.two_stage); the teacher-assisted stream needs "
                              "learned queries on both sides (set assignment: 0)")
        if student.spatial_prior and not teacher.spatial_prior and teacher.num_queries != student.num_queries:
            raise ConfigError(file, f"{path}.detrdistill.assignment", "the student's per-query spatial prior has "
                              f"{student.num_queries} widths and the teacher none for its {teacher.num_queries} "
                              "queries")


def global_batch(t: TrainConfig) -> int:
    """Images per optimiser step over all processes."""
    return t.batch_size * max(t.gpus, 1)


def lr_factor(t: TrainConfig) -> float:
    """What train.lr_scaling multiplies the written LRs by at this global batch."""
    return math.sqrt(global_batch(t) / t.lr_scaling.base_batch) if t.lr_scaling.rule == "sqrt" else 1.0


def _check_train(t: TrainConfig, file, path) -> None:
    """GPU count, device and LR rule agree; then the LRs become the ones training uses."""
    if t.gpus > 0 and t.device == "cpu":
        raise ConfigError(file, f"{path}.train.gpus", f"{t.gpus} GPUs with train.device: cpu; set device: cuda "
                          "(or auto), or gpus: 0 for one CPU process")
    factor = lr_factor(t)
    for key in ("lr", "lr_backbone"):
        if getattr(t, key) * factor > 1.0:
            raise ConfigError(file, f"{path}.train.{key}", f"{getattr(t, key)} x {factor:.4g} (lr_scaling "
                              f"{t.lr_scaling.rule}, global batch {global_batch(t)}) is above the maximum 1.0")
    # applied once, here, where the file's values are resolved: train.py reads the final LRs, and the
    # params hash / MLflow params see them beside the rule that made them
    t.lr, t.lr_backbone = t.lr * factor, t.lr_backbone * factor


def _profile_from_dict(d: dict, file, path) -> ProfileConfig:
    prof = build(ProfileConfig, d, file, path)
    _check_train(prof.train, file, path)
    if prof.data.dataset == "synth" and prof.data.synth is None:
        raise ConfigError(file, f"{path}.data.synth", "dataset 'synth' needs a synth section")
    if len(prof.data.area_ranges) != 2 or not 0 < prof.data.area_ranges[0] < prof.data.area_ranges[1]:
        raise ConfigError(file, f"{path}.data.area_ranges", "expected [small_max_side, medium_max_side], increasing")
    s = prof.data.synth
    if s is not None:
        if s.min_side > s.max_side or s.max_side > s.image_size:
            raise ConfigError(file, f"{path}.data.synth.max_side", "need min_side <= max_side <= image_size")
        if s.min_objects > s.max_objects:
            raise ConfigError(file, f"{path}.data.synth.min_objects", "must not exceed max_objects")
    m = prof.model
    if m.backbone.pretrained == "pipeline" and prof.pretrain is None:
        raise ConfigError(file, f"{path}.model.backbone.pretrained", "'pipeline' needs a pretrain section in the profile")
    if m.spatial_prior and not m.box_reference:
        raise ConfigError(file, f"{path}.model.spatial_prior", "needs model.box_reference: true (the prior is "
                          "centred on each query's reference point)")
    if m.hidden_dim % m.nheads:
        raise ConfigError(file, f"{path}.model.nheads", f"hidden_dim {m.hidden_dim} is not divisible by {m.nheads}")
    if m.backbone.dilate_layer3 and not m.backbone.dilation:
        raise ConfigError(file, f"{path}.model.backbone.dilate_layer3", "needs model.backbone.dilation: true "
                          "(stride 8 dilates the third stage on top of DC5's fourth)")
    if m.backbone.dilate_layer3 and m.arch != "detr":
        raise ConfigError(file, f"{path}.model.backbone.dilate_layer3", "is for single-scale DETR; the multi-scale "
                          "detectors take C3-C5 at strides 8/16/32 (needs model.arch: detr)")
    if m.deformable.skip_finest and m.arch != "deformable":
        raise ConfigError(file, f"{path}.model.deformable.skip_finest", "needs model.arch: deformable")
    lite_set = {k for k, v in dataclasses.asdict(m.lite).items() if v != getattr(LiteConfig(), k)}
    if m.lite.high_levels is None and lite_set - {"high_levels", "key_aware"}:
        raise ConfigError(file, f"{path}.model.lite.{sorted(lite_set - {'high_levels', 'key_aware'})[0]}",
                          "only applies to the interleaved encoder; set model.lite.high_levels (H)")
    if m.lite.high_levels is not None or m.lite.key_aware:
        if m.arch != "deformable":
            raise ConfigError(file, f"{path}.model.lite", "needs model.arch: deformable")
        if m.lite.high_levels is not None and m.lite.high_levels >= m.deformable.num_levels:
            raise ConfigError(file, f"{path}.model.lite.high_levels", f"H = {m.lite.high_levels} leaves no low-level "
                              f"scale of the {m.deformable.num_levels} levels (need H < model.deformable.num_levels)")
        lt = m.lite
        n_layers = lt.high_updates * lt.blocks + (lt.blocks if lt.low_update == "separate" else 0)
        if lt.high_levels is not None and m.enc_layers != n_layers:
            raise ConfigError(file, f"{path}.model.enc_layers", f"is {m.enc_layers} but the interleaved encoder "
                              f"(A={lt.high_updates}, B={lt.blocks}, low_update {lt.low_update}) has {n_layers} "
                              f"layers; set enc_layers: {n_layers}")
        if m.lite.high_levels is not None and m.sparse.rho is not None:
            raise ConfigError(file, f"{path}.model.lite.high_levels", "the interleaved encoder and Sparse DETR's "
                              "sparse encoder are alternatives; unset one (model.sparse.rho)")
    if m.arch != "deformable" and m.sparse.rho is not None:
        raise ConfigError(file, f"{path}.model.sparse.rho", "needs model.arch: deformable")
    if m.arch == "deformable" and (m.encoder_attention != "dense" or m.box_reference or m.spatial_prior):
        raise ConfigError(file, f"{path}.model.arch", "deformable has its own attention and references: set "
                          "encoder_attention: dense, box_reference: false, spatial_prior: false")
    fps = prof.eval.fps_batch_sizes
    if not fps or len(set(fps)) != len(fps):
        raise ConfigError(file, f"{path}.eval.fps_batch_sizes", f"{fps} needs at least one batch size, each once")
    if not prof.input.train_scales:
        raise ConfigError(file, f"{path}.input.train_scales", "needs at least one scale")
    return prof


# load_params' results per (file, content digest): one command reads the params file several
# times (its experiment, its profile, the stage table), and parsing + validating costs ~1 s
_LOADED: dict[tuple[str, str], tuple[Params, dict]] = {}


def load_params(path: str | Path) -> tuple[Params, dict]:
    """The validated params and the raw mapping of a params file (fresh copies per call, so
    a caller's edit never leaks into another's)."""
    data = _read_bytes(Path(path))
    key = (str(Path(path).resolve()), hashlib.sha256(data).hexdigest())
    if key not in _LOADED:  # the digest's own bytes are parsed: an edit in between cannot mix
        raw = _parse_yaml(data, Path(path))
        _LOADED[key] = copy.deepcopy((validate_raw(raw, path), raw))
    return copy.deepcopy(_LOADED[key])


def profile_config(path: str | Path, profile: str | None = None) -> ProfileConfig:
    params, raw = load_params(path)
    name = profile or params.profile
    return _profile_from_dict(raw["profiles"][name], path, f"profiles.{name}")


def experiment_config(path: str | Path, experiment: str) -> tuple[ProfileConfig, ExperimentConfig]:
    """The resolved config an experiment's commands read (profile + its overrides)."""
    params, raw = load_params(path)
    expanded = expand_experiments(params.experiments, path)
    if experiment not in expanded:
        raise ConfigError(path, f"experiments.{experiment}",
                          f"no such experiment (have: {', '.join(sorted(expanded))})")
    source, exp_raw = expanded[experiment]
    exp = build(ExperimentConfig, exp_raw, path, f"experiments.{source}")
    if exp.profiles and params.profile not in exp.profiles:
        raise ConfigError(path, f"experiments.{source}.profiles", f"{experiment} exists only in profiles "
                          f"{exp.profiles}, not in the active profile {params.profile!r}")
    merged = deep_merge(deep_merge(raw["profiles"][params.profile], exp.overrides),
                        exp.profile_overrides.get(params.profile, {}))
    return _profile_from_dict(merged, path, f"experiments.{experiment}"), exp


def flops_model_configs(path: str | Path) -> dict[str, ModelConfig]:
    params, raw = load_params(path)
    coco_model = raw.get("profiles", {}).get("coco", {}).get("model", {})
    return {n: build(ModelConfig, deep_merge(coco_model, o), path, f"flops.models.{n}")
            for n, o in params.flops.models.items()}
