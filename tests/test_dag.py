"""One DAG, two engines: the committed dvc.yaml, the stage table and Snakemake agree."""
import json
import re
import subprocess

import yaml

from effdetr import stages
from tests.conftest import BIN, REPO, planned_stages


def snakemake(*args, cwd=REPO):
    return subprocess.run([str(BIN / "snakemake"), "--snakefile", "workflow/Snakefile", *args],
                          cwd=cwd, capture_output=True, text=True, timeout=300)


def test_committed_dvc_yaml_is_fresh():
    raw = stages.load_raw(str(REPO / "params.yaml"))
    assert (REPO / "dvc.yaml").read_text() == stages.render_dvc(raw), \
        "dvc.yaml is stale: run `effdetr dag dvc --out dvc.yaml`"


def test_snakemake_rules_are_the_stage_kinds_and_their_jobs_the_dvc_stages():
    """A handful of rules (one per kind of stage, the experiment or table as wildcard), whose
    jobs are exactly dvc.yaml's stages; the rule graph has one node per rule."""
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    r = snakemake("--list-rules")
    assert r.returncode == 0, r.stderr
    rules = {line.strip() for line in r.stdout.splitlines() if line.strip()} - {"all", "released"}
    targets = {r for r in rules if r.startswith("paper_")}  # named targets, no command
    assert targets == {"paper_act", "paper_detr", "paper_detrdistill", "paper_lite_detr", "paper_sparse_detr"}
    assert rules - targets == {"data", "pretrain", "train", "eval", "flops", "speed", "table", "report"}
    plan = snakemake("-n", "--forceall", "--cores", "2", "all")
    assert plan.returncode == 0, plan.stderr
    assert set(planned_stages(plan.stdout)) - {"all"} == set(dvc)
    # priority: the expected seconds of work from a job to the end (the DAG's own table)
    stage_list = stages.build_stages(stages.load_raw(str(REPO / "params.yaml")))
    table = {st.name: st for st in stage_list}
    planned = planned_stages(plan.stdout)
    prio = {name: int(re.search(r"^\s+priority: (\d+)$", block, flags=re.M).group(1))
            if re.search(r"^\s+priority:", block, flags=re.M) else 0 for name, block in planned.items()}
    assert all(prio[n] == table[n].priority for n in dvc)
    # which teacher leads depends on the recorded times in reports/metrics (they change with
    # every run), so check the order the graph fixes: the highest-priority training heads the
    # critical path, and a job outranks every job that waits on it
    trainings = {n: p for n, p in prio.items() if n.startswith("train_")}
    _, path = stages.critical_path(stage_list, stages.estimated_seconds(stage_list))
    assert trainings[next(n for n in path if n.startswith("train_"))] == max(trainings.values())  # ties allowed
    assert prio["pretrain"] > max(trainings.values())
    assert prio["train_detr_dc5"] > prio["train_detr_student_detrdistill_seed42"] > prio["eval_detr_student_detrdistill_seed42"]
    assert prio["train_deformable_detr_topk_enc6"] > prio["train_deformable_student_detrdistill"]
    graph = snakemake("--rulegraph", "--forceall", "--cores", "2", "all")
    assert graph.returncode == 0, graph.stderr
    assert len(re.findall(r"label = \"", graph.stdout)) == 9  # the 8 kinds + all


def test_priority_is_the_longest_chain_of_expected_work(tmp_path):
    """A long training with one eval behind it goes before a short one that two stages wait
    on; an unrecorded training counts as the median recorded one; other stages a minute."""
    def metrics(name, seconds=None):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"train_seconds": seconds} if seconds else {}))
        return str(path)
    table = [stages.Stage("train_long", [], [], outs=["long.pt"], metrics=[metrics("long", 1000.0)], kind="train"),
             stages.Stage("train_short", [], [], outs=["short.pt"], metrics=[metrics("short", 100.0)], kind="train"),
             stages.Stage("train_new", [], [], deps=["short.pt"], outs=["new.pt"], metrics=[metrics("new")],
                          kind="train"),
             stages.Stage("eval_long", [], [], deps=["long.pt"], outs=["long.json"], kind="eval"),
             stages.Stage("eval_new", [], [], deps=["new.pt"], outs=["new.json"], kind="eval")]
    stages._set_priorities(table)
    prio = {st.name: st.priority for st in table}
    # the median of the recorded trainings (100, 1000) is the upper one, 1000
    assert prio == {"train_long": 1060, "train_short": 1160, "train_new": 1060, "eval_long": 60, "eval_new": 60}
    table[0].metrics = [metrics("long", 3000.0)]
    stages._set_priorities(table)
    assert table[0].priority == 3060 and table[1].priority == 100 + 3000 + 60
    pre = tmp_path / "pretrain.json"  # the pre-training records its time as `seconds`
    pre.write_text(json.dumps({"seconds": 56.0}))
    assert stages.recorded_seconds(stages.Stage("pretrain", [], [], metrics=[str(pre)])) == 56.0
    assert stages.recorded_seconds(stages.Stage("eval_x", [], [], metrics=[str(pre)], kind="eval")) is None


def test_snakemake_plan_matches_dvc_commands_and_outputs():
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    r = snakemake("-n", "-p", "--forceall", "all")
    assert r.returncode == 0, r.stderr
    for name, st in dvc.items():
        assert st["cmd"] in r.stdout, f"{name}: command differs between Snakemake and dvc.yaml"
        outs = [next(iter(o)) if isinstance(o, dict) else o for o in st.get("outs", []) + st.get("metrics", [])]
        for o in outs:
            assert o in r.stdout, f"{name}: output {o} missing from the Snakemake plan"


def test_every_stage_runs_one_effdetr_command_and_reads_params():
    for st in stages.build_stages(stages.load_raw(str(REPO / "params.yaml"))):
        assert st.cmd[0] == "effdetr" and "--params" in st.cmd
        assert st.params_keys and st.all_outputs()


def synth_copy(tmp_path, edit=None) -> str:
    """The repo's params.yaml copied with `profile: synth` (whatever profile the user's file is
    switched to), optionally edited; returns its path."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["profile"] = "synth"
    if edit:
        edit(raw)
    path = tmp_path / "params_synth.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return str(path)


def synth_stages(tmp_path, edit=None) -> dict[str, stages.Stage]:
    return {st.name: st for st in stages.build_stages(stages.load_raw(synth_copy(tmp_path, edit)))}


def test_params_json_is_exactly_the_keys_read(tmp_path):
    params = synth_copy(tmp_path)
    raw = stages.load_raw(params)
    by_name = {s.name: s for s in stages.build_stages(raw)}
    fresh = stages.load_raw(params)
    train_before, eval_before = by_name["train_detr_dc5"].params_json(raw), by_name["eval_detr_dc5"].params_json(raw)
    raw["profiles"]["synth"]["eval"]["batch_size"] += 1  # eval-only knob
    assert by_name["train_detr_dc5"].params_json(raw) == train_before
    assert by_name["eval_detr_dc5"].params_json(raw) != eval_before
    raw["profiles"]["synth"]["train"]["lr"] *= 2
    assert by_name["train_detr_dc5"].params_json(raw) != train_before
    assert by_name["data"].params_json(raw) == by_name["data"].params_json(fresh)


def test_lint_clean():
    r = snakemake("--lint")
    assert r.returncode == 0, r.stdout + r.stderr
    assert not re.search(r"Lints for", r.stdout + r.stderr), r.stdout + r.stderr


def test_snakefmt_clean():
    r = subprocess.run([str(BIN / "snakefmt"), "--check", "workflow"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_experiment_threads_reach_its_train_and_eval_stages(tmp_path):
    """train.threads (1 in the synth profile: two single-thread jobs side by side on 2 cores)
    sets the Snakemake job size of every training and eval; the pre-training, which every
    other job waits on, takes all cores, and so does a job whose experiment sets no threads."""
    params = synth_copy(tmp_path)
    by_name = {st.name: st for st in stages.build_stages(stages.load_raw(params))}
    assert all(st.threads == 1 for n, st in by_name.items() if n.startswith(("train_", "eval_")))
    assert by_name["pretrain"].threads is None and by_name["pretrain"].heavy
    r = snakemake("-n", "--forceall", "--cores", "2", "data/checkpoints/sparse_detr_rho0p1.pt",
                  "data/checkpoints/detr_dc5.pt", "--config", f"params={params}")
    assert r.returncode == 0, r.stderr
    blocks = planned_stages(r.stdout)
    assert "threads: 2" in blocks["pretrain"]  # Snakemake prints threads only above 1
    assert "threads:" not in blocks["train_sparse_detr_rho0p1"] and "threads:" not in blocks["train_detr_dc5"]

    def all_cores_for_detr(raw):
        del raw["profiles"]["synth"]["train"]["threads"]
    params = synth_copy(tmp_path, all_cores_for_detr)
    by_name = {st.name: st for st in stages.build_stages(stages.load_raw(params))}
    assert by_name["train_detr_dc5"].threads is None and by_name["train_detr_dc5"].heavy
    r = snakemake("-n", "--forceall", "--cores", "2", "data/checkpoints/detr_dc5.pt", "--config", f"params={params}")
    assert r.returncode == 0, r.stderr
    assert "threads: 2" in planned_stages(r.stdout)["train_detr_dc5"]


def test_snakemake_inputs_include_the_published_numbers():
    """Editing a paper's YAML (e.g. a claim margin) must rerun the report under Snakemake too:
    folder deps expand to their .py and .yaml files."""
    from pathlib import Path

    from effdetr.stages import SRC, expand_deps
    files = expand_deps([f"{SRC}/reporting"], Path(__file__).resolve().parents[1])
    assert f"{SRC}/reporting/tables.py" in files
    assert f"{SRC}/reporting/paper/lite_detr.yaml" in files


def test_released_target_plans_only_the_imports_and_their_evaluations(tmp_path):
    """coco profile: `snakemake released` = data + every import + the evaluations of
    released weights (ACT on DETR-DC5 included), and no training."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["profile"] = "coco"
    params = tmp_path / "params_coco.yaml"
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    r = snakemake("released", "-n", "--forceall", "--config", f"params={params}")
    assert r.returncode == 0, r.stderr
    jobs = set(planned_stages(r.stdout)) - {"released"}
    expanded = stages.expand_experiments(raw["experiments"], "p")
    imported = {n for n, (_, e) in expanded.items() if "import" in e["stages"]}
    derived = {n for n, (_, e) in expanded.items() if e.get("init_from") in imported}
    assert len(imported) == 13 and len(derived) == 5
    assert jobs == {"data"} | {f"import_{n}" for n in imported} | {f"eval_{n}" for n in imported | derived}
    assert not any(j.startswith("train_") for j in jobs) and "eval_act_official_L16" in jobs
    synth = snakemake("released", "-n", "--forceall")
    assert synth.returncode == 0, synth.stderr
    assert set(planned_stages(synth.stdout)) <= {"released"}  # empty on SynthCOCO


def test_stages_that_read_the_data_depend_on_its_manifest():
    """The data stage writes <root>.manifest.json beside the root; every stage reading the data
    lists both (DVC hashes the root, Snakemake sees the manifest's time)."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    for profile in ("synth", "coco"):
        raw["profile"] = profile
        root = raw["profiles"][profile]["data"]["root"]
        built = stages.build_stages(raw)
        data = next(st for st in built if st.name == "data")
        assert f"{root}.manifest.json" in data.outs and root in data.out_dirs
        readers = [st for st in built if "--data" in st.cmd]
        assert {st.name.split("_")[0] for st in readers} >= {"train", "eval", "speed"}
        for st in readers:
            assert root in st.deps and f"{root}.manifest.json" in st.deps, st.name


def _tiny_dag_up_to_date(workdir):
    """The tiny params' DAG with real data and stand-ins for every later output, all marked
    up to date by Snakemake; returns (stages, data config)."""
    import shutil

    from effdetr.config import profile_config
    from effdetr.data.synthcoco import generate
    from tests.conftest import TINY
    shutil.copy(TINY, workdir / "params.yaml")
    built = stages.build_stages(stages.load_raw("params.yaml"))
    data = profile_config("params.yaml").data
    generate(data.synth, data.root)  # its manifest: written when Snakemake first parses
    for st in built:
        if st.name != "data":
            for out in st.outs + st.metrics + st.plots:
                (workdir / out).parent.mkdir(parents=True, exist_ok=True)
                (workdir / out).write_text("{}")
            for out in st.out_dirs:
                (workdir / out).mkdir(parents=True, exist_ok=True)
    r = snakemake("--touch", "--cores", "1", "all", cwd=workdir)
    assert r.returncode == 0, r.stderr
    r = snakemake("-n", "--cores", "1", "all", cwd=workdir)
    assert r.returncode == 0 and "Nothing to be done" in r.stdout + r.stderr, r.stdout
    return built, data


def test_in_place_data_edit_reruns_the_stages_that_read_it(workdir):
    """Everything up to date, then one annotation edited in place: Snakemake (which compares
    times, and a folder's time ignores edits inside it) plans every stage reading the data."""
    import json

    built, data = _tiny_dag_up_to_date(workdir)
    ann = workdir / data.root / "annotations" / "instances_train.json"
    doc = json.loads(ann.read_text())
    doc["annotations"][0]["bbox"][0] += 1
    ann.write_text(json.dumps(doc))
    r = snakemake("-n", "--cores", "1", "all", cwd=workdir)
    assert r.returncode == 0, r.stderr
    jobs = set(planned_stages(r.stdout))
    readers = {st.name for st in built if "--data" in st.cmd}
    assert readers <= jobs and "data" not in jobs, jobs
    assert "annotations/instances_train.json" in r.stderr  # told why


def test_a_killed_job_reruns_instead_of_blocking_the_dag(workdir):
    """A job killed outright (SIGKILL, a session's end) leaves Snakemake's incomplete marker on
    its output; the next `snakemake all` must rerun that job (training resumes from its
    last.pt), not stop with IncompleteFilesException: the workflow's default profile says so."""
    import base64

    _tiny_dag_up_to_date(workdir)
    out = "data/checkpoints/detr_dc5.pt"
    marker = workdir / ".snakemake" / "incomplete" / base64.b64encode(out.encode()).decode()
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text("")
    r = snakemake("-n", "--cores", "1", "all", cwd=workdir)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "train_detr_dc5" in set(planned_stages(r.stdout))


# -- what the DAG means: each stage waits for the files its command reads --------------------
CKPT = "data/checkpoints/{}.pt"
WEIGHT_FLAGS = ("--init", "--teacher", "--checkpoint", "--backbone")


def producers(by_name: dict) -> dict[str, str]:
    return {out: st.name for st in by_name.values() for out in st.all_outputs()}


def test_every_checkpoint_a_command_reads_is_a_dep_made_by_another_stage(tmp_path):
    """--init / --teacher / --checkpoint / --backbone: the file is in the stage's deps (or the
    stage could start before it exists, or not rerun when it changes) and another stage makes it."""
    by_name = synth_stages(tmp_path)
    made_by = producers(by_name)
    checked = 0
    for st in by_name.values():
        for flag, value in zip(st.cmd, st.cmd[1:]):
            if flag in WEIGHT_FLAGS:
                assert value in st.deps, f"{st.name}: reads {value} ({flag}) but does not depend on it"
                assert made_by.get(value) not in (None, st.name), f"{st.name}: no other stage makes {value}"
                checked += 1
    assert checked > 40  # every train stage (backbone or init/teacher) and every eval stage


def test_mtkd_training_depends_on_the_teachers_checkpoint(tmp_path):
    """ACT+MTKD fine-tunes from detr_dc5 and distils from its teacher: with the shipped params
    both are detr_dc5, so a copy with another teacher (its second seed) tells them apart."""
    by_name = synth_stages(tmp_path)
    for L in (32, 24, 20, 16):
        st = by_name[f"train_act_mtkd_L{L}"]
        assert CKPT.format("detr_dc5") in st.deps and "--teacher" in st.cmd
        assert st.cmd[st.cmd.index("--teacher") + 1] == CKPT.format("detr_dc5")
    assert producers(by_name)[CKPT.format("detr_dc5")] == "train_detr_dc5"
    student = by_name["train_deformable_student_detrdistill"]  # a DETRDistill student, no init
    assert CKPT.format("deformable_detr_topk_enc6") in student.deps

    def other_teacher(raw):
        raw["experiments"]["act_mtkd"]["distill"]["teacher"] = "detr_dc5_seed43"
    by_name = synth_stages(tmp_path, other_teacher)
    for L in (32, 24, 20, 16):
        st = by_name[f"train_act_mtkd_L{L}"]
        assert {CKPT.format("detr_dc5"), CKPT.format("detr_dc5_seed43")} <= set(st.deps), st.deps
        assert st.cmd[st.cmd.index("--teacher") + 1] == CKPT.format("detr_dc5_seed43")
        assert st.cmd[st.cmd.index("--init") + 1] == CKPT.format("detr_dc5")
    assert producers(by_name)[CKPT.format("detr_dc5_seed43")] == "train_detr_dc5_seed43"


def test_eval_only_act_rows_depend_on_their_init_checkpoint(tmp_path):
    """ACT and K-means rows evaluate detr_dc5's weights with swapped kernels (no training of
    their own): their eval reads, and waits for, data/checkpoints/detr_dc5.pt; so does speed."""
    by_name = synth_stages(tmp_path)
    rows = [f"act_L{L}" for L in (32, 24, 20, 16)] + [f"act_kmeans_L{L}" for L in (32, 24, 20, 16)] \
        + ["act_L32_hashseed100"]
    for name in rows:
        assert f"train_{name}" not in by_name
        st = by_name[f"eval_{name}"]
        assert st.cmd[st.cmd.index("--checkpoint") + 1] == CKPT.format("detr_dc5")
        assert CKPT.format("detr_dc5") in st.deps, name
    assert CKPT.format("detr_dc5") in by_name["speed"].deps
    assert producers(by_name)[CKPT.format("detr_dc5")] == "train_detr_dc5"


def test_each_table_depends_on_exactly_the_metrics_files_it_reads(tmp_path):
    """Every metrics file is some table's dep (so a rerun of any rebuilds its table), each
    table's deps are its own rows' files only (a Lite DETR rerun rebuilds no ACT table), and
    the index reads every table. (The backbone's pretrain.json is read by no table; a new
    backbone reruns the trainings, whose metrics are deps.)"""
    by_name = synth_stages(tmp_path)
    tables = {n: st for n, st in by_name.items() if n.startswith("table_")}
    read = {d for st in tables.values() for d in st.deps if d.startswith("reports/metrics/")}
    metrics = {m for st in by_name.values() for m in st.metrics}
    assert metrics - read == {"reports/metrics/backbone/pretrain.json"}
    act = {d for d in tables["table_act_main"].deps if d.startswith("reports/metrics/")}
    assert {"reports/metrics/act_L16/eval.json", "reports/metrics/act_mtkd_L16/train.json",
            "reports/metrics/detr_dc5/eval.json", "reports/metrics/detr_dc5_seed43/eval.json"} <= act
    assert not {d for d in act if "lite" in d or "sparse" in d or "student" in d}, act
    assert tables["table_flops"].deps[0] == "reports/metrics/flops.json"
    assert "reports/metrics/speed.json" in tables["table_act_speed"].deps
    for st in tables.values():  # and no table writes another's files
        assert all(o.startswith(("reports/tables/", "reports/figures/")) for o in st.outs)
    assert len({o for st in tables.values() for o in st.outs}) == sum(len(st.outs) for st in tables.values())
    index = set(by_name["report"].deps)
    assert {f"reports/tables/{n.removeprefix('table_')}.md" for n in tables} <= index
    assert by_name["report"].outs == ["reports/README.md"]
