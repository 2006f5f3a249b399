"""The DAG as plain data: one table drives both Snakemake rules and the generated dvc.yaml.

Each :class:`Stage` names the one ``effdetr`` command it runs, the params keys it reads
(DVC ``params:``; Snakemake gets their canonical JSON in ``params:`` so an edit reruns
exactly the stages that read it), its deps -- source folders included -- and its outs.
No torch import here: Snakemake parses this module.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from . import codedeps
from .config import ConfigError, deep_merge, expand_experiments, stage_resources
from .data.manifest import manifest_path, refresh_if_present
from .utils.records import history_path, provenance_path

SRC = "src/effdetr"
# every command's own code: the CLI, the params loader, tracking (and what they import at top
# level; config's check of import sections reads the releases table), and utils/
COMMON_SRC = sorted(set(codedeps.closure(["effdetr.cli", "effdetr.config", "effdetr.tracking",
                                          "effdetr.convert.releases"]))) + [f"{SRC}/convert/releases.yaml",
                                                                            f"{SRC}/utils"]
MODEL_SRC = [f"{SRC}/models", f"{SRC}/ops"]


@dataclass
class Stage:
    name: str
    cmd: list[str]
    params_keys: list[str]
    deps: list[str] = field(default_factory=list)
    outs: list[str] = field(default_factory=list)
    out_dirs: list[str] = field(default_factory=list)
    metrics: list[str] = field(default_factory=list)
    heavy: bool = False  # uses all cores (Snakemake runs heavy stages one at a time) ...
    threads: int | None = None  # ... unless the experiment's train.threads asks for fewer
    persist: bool = False
    groups: list[str] = field(default_factory=list)  # named targets it belongs to (e.g. released)
    # gpu, mem_mb, runtime (minutes), cpus_per_task: Snakemake `resources:` (config.stage_resources)
    resources: dict = field(default_factory=dict)
    # the Snakemake rule it runs under (data, pretrain, train, eval, import, flops, speed, table,
    # report) and, for a rule with a wildcard, its value (the experiment or the table id)
    kind: str = ""
    key: str = ""
    # per-epoch histories (DVC `plots:`; a training's curves)
    plots: list[str] = field(default_factory=list)
    # Snakemake `priority:` (set by build_stages: the expected seconds of work from it to the end)
    priority: int = 0
    # a table's trade-off figure as data, for dvc.yaml's top-level `plots:` (name, x, y, files)
    figure_data: list[dict] = field(default_factory=list)

    def __post_init__(self):
        if not self.kind:
            self.kind = self.name

    @property
    def shell(self) -> str:
        return " ".join(self.cmd)

    @property
    def log(self) -> str:
        return f"logs/{self.name}.log"

    def rule_threads(self, cores: int | None) -> int:
        """Snakemake threads: 1 for light stages; a heavy one takes its experiment's
        train.threads, else every core of a local run, else (a cluster run has no --cores) the
        cores its allocation asks for."""
        if not self.heavy:
            return 1
        return self.threads or cores or self.resources["cpus_per_task"]

    def params_json(self, raw: dict) -> str:
        """Canonical JSON of exactly the params this stage's command reads."""
        return json.dumps({k: lookup(raw, k) for k in self.params_keys}, sort_keys=True, separators=(",", ":"))

    def all_outputs(self) -> list[str]:
        return self.outs + self.out_dirs + self.metrics + self.plots


def launch(args: list[str], resources: dict) -> list[str]:
    """The command of one stage: ``effdetr <args>``, or one process per GPU under torchrun
    (single node, env:// rendezvous on a free port) when it asks for more than one GPU. A stage
    with GPUs runs under ``effdetr gpus N --``, which gives it GPUs no other job on the machine
    holds (Snakemake counts GPUs but does not assign them; see utils/gpu_slots.py)."""
    gpu = resources["gpu"]
    if gpu > 1:
        cmd = ["torchrun", "--standalone", f"--nproc_per_node={gpu}", "-m", "effdetr.cli", *args]
    else:
        cmd = ["effdetr", *args]
    return ["effdetr", "gpus", str(gpu), "--", *cmd] if gpu >= 1 else cmd


def stage_command(cmd: list[str]) -> list[str]:
    """A stage's command without its ``effdetr gpus N --`` GPU pinning."""
    return cmd[4:] if cmd[:2] == ["effdetr", "gpus"] else cmd


def lookup(raw: dict, dotted: str):
    node = raw
    for part in dotted.split("."):
        node = node[part]
    return node


def build_stages(raw: dict, params_file: str = "params.yaml") -> list[Stage]:
    profile = raw["profile"]
    prof_key = f"profiles.{profile}"
    try:
        data = raw["profiles"][profile]["data"]
    except (KeyError, TypeError):
        raise ConfigError(params_file, f"{prof_key}.data", "missing") from None
    root = data["root"]
    # stages that read the data depend on the root (DVC hashes its content) and on its
    # manifest: Snakemake compares times only, and a folder's time ignores edits inside it
    manifest = str(manifest_path(root))
    p = ["--params", params_file]
    stages: list[Stage] = []

    kind = data["dataset"]
    data_src = [f"{SRC}/data/synthcoco.py"] if kind == "synth" else [f"{SRC}/data/download.py"]
    res = stage_resources(raw, "data")
    stages.append(Stage("data", launch(["data", kind, *p, "--out", root], res),
                        ["profile", f"{prof_key}.data"], deps=data_src + COMMON_SRC, outs=[manifest],
                        out_dirs=[root], persist=kind == "coco", resources=res))

    backbone_file = "data/checkpoints/backbone.pt"
    prof = raw["profiles"][profile]
    if prof.get("pretrain"):
        metrics = "reports/metrics/backbone/pretrain.json"
        res = stage_resources(raw, "pretrain")
        stages.append(Stage("pretrain",
                            launch(["pretrain", *p, "--data", root, "--out", backbone_file, "--metrics", metrics], res),
                            ["profile", f"{prof_key}.pretrain", f"{prof_key}.data", f"{prof_key}.input",
                             f"{prof_key}.model.backbone", f"{prof_key}.model.num_classes", f"{prof_key}.train.device"],
                            deps=[root, manifest] + _code("effdetr.engine.pretrain") + COMMON_SRC,
                            outs=[backbone_file], metrics=[metrics], heavy=True, resources=res))

    train_keys = [f"{prof_key}.{s}" for s in ("data", "input", "model", "loss", "train")]
    eval_keys = [f"{prof_key}.{s}" for s in ("data", "input", "model", "train", "eval")]
    expanded = expand_experiments(raw.get("experiments", {}), params_file)
    for name, (source, exp) in sorted(expanded.items()):
        if exp.get("profiles") and profile not in exp["profiles"]:
            continue  # e.g. released COCO checkpoints: nothing to run on SynthCOCO
        ckpt = f"data/checkpoints/{name}.pt"
        exp_keys = ["profile", f"experiments.{source}"]
        stage_list = exp.get("stages", ["train", "eval"])
        train_cfg = _merged(raw, profile, exp, "train")
        threads = train_cfg.get("threads")
        init = exp.get("init_from")
        teacher = (exp.get("distill") or {}).get("teacher")
        # the code this experiment's commands run: its model's modules (and its teacher's)
        model_code = codedeps.model_modules(_model_config(raw, profile, exp, params_file))
        distill_code = []
        if teacher:
            model_code += codedeps.model_modules(_model_config(raw, profile, expanded[teacher][1], params_file))
            distill_code = codedeps.distill_modules(exp["distill"].get("method", "mtkd"))
        init_stages = (raw["experiments"].get(init) or {}).get("stages", []) if init else []
        groups = ["released"] if "import" in stage_list or "import" in init_stages else []
        if "train" in stage_list:
            metrics = f"reports/metrics/{name}/train.json"
            pretrained = _merged(raw, profile, exp, "model").get("backbone", {}).get("pretrained")
            extra = ["--backbone", backbone_file] if pretrained == "pipeline" and not init else []
            weights = [f"data/checkpoints/{w}.pt" for w in dict.fromkeys(x for x in (init, teacher) if x)]
            extra += ["--init", f"data/checkpoints/{init}.pt"] if init else []
            extra += ["--teacher", f"data/checkpoints/{teacher}.pt"] if teacher else []
            res = stage_resources(raw, "train", (name, source), _merged(raw, profile, exp, "train").get("gpus", 0))
            stages.append(Stage(f"train_{name}",
                                launch(["train", *p, "--experiment", name, "--data", root, "--out", ckpt,
                                        "--metrics", metrics, *extra], res),
                                exp_keys + train_keys,
                                deps=[root, manifest]
                                + _code("effdetr.engine.train", *model_code, *distill_code,
                                        # train.val_every: the training evaluates (engine.train.validate)
                                        *(["effdetr.engine.evaluate"] if train_cfg.get("val_every") else []))
                                + COMMON_SRC
                                + ([backbone_file] if "--backbone" in extra else []) + weights,
                                outs=[ckpt], metrics=[metrics], heavy=True, threads=threads, resources=res))
        if "import" in stage_list:
            metrics = f"reports/metrics/{name}/import.json"
            imp = exp["import_checkpoint"]
            source_dep = [imp["file"]] if imp.get("file") else []
            res = stage_resources(raw, "import", (name, source))
            stages.append(Stage(f"import_{name}",
                                launch(["import", *p, "--experiment", name, "--out", ckpt, "--metrics", metrics,
                                        "--releases", "data/releases"], res),
                                exp_keys + [f"{prof_key}.model"],
                                deps=source_dep + [f"{SRC}/convert"]
                                + _code("effdetr.engine.checkpoint", "effdetr.data.download", *model_code)
                                + COMMON_SRC,
                                outs=[ckpt], metrics=[metrics], heavy=True, groups=groups, resources=res))
        if "eval" in stage_list:
            metrics = f"reports/metrics/{name}/eval.json"
            weights = ckpt if ("train" in stage_list or "import" in stage_list) else f"data/checkpoints/{init}.pt"
            res = stage_resources(raw, "eval", (name, source))
            stages.append(Stage(f"eval_{name}",
                                launch(["eval", *p, "--experiment", name, "--data", root, "--checkpoint", weights,
                                        "--out", metrics], res),
                                exp_keys + eval_keys,
                                deps=[root, manifest, weights]
                                + _code("effdetr.engine.evaluate", "effdetr.engine.checkpoint", *model_code)
                                + COMMON_SRC,
                                metrics=[metrics], heavy=True, threads=threads, groups=groups, resources=res))

    if raw.get("flops", {}).get("models"):
        metrics = "reports/metrics/flops.json"
        coco_model = ["profiles.coco.model"] if "model" in raw["profiles"].get("coco", {}) else []
        res = stage_resources(raw, "flops")
        stages.append(Stage("flops", launch(["flops", *p, "--out", metrics], res),
                            ["flops"] + coco_model,
                            deps=[f"{SRC}/evaluation"] + MODEL_SRC + COMMON_SRC, metrics=[metrics], heavy=True,
                            resources=res))

    speed = raw.get("speed")
    if speed:
        src = raw["experiments"][speed["experiment"]]
        weights = f"data/checkpoints/{src['init_from']}.pt"
        metrics = "reports/metrics/speed.json"
        res = stage_resources(raw, "speed")
        stages.append(Stage("speed", launch(["speed", *p, "--data", root, "--checkpoint", weights, "--out", metrics],
                                            res),
                            ["profile", "speed", f"experiments.{speed['experiment']}"]
                            + [f"{prof_key}.{s}" for s in ("data", "input", "model", "train", "eval")],
                            deps=[root, manifest, weights]
                            + _code("effdetr.evaluation.speed", "effdetr.engine.checkpoint", "effdetr.models.detr",
                                    "effdetr.ops.act") + COMMON_SRC,
                            metrics=[metrics], heavy=True, resources=res))

    # one stage per paper table, reading exactly its rows' metrics; then the index of them all
    from .config import Params, build
    from .reporting.plan import plan_tables
    plans = plan_tables(build(Params, raw, params_file, "params"))
    from .reporting.figures import curve_data_file, tradeoff_data_file
    table_files = []
    for tid, plan in plans.items():
        outs = [f"reports/tables/{tid}.md", f"reports/tables/{tid}.csv"]
        sources = sorted({expanded[n][0] for n in _plan_experiments(plan) if n in expanded})
        keys = ["profile"] + [f"experiments.{src}" for src in sources]
        keys += ["flops"] if plan.source == "flops" else ["speed"] if plan.source == "speed" else []
        keys += ["seed_spread"] if plan.source == "eval" and raw.get("seed_spread") else []
        res = stage_resources(raw, "report")
        figure_data = []
        if plan.spec.get("figure"):
            fig = plan.spec["figure"]
            figure_data.append({"name": Path(fig["file"]).stem, "template": "scatter", "x": fig["x"], "y": fig["y"],
                                "title": plan.spec["title"],
                                "files": [f"reports/figures/{tid}/{tradeoff_data_file(fig['file'], s)}"
                                          for s in ("paper", "reproduced")]})
        for name in plan.curves:  # each training's loss and val AP per epoch, as its table writes them
            figure_data.append({"name": f"{name}_curve", "template": "linear", "x": "epoch",
                                "y": ["train_loss", "val_AP"], "title": f"{name}: training loss and val AP per epoch",
                                "files": [f"reports/figures/{tid}/{curve_data_file(name)}"]})
        stages.append(Stage(f"table_{tid}",
                            launch(["report", "table", "--table", tid, *p, "--metrics", "reports/metrics",
                                    "--out", "reports"], res),
                            keys, deps=list(plan.inputs) + [f"{SRC}/reporting"] + COMMON_SRC, outs=outs,
                            out_dirs=[f"reports/figures/{tid}"],
                            groups=[f"paper_{plan.paper_key}"], resources=res, figure_data=figure_data))
        table_files += outs
    res = stage_resources(raw, "report")
    stages.append(Stage("report", launch(["report", "index", *p, "--out", "reports"], res), ["profile"],
                        deps=table_files + [f"{SRC}/reporting"] + COMMON_SRC, outs=["reports/README.md"],
                        resources=res))
    for st in stages:
        kind, _, key = st.name.partition("_")
        if kind in ("train", "eval", "import", "table"):  # one Snakemake rule per kind, the key its wildcard
            st.kind, st.key = kind, key
        # beside each metrics file (numbers only) its provenance sidecar; a training's history
        st.outs += [str(provenance_path(m)) for m in st.metrics]
        # (a training's history gains val_* keys only on validated epochs, which DVC cannot draw:
        # its curve is drawn from the table stage's `<name>_curve.json` instead)
        if st.kind == "pretrain":
            st.plots += [str(history_path(m)) for m in st.metrics]
        elif st.kind == "train":
            st.outs += [str(history_path(m)) for m in st.metrics]
    _set_priorities(stages)
    return stages


def stage_children(stages: list[Stage]) -> dict[str, set[str]]:
    """Stage name -> the stages that read one of its outputs."""
    producer = {o: st.name for st in stages for o in st.all_outputs()}
    children: dict[str, set[str]] = {st.name: set() for st in stages}
    for st in stages:
        for dep in st.deps:
            if dep in producer and producer[dep] != st.name:
                children[producer[dep]].add(st.name)
    return children


# a stage's cost when no earlier run recorded it: a training's is the median recorded
# training's (or 10 min), any other stage's about a minute (evals, FLOPs, speed, tables)
_UNRECORDED_TRAIN_S, _OTHER_S = 600.0, 60.0


def recorded_seconds(st: Stage) -> float | None:
    """The wall seconds an earlier run of this stage recorded (a training's ``train_seconds``,
    summed over resumed sessions; the pre-training's ``seconds``), or None."""
    for m in st.metrics:
        try:
            record = json.loads(Path(m).read_text())
            value = record.get("train_seconds", record.get("seconds") if st.kind == "pretrain" else None)
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(value, (int, float)) and value > 0:
            return float(value)
    return None


def estimated_seconds(stages: list[Stage]) -> dict[str, float]:
    """Stage name -> its expected wall seconds, for scheduling only (never a result)."""
    recorded = {st.name: recorded_seconds(st) for st in stages}
    trains = sorted(v for st in stages if st.kind in ("train", "pretrain") and (v := recorded[st.name]))
    typical = trains[len(trains) // 2] if trains else _UNRECORDED_TRAIN_S
    return {st.name: recorded[st.name] or (typical if st.kind in ("train", "pretrain") else _OTHER_S)
            for st in stages}


def _set_priorities(stages: list[Stage]) -> None:
    """Each stage's priority = the expected seconds of the longest chain of work from it to
    the end of the DAG (itself included; the last run's recorded training times). Among the
    jobs that can start, Snakemake then runs first the one with the most work behind it: the
    DETR-DC5 teacher that ACT, MTKD and the DETRDistill students wait on, and the long Lite
    DETR trainings, before short baselines, so the cores do not idle on a long tail at the end."""
    chains = longest_chains(stages, estimated_seconds(stages))
    for st in stages:
        st.priority = int(round(chains[st.name][0]))


def longest_chains(stages: list[Stage], seconds: dict[str, float]) -> dict[str, tuple[float, list[str]]]:
    """Stage name -> the chain from it to the end of the DAG with the largest summed
    ``seconds`` (a stage not in them counts 0): (its seconds, its stage names in run order)."""
    children = stage_children(stages)
    best: dict[str, tuple[float, list[str]]] = {}

    def longest(name: str) -> tuple[float, list[str]]:
        if name not in best:
            tail = max((longest(c) for c in children[name]), default=(0.0, []), key=lambda t: t[0])
            best[name] = (seconds.get(name, 0.0) + tail[0], [name] + tail[1])
        return best[name]

    for st in stages:
        longest(st.name)
    return best


def critical_path(stages: list[Stage], seconds: dict[str, float]) -> tuple[float, list[str]]:
    """The chain of stages with the largest summed ``seconds`` (a stage not in it counts 0):
    what no number of cores shortens. -> (its seconds, its stage names in run order)."""
    chains = longest_chains(stages, seconds)
    return max((chains[st.name] for st in stages), default=(0.0, []), key=lambda t: t[0])


def _plan_experiments(plan) -> list[str]:
    """The experiments whose params a table's stage reads (its rows, seeds and spread runs)."""
    return list(dict.fromkeys(f.split("/")[2] for f in plan.inputs if f.count("/") == 3))


def paper_targets(stages: list[Stage]) -> dict[str, list[str]]:
    """``paper_<paper>`` (paper_act, paper_sparse_detr, ...) -> its tables' outputs: the named
    targets that build one paper's tables and whatever they need."""
    names = sorted({g for st in stages for g in st.groups if g.startswith("paper_")})
    return {g: group_outputs(stages, g) for g in names}


def group_outputs(stages: list[Stage], group: str) -> list[str]:
    """Outputs of a named target: ``released`` = every import stage and every evaluation of
    released weights (the coco profile's eval-only rows, about one GPU-hour)."""
    return [o for st in stages if group in st.groups for o in st.all_outputs()]


def _model_config(raw: dict, profile: str, exp: dict, params_file: str):
    """The experiment's resolved model config (validated as config.py does)."""
    from .config import _profile_from_dict
    prof = raw["profiles"][profile]
    merged = {k: _merged(raw, profile, exp, k) if isinstance(v, dict) else v for k, v in prof.items()}
    return _profile_from_dict(merged, params_file, f"profiles.{profile}").model


def _code(*modules: str) -> list[str]:
    """Source files a command runs: the static import closure of ``modules`` (codedeps)."""
    from .codedeps import closure
    return closure(list(modules))


def _merged(raw: dict, profile: str, exp: dict, section: str) -> dict:
    """One section of an experiment's config as the profile + its overrides make it."""
    out = raw["profiles"][profile].get(section, {})
    for over in (exp.get("overrides", {}), exp.get("profile_overrides", {}).get(profile, {})):
        out = deep_merge(out, over.get(section, {}))
    return out


def refresh_data_manifest(raw: dict) -> list[str]:
    """Called by Snakemake at parse time: an in-place edit of the profile's dataset rewrites its
    manifest (a stat per file, cached hashes; untouched otherwise), so every stage that reads
    the data reruns. Returns what changed (also told on stderr: stdout may be parsed)."""
    data = raw["profiles"][raw["profile"]]["data"]
    try:
        changed = refresh_if_present(data["dataset"], data["root"])
    except OSError as e:  # a read-only data/ or a full disk must not stop the workflow parsing
        print(f"[data] warning: could not refresh the manifest of {data['root']} ({e}); in-place "
              "edits of the data are not detected in this run", file=sys.stderr)
        return []
    if changed:
        print(f"[data] {data['root']}: manifest refreshed ({'; '.join(changed)}); "
              "the stages that read it rerun", file=sys.stderr)
    return changed


def start_invocation() -> str:
    """This `snakemake` run's id for MLflow (its stage runs nest under one parent run per
    experiment): set in the environment the jobs inherit, kept when a job re-reads the
    workflow (cluster jobs do)."""
    import os
    import time
    import uuid
    return os.environ.setdefault("EFFDETR_INVOCATION", time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6])


def load_raw(params_file: str) -> dict:
    """Parse and fully validate params (errors name file + key) before building the DAG."""
    from .config import load_params
    return load_params(params_file)[1]


def expand_deps(deps: list[str], root: Path = Path(".")) -> list[str]:
    """Folders become their source and data files (.py, and the .yaml of the published
    numbers): Snakemake compares file times, not folder times."""
    out = []
    for d in deps:
        p = root / d
        if d.startswith(SRC) and p.is_dir():
            out.extend(sorted(str(f.relative_to(root)) for f in p.rglob("*") if f.suffix in (".py", ".yaml")))
        else:
            out.append(d)
    return out


def render_dvc(raw: dict, params_file: str = "params.yaml") -> str:
    doc = {"stages": {}}
    table = build_stages(raw, params_file)
    for st in table:
        entry: dict = {"cmd": st.shell, "deps": list(st.deps)}
        entry["params"] = [{params_file: list(st.params_keys)}] if params_file != "params.yaml" else list(st.params_keys)
        # cache: false everywhere: DVC then only hashes outputs and never relinks them from its
        # cache, which would reset their mtimes and make Snakemake rerun everything downstream.
        outs = [{o: {"cache": False, "persist": True} if st.persist else {"cache": False}}
                for o in st.outs + st.out_dirs]
        if outs:
            entry["outs"] = outs
        if st.metrics:
            entry["metrics"] = [{m: {"cache": False}} for m in st.metrics]
        if st.plots:  # `dvc plots show`: the pre-training loss (its history has no epoch field)
            entry["plots"] = [{m: {"cache": False, "y": "pretrain_loss"}} for m in st.plots]
        doc["stages"][st.name] = entry
    # each paper's trade-off figure (e.g. AP vs GFLOPs) as scatters of the paper's points and
    # the reproduced ones, drawn by `dvc plots show` from the files its table stage writes
    figures = [f for st in table for f in st.figure_data]
    if figures:
        # one plot per series: the paper's (COCO) and the reproduced points share no scale
        # off the coco profile
        # a trade-off figure's title names its series (paper / reproduced), a curve's is its own
        def title(f, path):
            return f"{f['title']} ({Path(path).stem.rsplit('_', 1)[1]})" if f["template"] == "scatter" else f["title"]
        doc["plots"] = [{Path(path).stem: {"template": f["template"], "x": f["x"], "y": {path: f["y"]},
                                           "title": title(f, path)}}
                        for f in figures for path in f["files"]]
    header = ("# GENERATED by `effdetr dag dvc` from src/effdetr/stages.py and params.yaml -- do not edit.\n"
              "# Re-render after changing experiments or the profile: `effdetr dag dvc --out dvc.yaml`.\n")
    return header + yaml.safe_dump(doc, sort_keys=False, width=120)
