# Two commands for a fresh machine: `make all` (set up + run the whole DAG), `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Rules and DVC stages call `effdetr`, `snakemake`, `dvc` from the project's venv.
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: all demo test test-fast setup browser dag lint clean-work

all: $(STAMP)
	snakemake --snakefile workflow/Snakefile --cores all all
	effdetr dag sync

# The tiny profile (tests/data/params_tiny.yaml) end to end in demo/, a few minutes on 2 cores:
# its own data, reports, logs and MLflow store; the repository's outputs are not touched.
demo: $(STAMP)
	rm -rf demo && mkdir demo
	cp -r workflow .dvcignore demo/ && cp tests/data/params_tiny.yaml demo/params.yaml && ln -s ../src demo/src
	cd demo && ../$(BIN)/snakemake --snakefile workflow/Snakefile --cores all all
	@echo
	@echo "demo done: tables in demo/reports/README.md, figures in demo/reports/figures/,"
	@echo "runs: .venv/bin/mlflow ui --backend-store-uri sqlite:///demo/mlruns/mlflow.db"

# one pytest worker per core, at most 4 (pytest-xdist); a test file stays on one worker, so its
# module fixtures are built once. Most tests wait on subprocesses (Snakemake, effdetr, DVC).
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); [ $$n -gt 4 ] && n=4; echo $$n)

test: $(STAMP) browser
	$(BIN)/python -m pytest -q --durations=10 -n $(TEST_WORKERS) --dist loadfile

# headless Chromium (Debian's package) for tests/test_mlflow_ui.py; best effort: without it
# (no root, no apt) that test is skipped and says why
browser:
	@command -v chromium >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq --no-install-recommends chromium >/dev/null; } || \
		echo "warning: chromium not installed; tests/test_mlflow_ui.py will be skipped"

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

setup: $(STAMP)

# torch comes from the pinned CPU/CUDA wheels on local disk; pip, never uv/poetry.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

dag: $(STAMP)
	$(BIN)/effdetr dag dvc --out dvc.yaml

lint: $(STAMP)
	$(BIN)/snakemake --snakefile workflow/Snakefile --lint
	$(BIN)/snakefmt --check workflow
