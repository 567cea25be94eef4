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
# dalle_pytorch needs pkg_resources (setuptools<81). The spark and slurm extras are
# installed because the test suite exercises both.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -U pip Cython wheel "setuptools>=77,<81"
	$(PY) -m pip install -q --no-build-isolation youtokentome==1.0.6
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[dev,spark,slurm]"
	@# pyspark (the Spark download test) needs a Java runtime; Debian ships one.
	command -v java >/dev/null || (apt-get update -q && apt-get install -y -q default-jre-headless)
	touch $(STAMP)

demo: setup ## the offline demo: sample shards -> tiny model -> extended checkpoint + card
	$(VENV)/bin/snakemake --cores $(CORES) --profile configs/profiles/local all
	@$(PY) -m dalle_data.demo_summary data

test: setup ## run the test suite (offline; about 10 minutes on 2 cores)
	$(PY) -m pytest -q

lint: setup ## ruff, snakemake --lint and mypy
	$(VENV)/bin/ruff check dalle_data tests benchmarks
	$(VENV)/bin/ruff format --check dalle_data tests benchmarks
	$(VENV)/bin/snakemake --lint -n
	$(VENV)/bin/mypy dalle_data

bench: setup ## run benchmarks/* and rewrite BENCHMARKS.md
	$(PY) benchmarks/run_all.py

clean: ## remove built data (keeps .venv)
	rm -rf data .snakemake

.PHONY: help setup demo test lint bench clean
