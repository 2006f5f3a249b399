"""Published numbers of each paper, as YAML data (never used to compute reproduced values)."""
from importlib import resources

import yaml


def load_paper_tables() -> dict[str, dict]:
    """table id -> table spec (title, protocol, metrics, rows with paper numbers + claims)."""
    tables = {}
    for f in sorted(resources.files(__name__).iterdir()):
        if f.name.endswith(".yaml"):
            doc = yaml.safe_load(f.read_text())
            for tid, spec in doc["tables"].items():
                tables[tid] = {**spec, "paper": doc["paper"], "source": f.name}
    return tables
