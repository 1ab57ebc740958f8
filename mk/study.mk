# The study: plain vs FAM vs SAM on real data over seeds (recipes/study.py, STUDY.md).
# Included from the Makefile, which defines PYTHON, PIP and the `install` target.

# Quick: both tasks reduced to fit ≤ 45 min on 2 CPU cores (fewer seeds and steps; every output says QUICK).
# Full: 5 seeds and the recipes' full runs; meant for a GPU (the recipes use one when there is one).
# A finished run is never redone, so an interrupted study resumes where it stopped; outputs in outputs/study*/.
STUDY_QUICK_CONFIGS ?= configs/study_minilm_quick.yaml configs/study_smollm2_lora_quick.yaml
STUDY_CONFIGS ?= configs/study_minilm.yaml configs/study_smollm2_lora.yaml

.PHONY: study-quick study

study-quick: install install-assets
	@for config in $(STUDY_QUICK_CONFIGS); do \
		$(PYTHON) recipes/study.py --config $$config || exit 1; \
	done

study: install install-assets
	@for config in $(STUDY_CONFIGS); do \
		$(PYTHON) recipes/study.py --config $$config || exit 1; \
	done
