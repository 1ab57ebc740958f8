# Packaging truths (README "Install and tested versions"): the declared floors work together, and the wheel
# works on its own. Included from the Makefile, which defines PYTHON, PIP and TORCH.

# test-floor: a virtualenv made from nothing with the oldest Python and every dependency at its declared floor
# (mk/floor.py turns pyproject's `>=` into `==`), running the core tests. Torch's floor has no CPU-only build on
# PyPI, so the first run downloads its CUDA build (~3 GB; it runs on the CPU); pip's cache keeps it after that.
# The oldest Python that pyproject admits; pyenv's copy when the shim does not expose it.
PYTHON_FLOOR ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.10.*/bin/python3.10) python3.10)
FLOOR_VENV ?= outputs/venv-floor
FLOOR_TESTS := tests/test_estimators.py tests/test_layers.py tests/test_trainer.py tests/test_distributed.py \
	tests/test_scale.py tests/test_sam_trainer.py tests/test_measures.py tests/test_lm_head.py

.PHONY: test-floor test-wheel

test-floor:
	@$(PYTHON_FLOOR) --version >/dev/null 2>&1 || { echo "$(PYTHON_FLOOR) does not run; set PYTHON_FLOOR=/path/to/python3.10"; exit 1; }
	rm -rf $(FLOOR_VENV)
	$(PYTHON_FLOOR) -m venv $(FLOOR_VENV)
	$(PYTHON) mk/floor.py > $(FLOOR_VENV)/floor.txt
	$(FLOOR_VENV)/bin/python -m pip install --quiet -c $(FLOOR_VENV)/floor.txt -e ".[test]"
	$(FLOOR_VENV)/bin/python -m pip list --format freeze > $(FLOOR_VENV)/installed.txt
	. $(FLOOR_VENV)/bin/activate && python -m pytest -q $(FLOOR_TESTS)

# test-wheel: build the wheel, install it into a virtualenv made from nothing, and run what a user runs first.
test-wheel: install
	$(PYTHON) -m pytest -q -m slow tests/test_packaging.py
