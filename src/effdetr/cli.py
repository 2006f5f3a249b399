"""The `effdetr` command: every Snakemake rule and DVC stage calls exactly one subcommand.

Commands take paths, the params file and an experiment name; hyperparameters are never
flags. Each compute command is one MLflow run (see effdetr.tracking).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from . import config as C


def _write_json(obj, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, allow_nan=True) + "\n")
    tmp.replace(path)


def _write_record(path: str | Path, metrics: dict, record: dict, history: list | None = None) -> None:
    """A stage's metrics (numbers only) to ``path``; what made them to its provenance sidecar;
    a training's per-epoch history to its history file (utils/records.py)."""
    from .utils.records import history_path, provenance_path
    if history is not None:
        _write_json(history, history_path(path))
    _write_json(record, provenance_path(path))
    _write_json(metrics, path)  # last: the file Snakemake and DVC wait for


def _log_record(run, path: str | Path) -> None:
    """The metrics file and, where written, its provenance sidecar and history, as artifacts."""
    from .utils.records import history_path, provenance_path
    for p in (Path(path), provenance_path(path), history_path(path)):
        if p.exists():
            run.log_artifact(p)


def _experiment(params, paper: str) -> str:
    """The MLflow experiment of a stage: one per paper (``<tracking.experiment>/act``, ...),
    and ``<tracking.experiment>/pipeline`` for the stages every paper shares (data, backbone)."""
    return f"{params.tracking.experiment}/{paper if paper not in ('all', '-', '') else 'pipeline'}"


def _tags(stage: str, paper: str, table: str, phash: str, experiment: str = "", profile: str = "") -> dict:
    """effdetr's own tags, and MLflow's system tags (the UI's source, commit and user columns)."""
    import getpass

    from .utils.repro import git_info
    g = git_info()
    system = {"mlflow.source.name": f"effdetr {stage}", "mlflow.source.type": "LOCAL",
              "mlflow.user": getpass.getuser()}
    if g["sha"] != "unknown":
        system["mlflow.source.git.commit"] = g["sha"]
    return {"paper": paper, "table": table, "stage": stage, "experiment": experiment, "profile": profile,
            "git_sha": g["sha"], "git_dirty": str(g["dirty"]).lower(), "params_hash": phash, **system}


def _provenance(run, phash: str) -> dict:
    from .utils.repro import environment, git_info
    return {"git": git_info(), "params_hash": phash, "mlflow_run_id": run.run_id, "sidecar": run.uid,
            "environment": environment()}


# ---------------------------------------------------------------------------------------
def cmd_data(args) -> None:
    """Make (synth) or download/link (coco) a dataset, then decode every image once and record
    its manifest beside the root; ``verify`` checks only, ``manifest`` records an edit."""
    params, raw = C.load_params(args.params)
    prof = C.profile_config(args.params)
    from .data import manifest
    from .tracking import Run
    if args.action == "synth":
        if prof.data.synth is None:
            raise C.ConfigError(args.params, f"profiles.{params.profile}.data.synth", "missing (active profile is not synth)")
        from .data.synthcoco import generate
        phash = C.params_hash(prof.data)
        with Run(_experiment(params, "all"), "data-synth", _tags("data", "all", "-", phash, profile=params.profile),
                 {"data": C.to_dict(prof.data)}) as run:
            t0 = time.time()
            summary = generate(prof.data.synth, args.out)
            run.log_metrics({f"{s}_{k}": v for s, d in summary.items() for k, v in d.items()} |
                            {"seconds": time.time() - t0})
            _write_json({"summary": summary, "params_hash": phash}, Path(args.out) / "manifest.json")
        print(f"[data] SynthCOCO written to {args.out}: {summary}")
    elif args.action == "coco":
        from .data.download import prepare_coco
        if prof.data.coco is None:
            raise C.ConfigError(args.params, f"profiles.{params.profile}.data.coco", "missing (active profile is not coco)")
        prepare_coco(prof.data.coco, args.out)
    splits = manifest.available_splits(prof.data.dataset, args.out)
    if not splits:
        raise FileNotFoundError(f"{args.out}: no split has both its annotation file and its image folder")
    if args.action != "manifest":
        from .data.verify import verify_splits
        for s in verify_splits(prof, args.out, splits).values():
            print(f"[verify] {s['annotations']}: {s['images']} images ({s['decoded']} decoded, the others unchanged "
                  f"since they passed), {s['boxes']} boxes kept, {s['dropped']} dropped (no area inside the image)")
    if args.action != "verify":
        changed = manifest.refresh(prof.data.dataset, args.out)
        print(f"[data] {manifest.manifest_path(args.out)}: " + (f"updated: {'; '.join(changed)}" if changed else
                                                                 "unchanged"))


def _validation_dataset(cfg, data_root):
    """The val split as the in-training validation reads it: its first train.val_images images."""
    from .data.coco import CocoDetection, split_paths
    from .data.transforms import build_transforms
    img_dir, ann = split_paths(cfg.data, "val", data_root)
    return CocoDetection(img_dir, ann, build_transforms(cfg.input, train=False), cfg.model.num_classes,
                         max_images=cfg.train.val_images)


def _build_eval_dataset(cfg, data_root):
    from .data.coco import CocoDetection, split_paths
    from .data.transforms import build_transforms
    img_dir, ann = split_paths(cfg.data, "val", data_root)
    return CocoDetection(img_dir, ann, build_transforms(cfg.input, train=False), cfg.model.num_classes,
                         max_images=cfg.eval.max_images)


def _check_weights(args, cfg, exp) -> None:
    from .engine.checkpoint import build_trained_model
    if exp.init_from and not args.init:
        raise ValueError(f"experiment {args.experiment} starts from {exp.init_from}: pass --init <its model file>")
    if exp.distill and not args.teacher:
        raise ValueError(f"experiment {args.experiment} distils {exp.distill.teacher}: pass --teacher <its model file>")
    if args.init:
        build_trained_model(args.init, cfg.model)
    if args.teacher:
        build_trained_model(args.teacher)


def _apply_threads(cfg) -> None:
    if cfg.train.threads:
        import torch
        torch.set_num_threads(cfg.train.threads)


def _join_process_group(cfg):
    """torchrun's process group (None for a plain launch); a train.gpus that disagrees with
    the process count would train at another global batch than the LR rule was set for."""
    from .utils import dist
    from .utils.repro import resolve_device
    env = dist.init_from_env(resolve_device(cfg.train.device).type)
    world = env.world_size if env else 1
    gpus = getattr(cfg.train, "gpus", 0)
    if gpus > 0 and gpus != world:
        dist.shutdown()
        raise ValueError(f"train.gpus is {gpus} but {world} process(es) were launched: run "
                         f"`torchrun --nproc_per_node={gpus} -m effdetr.cli ...`")
    if gpus == 0 and world > 1 and cfg.train.lr_scaling.rule != "none":
        # CPU processes: the LR rule was resolved for one process's batch, not world x batch
        dist.shutdown()
        raise ValueError(f"train.lr_scaling.rule is {cfg.train.lr_scaling.rule!r}, resolved for train.gpus 0 "
                         f"(one process), but {world} processes were launched")
    if world > 1 and not cfg.model.backbone.freeze_bn:
        # each rank would normalise by its own share's statistics (and keep its own running
        # ones): not the global batch a single process sees. The official code freezes BN.
        dist.shutdown()
        raise ValueError(f"model.backbone.freeze_bn is false, but {world} processes were launched: batch norm "
                         "would use each process's share of the batch, not the global batch. Set "
                         "freeze_bn: true (as the official DETR-family code does) or train in one process")
    return env


def cmd_train(args) -> None:
    cfg, exp = C.experiment_config(args.params, args.experiment)
    _apply_threads(cfg)
    from .utils import dist
    _join_process_group(cfg)
    try:
        _train(args, cfg, exp)
    finally:
        dist.shutdown()


def _train(args, cfg, exp) -> None:
    from .utils import dist
    params, _ = C.load_params(args.params)
    phash = C.params_hash(cfg)
    # Fail before compute: the data must be there, match its manifest and pass the annotation
    # and image checks, and the weights this run starts from / distils must exist and fit.
    val = _build_eval_dataset(cfg, args.data)
    if not len(val):  # found now, not after training, when the eval stage would fail on it
        raise ValueError(f"{val.ann_file}: the val split has no images to evaluate")
    from .data.verify import check_data
    data_digest = check_data(cfg, args.data, ("train", "val"))["train"]
    _check_weights(args, cfg, exp)
    from .engine.train import train
    from .tracking import Run
    from .utils.repro import files_hash, source_hash
    inputs = files_hash([args.backbone, args.init, args.teacher])
    work = Path(args.work_root) / args.experiment / f"{phash}-{source_hash()}-{inputs}-{data_digest[:8]}"
    with Run(_experiment(params, exp.paper), f"train-{args.experiment}",
             _tags("train", exp.paper, exp.table, phash, args.experiment, params.profile),
             {"experiment": C.to_dict(cfg)}) as run:
        t0 = time.time()
        result = train(cfg, args.data, args.out, str(work), phash, run=run, backbone_weights=args.backbone,
                       init=args.init, teacher=args.teacher, distill_cfg=exp.distill,
                       val_dataset=_validation_dataset(cfg, args.data) if cfg.train.val_every else None)
        # the training's own time, summed over the sessions a resumed run spans
        seconds = result.get("train_seconds", time.time() - t0)
        if not dist.is_main():  # rank 0 alone writes (its Run is the only one that tracks)
            return
        run.log_metrics({"train_seconds": seconds}, step=cfg.train.epochs)
        _write_record(args.metrics, {**result["final"], "train_seconds": seconds},
                      {"experiment": args.experiment, "world_size": dist.world_size(),
                       "provenance": _provenance(run, phash)}, history=result["history"])
        _log_record(run, args.metrics)


def cmd_pretrain(args) -> None:
    params, _ = C.load_params(args.params)
    cfg = C.profile_config(args.params)
    if cfg.pretrain is None:
        raise C.ConfigError(args.params, f"profiles.{params.profile}.pretrain", "missing")
    phash = C.params_hash({"pretrain": cfg.pretrain, "data": cfg.data, "input": cfg.input,
                           "backbone": cfg.model.backbone, "num_classes": cfg.model.num_classes})
    from .data.verify import check_data
    from .engine.pretrain import pretrain_backbone
    from .tracking import Run
    check_data(cfg, args.data, ("train",))
    with Run(_experiment(params, "all"), "pretrain-backbone",
             _tags("pretrain", "all", "-", phash, "backbone", params.profile),
             {"pretrain": C.to_dict(cfg.pretrain), "backbone": C.to_dict(cfg.model.backbone)}) as run:
        t0 = time.time()
        result = pretrain_backbone(cfg, args.data, args.out, run=run)
        _write_record(args.metrics, {**result["final"], "seconds": time.time() - t0},
                      {"provenance": _provenance(run, phash)}, history=result["history"])
        _log_record(run, args.metrics)


def cmd_eval(args) -> None:
    cfg, exp = C.experiment_config(args.params, args.experiment)
    _apply_threads(cfg)
    from .utils import dist
    from .utils.repro import resolve_device
    dist.init_from_env(resolve_device(cfg.train.device).type)  # eval shards the val set over any count
    try:
        _eval(args, cfg, exp)
    finally:
        dist.shutdown()


def _eval(args, cfg, exp) -> None:
    from .utils import dist
    params, _ = C.load_params(args.params)
    phash = C.params_hash(cfg)
    import torch
    from .engine.checkpoint import build_trained_model
    from .data.verify import check_data
    from .engine.evaluate import evaluate_dataset
    from .tracking import Run
    from .utils.repro import resolve_device
    dataset = _build_eval_dataset(cfg, args.data)
    check_data(cfg, args.data, ("val",))
    # the experiment's model config (e.g. ACT kernels) over the checkpoint's trained weights
    model, ckpt = build_trained_model(args.checkpoint, cfg.model)
    device = dist.local_device(resolve_device(cfg.train.device))
    model.to(device)
    precision = "bf16" if cfg.eval.amp and device.type == "cuda" else "fp32"  # autocast is CUDA-only here
    with Run(_experiment(params, exp.paper), f"eval-{args.experiment}",
             _tags("eval", exp.paper, exp.table, phash, args.experiment, params.profile) | {"precision": precision},
             {"experiment": C.to_dict(cfg), "checkpoint": args.checkpoint}) as run:
        torch.manual_seed(cfg.train.seed)
        stats = evaluate_dataset(model, dataset, device, cfg.eval.batch_size, cfg.eval.num_workers,
                                 cfg.data.area_ranges, amp=cfg.eval.amp,
                                 flops_images=cfg.eval.flops_images, fps_iters=cfg.eval.fps_iters,
                                 fps_warmup=cfg.eval.fps_warmup, fps_batch_sizes=cfg.eval.fps_batch_sizes)
        if not dist.is_main():  # the other ranks only predicted their shards
            return
        # the papers' GFLOPs are GMACs: logged under the tables' names too, for the runs table
        run.log_metrics({k: v for k, v in stats.items() if v == v}
                        | {"gflops_" + k.removeprefix("gmacs_"): v for k, v in stats.items() if k.startswith("gmacs_")})
        _write_record(args.out, stats, {"experiment": args.experiment, "precision": precision,
                                        "checkpoint_params_hash": ckpt.get("params_hash"),
                                        "provenance": _provenance(run, phash)})
        _log_record(run, args.out)
    print(f"[eval] {args.experiment}: " + " ".join(f"{k}={v:.4f}" for k, v in stats.items()))


def cmd_import(args) -> None:
    """A released official checkpoint -> an effdetr model file (strict: every tensor mapped)."""
    cfg, exp = C.experiment_config(args.params, args.experiment)
    if exp.import_checkpoint is None:
        raise C.ConfigError(args.params, f"experiments.{args.experiment}.import_checkpoint",
                            "missing (this experiment has no import stage)")
    params, _ = C.load_params(args.params)
    phash = C.params_hash(cfg)
    import dataclasses

    from .convert import convert_official, load_official
    from .convert.releases import resolve_source
    from .engine.checkpoint import save_atomic
    from .models import build_model
    from .tracking import Run
    imp = exp.import_checkpoint
    with Run(_experiment(params, exp.paper), f"import-{args.experiment}",
             _tags("import", exp.paper, exp.table, phash, args.experiment, params.profile),
             {"experiment": C.to_dict(cfg), "import": C.to_dict(imp)}) as run:
        source, digest = resolve_source(imp, args.releases)
        ckpt = load_official(source)
        model_cfg = dataclasses.replace(cfg.model, backbone=dataclasses.replace(cfg.model.backbone, pretrained="none"))
        model = build_model(model_cfg)
        state = convert_official(ckpt, imp.format, model, source, model_cfg)
        model.load_state_dict(state, strict=True)
        info = {"format": imp.format, "release": imp.release, "file": str(source), "sha256": digest,
                "tensors": len(state), "epoch": ckpt.get("epoch")}
        save_atomic({"model": model.state_dict(), "model_config": dataclasses.asdict(cfg.model),
                     "params_hash": phash, "imported_from": info}, args.out)
        run.log_metrics({"tensors": len(state)})
        _write_record(args.metrics, {"tensors": len(state)},
                      {"experiment": args.experiment, "imported_from": info, "provenance": _provenance(run, phash)})
        _log_record(run, args.metrics)
    print(f"[import] {args.experiment}: {source} ({imp.format}, {len(state)} tensors, sha256 {digest[:12]}) "
          f"-> {args.out}")


def cmd_flops(args) -> None:
    params, raw = C.load_params(args.params)
    models = C.flops_model_configs(args.params)
    from .evaluation.flops import count_model
    from .tracking import Run
    phash = C.params_hash({"flops": raw.get("flops"), "coco_model": raw["profiles"].get("coco", {}).get("model")})
    results, inputs = {}, {}
    with Run(_experiment(params, params.flops.paper), "flops",
             _tags("flops", params.flops.paper, params.flops.table, phash),
             {"flops": C.to_dict(params.flops)}) as run:
        for name, mcfg in models.items():
            sizes = params.flops.model_input_sizes.get(name, params.flops.input_sizes)
            results[name] = count_model(mcfg, sizes)
            inputs[name] = sizes
            run.log_metrics({f"{name}.gmacs": results[name]["gmacs"]["total"],
                             f"{name}.params_m": results[name]["params_m"]})
            print(f"[flops] {name}: {results[name]['gmacs']} GMACs, {results[name]['params_m']:.2f}M params")
        _write_record(args.out, {"models": results},
                      {"input_sizes": inputs, "convention": "GMACs (one multiply-add = one FLOP, the papers' 'GFLOPs')",
                       "provenance": _provenance(run, phash)})
        _log_record(run, args.out)


def cmd_speed(args) -> None:
    """Encoder wall-clock: dense vs each value of the swept clustering experiment."""
    params, raw = C.load_params(args.params)
    sp = params.speed
    if sp is None:
        raise C.ConfigError(args.params, "speed", "missing")
    expanded = C.expand_experiments(params.experiments, args.params)
    names = [n for n, (src, _) in expanded.items() if src == sp.experiment]
    cfgs = {n: C.experiment_config(args.params, n)[0] for n in names}
    base = cfgs[names[0]]
    from .engine.checkpoint import build_trained_model
    from .data.verify import check_data
    from .evaluation.speed import time_encoder
    from .tracking import Run
    from .utils.repro import environment, resolve_device
    dataset = _build_eval_dataset(base, args.data)
    check_data(base, args.data, ("val",))
    model, _ = build_trained_model(args.checkpoint, base.model)
    device = resolve_device(base.train.device)
    model.to(device)
    settings = {"dense": ("dense", None)}
    settings.update({n: (c.model.encoder_attention, c.model.act) for n, c in cfgs.items()})
    phash = C.params_hash({"speed": raw["speed"], "experiment": raw["experiments"][sp.experiment]})
    with Run(_experiment(params, sp.paper), "speed", _tags("speed", sp.paper, sp.table, phash, sp.experiment,
                                                        params.profile), {"speed": C.to_dict(sp)}) as run:
        results = time_encoder(model, dataset, settings, sp.num_images, sp.warmup, sp.repeats, base.eval.amp)
        for label, r in results.items():
            run.log_metrics({f"{label}.{k}": v for k, v in r.items() if v is not None})
        _write_record(args.out, {"results": results},
                      {"device": str(device), "environment": environment(),
                       "protocol": {"batch": 1, "num_images": sp.num_images, "warmup": sp.warmup,
                                    "repeats": sp.repeats, "statistic": "median per image, mean over images"},
                       "provenance": _provenance(run, phash)})
        _log_record(run, args.out)
    for label, r in results.items():
        print(f"[speed] {label}: {r['ms']:.3f} ms/encoder, score matrix {r['score_mb']:.3f} MB")


def cmd_report(args) -> None:
    """``table --table T``: one paper table (its stage); ``index``: reports/README.md from the
    tables built; ``all``: every table, then the index."""
    params, raw = C.load_params(args.params)
    from .reporting.index import build_index, build_reports
    from .reporting.plan import plan_tables
    from .tracking import Run
    if args.what == "table" and not args.table:
        raise ValueError("report table: --table is required (e.g. --table act_main)")
    if args.what == "index":
        from .stages import build_stages, load_raw
        index = build_index(params, plan_tables(params), Path(args.out),
                            stages=build_stages(load_raw(args.params), args.params))
        print(f"[report] wrote {index}")
        return
    phash = C.params_hash(raw)
    paper_scale = C.profile_config(args.params).data.dataset == "coco"
    only = [args.table] if args.what == "table" else None
    name = f"report-{args.table}" if only else "report"
    table = args.table if only else "all"
    paper = plan_tables(params)[args.table].paper_key if only and args.table in plan_tables(params) else "all"
    with Run(_experiment(params, paper), name, _tags("report", paper, table, phash, profile=params.profile),
             {"profile": params.profile}) as run:
        context = {"profile": params.profile, "params_hash": phash, "run_id": run.run_id}
        written = build_reports(params, Path(args.metrics), Path(args.out), context, paper_scale, only)
        if not only:
            from .stages import build_stages, load_raw
            written.append(build_index(params, plan_tables(params), Path(args.out),
                                       stages=build_stages(load_raw(args.params), args.params)))
        for path in written:
            run.log_artifact(path)
    print(f"[report] wrote {len(written)} files under {args.out}")


def cmd_dag(args) -> None:
    from . import stages
    params, raw = C.load_params(args.params)
    if args.format == "sync":
        from .engines import sync
        print(f"[dag] {sync(args.params)}")
        return
    if args.format == "dvc":
        text = stages.render_dvc(raw, args.params)
        if args.out == "-":
            sys.stdout.write(text)
        else:
            Path(args.out).write_text(text)
    else:
        for st in stages.build_stages(raw, args.params):
            print(st.name, " ".join(st.cmd))


def cmd_mlflow(args) -> None:
    from . import tracking
    name = _experiment(C.load_params(args.params)[0], "all")
    if args.action == "init":
        try:
            exp_id = tracking.init_store(name)
        except (tracking.StoreBroken, OSError) as e:
            # Snakemake's onstart runs this: a broken store must not stop the science (every
            # run still writes its sidecar), only be reported.
            print(f"[mlflow] warning: {e}; runs are kept in their sidecars until the store is repaired",
                  file=sys.stderr)
            return
        print(f"[mlflow] store {tracking.tracking_uri()} ready, experiment '{name}' (id {exp_id})")
        return
    if args.action == "finish":  # Snakemake's onsuccess / onerror
        import os
        invocation = os.environ.get(tracking.INVOCATION_ENV)
        if not invocation:
            raise ValueError(f"mlflow finish: no {tracking.INVOCATION_ENV} in the environment (the Snakefile sets it)")
        try:
            closed = tracking.finish_invocation(invocation, args.status)
        except (tracking.StoreBroken, OSError) as e:
            print(f"[mlflow] warning: {e}; the DAG's parent runs stay open", file=sys.stderr)
            return
        print(f"[mlflow] closed {len(closed)} parent run(s) of DAG run {invocation} as {args.status}")
        return
    if args.action == "rebuild":
        moved, imported, completed = tracking.rebuild()
        print(f"[mlflow] broken store moved aside to {moved}, a fresh one created" if moved
              else f"[mlflow] store {tracking.tracking_uri()} is healthy, kept in place")
    else:
        imported, completed = tracking.sync()
    print(f"[mlflow] re-imported {len(imported)} runs from sidecars, completed {len(completed)} partial runs")


def _bench_ddp(args) -> None:
    from .evaluation import ddp_bench
    if not args.experiment:
        raise ValueError("bench ddp: --experiment is required")
    if args.mode == "procs":
        if not args.data:
            raise ValueError("bench ddp --mode procs: --data (the dataset root) is required")
        result = ddp_bench.run_ddp_benchmark(Path(args.params), args.experiment, Path(args.data),
                                             nproc=args.nproc, iters=args.repeats)
        for label, row in result["results"].items():
            print(f"[bench ddp] {label}: {row['processes']} process(es) x batch {row['batch_per_process']}, "
                  f"{row['steps']} steps, {row['images_per_s']:.2f} img/s")
        print(f"[bench ddp] {args.nproc} processes vs 1 at global batch "
              f"{result['results']['ddp']['global_batch']}: {result['speedup']:.2f}x")
    else:
        import torch
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        result = ddp_bench.run_step_benchmark(Path(args.params), args.experiment, profile=args.profile,
                                              device=device, batch=args.batch, warmup=args.warmup,
                                              iters=args.repeats)
        print(f"[bench ddp] {result['experiment']} ({result['profile']}) on {result['device']}, batch "
              f"{result['batch']} at {result['image_size'][0]}x{result['image_size'][1]}, random weights")
        for label, row in result["results"].items():
            print(f"  {label:12s} median {row['median_ms']:.1f} ms/step  {row['images_per_s']:.2f} img/s  "
                  f"first-step loss {row['first_step']['loss']:.6f}")
        for pr, ratio in result["ddp_over_plain"].items():
            print(f"  DDP / plain ({pr}): {ratio:.3f}")
    if args.out:
        _write_json(result, args.out)


def cmd_bench(args) -> None:
    """``msda``: MSDA core timing at DESIGN.md's anchor shape (reference vs Triton vs official
    op). ``dag``: the whole workflow on a small params file, cold and up to date. ``ddp``:
    N processes vs 1 (``--mode procs``) or a one-device DDP step vs a plain one (``step``)."""
    if args.op == "ddp":
        _bench_ddp(args)
        return
    if args.op == "step":
        from .evaluation.step_bench import compare, format_compare, format_result, run_step_bench
        if not args.experiment:
            raise ValueError("bench step: --experiment is required")
        if args.baseline:
            result = compare(Path(args.params), args.experiment.split(","), args.baseline, data=args.data,
                             rounds=args.rounds, warmup=args.warmup, iters=args.repeats, threads=args.threads)
            print(format_compare(result))
            if args.out:
                _write_json(result, args.out)
            return
        result = run_step_bench(Path(args.params), args.experiment, data=args.data, warmup=args.warmup,
                                iters=args.repeats, threads=args.threads, batch=args.batch)
        print(format_result(result))
        if args.out:
            _write_json(result, args.out)
        return
    if args.op == "schedule":
        from .evaluation.schedule_bench import format_schedule, run_schedule_benchmark
        from .stages import build_stages, load_raw
        result = run_schedule_benchmark(build_stages(load_raw(args.params), args.params), args.cores)
        print(format_schedule(result))
        if args.out:
            _write_json(result, args.out)
        return
    if args.op == "dag":
        from .evaluation.dag_bench import run_dag_benchmark
        result = run_dag_benchmark(Path.cwd(), Path(args.dag_params), args.cores)
        print(f"[bench dag] {result['params']}: {result['jobs']} jobs on {result['cores']} cores, "
              f"full run {result['full_run_s']:.1f} s, up-to-date dry run {result['dry_run_s']:.1f} s")
        if args.out:
            _write_json(result, args.out)
        return
    from .evaluation.msda_bench import run_benchmark
    import torch
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    result = run_benchmark(device, batch=args.batch or 2, warmup=args.warmup, repeats=args.repeats)
    shape = result["shape"]
    print(f"[bench msda] {result['device']}: batch {shape['batch']}, {shape['tokens']} tokens, "
          f"{shape['heads']} heads x {shape['channels']}, {len(shape['levels'])} levels x {shape['points']} points, fp32")
    for name, row in result["results"].items():
        print(f"  {name:34s} " + "  ".join(f"{k} {v:.4g}" for k, v in row.items()))
    if args.out:
        _write_json(result, args.out)


def cmd_gpus(args) -> None:
    """Run a command on GPUs of its own (``effdetr gpus N -- CMD``): see utils/gpu_slots.py."""
    from .utils.gpu_slots import run_pinned
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    run_pinned(args.count, cmd)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("effdetr")
    except PackageNotFoundError:  # run from a source tree without installing
        return "unknown (not installed)"


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default, except where there is none to show (required, or None)."""

    def _get_help_string(self, action):
        if action.required or action.default is None or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def parser() -> argparse.ArgumentParser:
    fmt = _HelpFormatter
    p = argparse.ArgumentParser(prog="effdetr", description=__doc__, formatter_class=fmt)
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = p.add_subparsers(dest="command", required=True)

    def add(name, fn, help_):
        sp = sub.add_parser(name, help=help_, description=help_, formatter_class=fmt)
        sp.add_argument("--params", default="params.yaml", help="the params file (the single source of truth)")
        sp.set_defaults(fn=fn)
        return sp

    sp = add("data", cmd_data, "make/download a dataset, verify it, or record an edit in its manifest")
    sp.add_argument("action", choices=["synth", "coco", "verify", "manifest"],
                    help="synth: generate SynthCOCO; coco: download/link COCO 2017; verify: check it; "
                         "manifest: record an in-place edit")
    sp.add_argument("--out", required=True, help="dataset root (its manifest is <root>.manifest.json)")
    for name, fn in (("train", cmd_train), ("eval", cmd_eval)):
        sp = add(name, fn, f"{name} one experiment")
        sp.add_argument("--experiment", required=True, help="an experiment of params.yaml (swept ones by full name)")
        sp.add_argument("--data", required=True, help="dataset root")
        if name == "train":
            sp.add_argument("--out", required=True, help="final model file")
            sp.add_argument("--metrics", required=True, help="metrics JSON to write (history, final losses)")
            sp.add_argument("--work-root", default="data/work", help="resumable state (not a declared output)")
            sp.add_argument("--backbone", default=None, help="pretrained backbone file (backbone.pretrained: pipeline)")
            sp.add_argument("--init", default=None, help="model file to start from (experiment init_from)")
            sp.add_argument("--teacher", default=None, help="teacher model file (experiment distill.teacher)")
        else:
            sp.add_argument("--checkpoint", required=True, help="model file to evaluate")
            sp.add_argument("--out", required=True, help="metrics JSON to write (COCO stats, FLOPs, FPS)")
    sp = add("import", cmd_import, "convert a released official checkpoint into an effdetr model file")
    sp.add_argument("--experiment", required=True, help="an experiment with stages [import, eval]")
    sp.add_argument("--out", required=True, help="effdetr model file to write")
    sp.add_argument("--metrics", required=True, help="JSON record of the source file and its checksum")
    sp.add_argument("--releases", default="data/releases", help="where releases are downloaded to")
    sp = add("pretrain", cmd_pretrain, "pre-train the profile's backbone (stand-in for ImageNet)")
    sp.add_argument("--data", required=True, help="dataset root")
    sp.add_argument("--out", required=True, help="backbone weights file to write")
    sp.add_argument("--metrics", required=True, help="metrics JSON to write")
    sp = add("flops", cmd_flops, "paper-scale GFLOPs/params table")
    sp.add_argument("--out", required=True, help="metrics JSON to write (flops.json)")
    sp = add("speed", cmd_speed, "time the encoder: dense vs clustered attention")
    sp.add_argument("--data", required=True, help="dataset root (its val images are timed)")
    sp.add_argument("--checkpoint", required=True, help="the dense model file (ACT swaps its kernels)")
    sp.add_argument("--out", required=True, help="metrics JSON to write (speed.json)")
    sp = add("report", cmd_report, "regenerate reports/ from metrics: one table, the index, or all")
    sp.add_argument("what", nargs="?", choices=["all", "table", "index"], default="all",
                    help="table: one table (--table); index: reports/README.md; all: every table, then the index")
    sp.add_argument("--table", default=None, help="report table: the table id (reports/tables/<id>.md)")
    sp.add_argument("--metrics", default="reports/metrics", help="where the stages' metrics JSON files are")
    sp.add_argument("--out", default="reports", help="reports folder (tables/, figures/, README.md)")
    sp = add("dag", cmd_dag, "render the stage table, or bring Snakemake's and DVC's records in step")
    sp.add_argument("format", choices=["dvc", "list", "sync"],
                    help="dvc: dvc.yaml; list: one stage per line; sync: after a run by one engine, record it "
                         "in the other's records (dvc commit or snakemake --touch)")
    sp.add_argument("--out", default="-", help="file to write; - for stdout")
    sp = add("bench", cmd_bench, "benchmark an op (msda: reference vs Triton vs the official CUDA op), "
                                 "the workflow (dag: a cold snakemake run of a small params file) or "
                                 "data parallelism (ddp) or one experiment's training step, phase by phase (step), "
                                 "or replay the DAG's job order on N cores from recorded stage times (schedule)")
    sp.add_argument("op", choices=["msda", "dag", "ddp", "step", "schedule"], help="what to benchmark")
    sp.add_argument("--mode", choices=["procs", "step"], default="procs",
                    help="ddp: N processes vs 1 (procs) or one device's DDP step vs plain (step)")
    sp.add_argument("--experiment", default=None, help="ddp, step: the experiment to train")
    sp.add_argument("--baseline", default=None,
                    help="step: also run a git revision's code, alternating, and print the CPU-time ratios "
                         "(--experiment may then list several, comma-separated)")
    sp.add_argument("--rounds", type=int, default=2, help="step --baseline: runs per code version")
    sp.add_argument("--threads", type=int, default=None,
                    help="step: torch threads (default: the experiment's train.threads, else torch's)")
    sp.add_argument("--profile", default=None, help="ddp step: the profile (default: the params file's)")
    sp.add_argument("--data", default=None, help="ddp procs, step: the dataset root (step: default the profile's data.root)")
    sp.add_argument("--nproc", type=int, default=2, help="ddp procs: processes")
    sp.add_argument("--dag-params", default="tests/data/params_tiny.yaml", help="dag: the params file to run")
    sp.add_argument("--cores", type=int, default=2, help="dag: snakemake --cores; schedule: cores to replay on")
    sp.add_argument("--device", default=None, help="cuda (default when present) or cpu")
    sp.add_argument("--batch", type=int, default=None, help="msda: 2; ddp step, step: the experiment's train.batch_size")
    sp.add_argument("--warmup", type=int, default=5, help="untimed repeats first")
    sp.add_argument("--repeats", type=int, default=20, help="timed repeats (ddp procs: training steps)")
    sp.add_argument("--out", default=None, help="also write the result as JSON")
    sp = sub.add_parser("gpus", help="run a command on N GPUs no other job on this machine holds "
                                     "(sets CUDA_VISIBLE_DEVICES; kept as it is inside SLURM or when set)",
                        formatter_class=fmt)
    sp.add_argument("count", type=int, help="GPUs to hold")
    sp.add_argument("cmd", nargs=argparse.REMAINDER, help="-- the command")
    sp.set_defaults(fn=cmd_gpus)
    sp = add("mlflow", cmd_mlflow, "initialise the store / re-import and complete sidecar runs / rebuild a broken store")
    sp.add_argument("action", choices=["init", "sync", "rebuild", "finish"],
                    help="init: create the store; sync: re-import sidecars; rebuild: move a broken store aside "
                         "and re-import; finish: close this DAG run's parent runs (Snakemake calls it)")
    sp.add_argument("--status", choices=["FINISHED", "FAILED"], default="FINISHED",
                    help="finish: the DAG run's outcome")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        args.fn(args)
    except (C.ConfigError, FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"effdetr {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. a full disk or a read-only folder: name the file, no traceback
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"effdetr {args.command}: error: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
