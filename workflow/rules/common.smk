# Reads and validates params, builds the stage table. No pipeline logic lives here.
from effdetr import stages as effdetr_stages

PARAMS_FILE = config.get("params", "params.yaml")
RAW_PARAMS = effdetr_stages.load_raw(PARAMS_FILE)
STAGES = effdetr_stages.build_stages(RAW_PARAMS, PARAMS_FILE)
ALL_OUTPUTS = [o for st in STAGES for o in st.all_outputs()]
RELEASED_OUTPUTS = effdetr_stages.group_outputs(STAGES, "released")
PAPER_TARGETS = effdetr_stages.paper_targets(STAGES)
# an in-place edit of the dataset moves its manifest's mtime: the stages reading it rerun
effdetr_stages.refresh_data_manifest(RAW_PARAMS)


def stage_inputs(st):
    return effdetr_stages.expand_deps(st.deps)


def stage_outputs(st):
    return st.outs + [directory(d) for d in st.out_dirs] + st.metrics


onstart:
    shell(f"effdetr mlflow init --params {PARAMS_FILE}")
