# The CPU build of torch is pinned first: an unpinned `torch` pulls a multi-GB CUDA build.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
TORCH := torch==2.13.0
# Only the slow tests need it (ZeRO-2/3 on two CPU ranks; its CPU accelerator JIT-builds one op on first use).
DEEPSPEED := deepspeed==0.19.8

.PHONY: install test test-all lint

.DEFAULT_GOAL := install
include mk/recipes.mk mk/bench.mk mk/study.mk

install:
	$(PIP) install --quiet $(TORCH)
	$(PIP) install --quiet -e ".[dev]"

test: install install-assets
	$(PYTHON) -m pytest -q

test-all: install install-assets
	$(PIP) install --quiet $(DEEPSPEED)
	$(PYTHON) -m pytest -q -m ""

lint:
	$(PYTHON) -m ruff check fam_hf tests
