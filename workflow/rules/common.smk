# Reads and validates params, builds the stage table. No pipeline logic lives here.
from effdetr import rules as effdetr_rules
from effdetr import stages as effdetr_stages

PARAMS_FILE = config.get("params", "params.yaml")
RAW_PARAMS = effdetr_stages.load_raw(PARAMS_FILE)
STAGES = effdetr_stages.build_stages(RAW_PARAMS, PARAMS_FILE)
ALL_OUTPUTS = [o for st in STAGES for o in st.all_outputs()]
RELEASED_OUTPUTS = effdetr_stages.group_outputs(STAGES, "released")
PAPER_TARGETS = effdetr_stages.paper_targets(STAGES)
RULE_KINDS = effdetr_rules.rule_kinds(STAGES)
# an in-place edit of the dataset moves its manifest's mtime: the stages reading it rerun
effdetr_stages.refresh_data_manifest(RAW_PARAMS)
INVOCATION = effdetr_stages.start_invocation()


def rule_outputs(kind):
    """A kind's output patterns; folders as directory(), the tables and figures as report()."""
    items = kind.report_items()
    outs = []
    for path in kind.outs + kind.out_dirs + kind.metrics + kind.plots:
        out = directory(path) if path in kind.out_dirs else path
        outs.append(report(out, **items[path]) if path in items else out)
    return outs


onstart:
    shell(f"effdetr mlflow init --params {PARAMS_FILE}")


onsuccess:
    shell(f"effdetr mlflow finish --status FINISHED --params {PARAMS_FILE}")


onerror:
    shell(f"effdetr mlflow finish --status FAILED --params {PARAMS_FILE}")
