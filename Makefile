# The CPU build of torch is pinned first: an unpinned `torch` pulls a multi-GB CUDA build.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
TORCH := torch==2.13.0

.PHONY: install install-oracle test test-all test-ranks-under-load lint

.DEFAULT_GOAL := install
include mk/recipes.mk mk/bench.mk mk/study.mk mk/packaging.mk

# What the README's two commands need: the package with its test and plot extras (`dev` includes `plots`).
install:
	$(PIP) install --quiet $(TORCH)
	$(PIP) install --quiet -e ".[dev]"

test: install install-assets install-oracle
	$(PYTHON) -m pytest -q

# The independent oracle of tests/test_oracle_curvlinops.py: curvlinops and what it imports, pinned, with --no-deps,
# because curvlinops declares backpack-for-pytorch, which pulls torchvision and with it a CUDA build of torch
# (curvlinops never imports either). Not an extra of pyproject.toml for that reason: an extra would pull them.
ORACLE := curvlinops-for-pytorch==3.0.1 einops==0.8.2 opt-einsum==3.4.0 einconv==0.1.0 linear-operator==0.6.1 \
	jaxtyping==0.3.11
install-oracle: install
	$(PIP) install --quiet --no-deps $(ORACLE)

# Also the tests marked slow; the DeepSpeed ones need the `deepspeed` extra (its CPU accelerator JIT-builds one
# op on first use).
test-all: install install-assets
	$(PIP) install --quiet -e ".[dev,deepspeed]"
	$(PYTHON) -m pytest -q -m ""

# The multi-process tests (real ranks) RUNS times in a row while busy loops hold every core, as on a loaded CI
# machine, where a rank once aborted at exit (fam_hf.distributed.leave_process_group); a tally, and exit 1 on any failure.
RUNS ?= 20
test-ranks-under-load: install install-assets
	$(PYTHON) mk/under_load.py --runs $(RUNS) -- $(PYTHON) -m pytest -q -m "multiprocess and not slow"

lint:
	$(PYTHON) -m ruff check fam_hf tests recipes benchmarks study mk
