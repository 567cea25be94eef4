# dalle-data: `make demo` and `make test` set everything up on a fresh machine.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CORES ?= 2
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export WANDB_MODE := disabled
export NO_ALBUMENTATIONS_UPDATE := 1

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-8s %s\n", $$1, $$2}'

setup: $(STAMP) ## create .venv with the whole stack (idempotent; a second run does nothing)

# The install order is the fix for three traps (../shared/ENVIRONMENT.md): youtokentome
# needs Cython + wheel without build isolation; torchvision must match torch 2.14.1;
# dalle_pytorch needs pkg_resources (setuptools<81). The spark and storage extras are
# installed because the test suite exercises them. So is the slurm extra, but in
# $(VENV)/slurm, off the venv's path: Snakemake imports every installed executor plugin at
# each start, and this one imports pandas (0.45 s) for a cluster one machine never submits
# to. tests/test_profiles.py puts it on PYTHONPATH; on a cluster, `pip install .[slurm]`.
# An editable install leaves our modules' bytecode to the interpreter, which never writes
# it under PYTHONDONTWRITEBYTECODE: compileall writes it, as pip does for other packages.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -U pip Cython wheel "setuptools>=77,<81"
	$(PY) -m pip install -q --no-build-isolation youtokentome==1.0.6
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[dev,spark,storage,clip]"
	$(PY) -m pip install -q --upgrade --no-deps --target $(VENV)/slurm \
		snakemake-executor-plugin-slurm==2.8.0 snakemake-executor-plugin-slurm-jobstep==0.6.1
	$(PY) -m compileall -q dalle_data
	@# pyspark (the Spark download test) needs a Java runtime; Debian ships one.
	command -v java >/dev/null || (apt-get update -q && apt-get install -y -q default-jre-headless)
	@# The collection's lineage.png is drawn by graphviz's `dot`.
	command -v dot >/dev/null || (apt-get update -q && apt-get install -y -q graphviz)
	@# The serve page's browser test drives Debian's chromium; without it that test is skipped.
	command -v chromium >/dev/null || (apt-get update -q && apt-get install -y -q chromium chromium-driver) \
		|| echo "chromium could not be installed: tests/test_serve.py skips its browser test"
	touch $(STAMP)

demo: setup ## the offline demo: sample shards -> tiny model -> extended checkpoint + card
	$(VENV)/bin/snakemake --cores $(CORES) --profile configs/profiles/local all
	@$(PY) -m dalle_data.demo.summary data

test: setup ## run the test suite (offline; about 10 minutes on 2 cores)
	$(PY) -m pytest -q -rs

# snakemake --lint must pass except for "Specify a conda environment or container for each
# rule", which cannot apply: every rule runs `dalle-data` from the one venv `make setup`
# installs. snakemake 9.27's `--lint json` is unusable (the CLI ignores the format, the
# API's JSON encoder fails on snakefile paths), so its text report is filtered: any other
# lint, or any output that is not a lint (an error), fails the target and is printed.
define SNAKEMAKE_LINT_FILTER
import re, subprocess, sys
IGNORED = "    * Specify a conda environment or container for each rule.:"
run = subprocess.run([sys.argv[1], "--lint", "-n"], capture_output=True, text=True)
report = []
blocks = re.split(r"\n(?=\S)", (run.stdout + run.stderr).strip()) if run.returncode else []
for block in blocks:
    head, *items = re.split(r"\n(?=    \* )", block)
    kept = [i for i in items if i.split("\n")[0] != IGNORED]
    if kept or not head.startswith("Lints for "):
        report.append("\n".join([head, *kept]))
if report:
    sys.exit("\n\n".join(report))
endef
export SNAKEMAKE_LINT_FILTER

lint: setup ## ruff, snakemake --lint (minus the conda/container lint) and mypy
	$(VENV)/bin/ruff check dalle_data tests benchmarks
	$(VENV)/bin/ruff format --check dalle_data tests benchmarks
	$(PY) -c "$$SNAKEMAKE_LINT_FILTER" $(VENV)/bin/snakemake
	$(VENV)/bin/mypy dalle_data

bench: setup ## run benchmarks/* and rewrite BENCHMARKS.md
	$(PY) benchmarks/run_all.py

clean: ## remove built data (keeps .venv)
	rm -rf data .snakemake

.PHONY: help setup demo test lint bench clean
