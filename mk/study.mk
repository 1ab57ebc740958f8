# The study: when does FAM improve held-out performance, against what users would do instead?
# (study/run.py, STUDY.md). Included from the Makefile, which defines PYTHON, PIP and the `install` target.

# Quick: a smoke version of tasks (a) and (c), ≤ 45 min on 2 CPU cores (33 min on an idle machine, 3 Dec; every
# output says QUICK; records in outputs/).
# Full: task (a) in all four data-size regimes (FAM body with Gauss–Newton in its own config), (b) with its control
# and follow-up, (b′) with its follow-up, (c) at lr 2e-3, and the older 200-step SmolLM2 + LoRA study; meant for a
# GPU. Records go to studies/<task>/ (tracked): a finished run is never redone, so each config trains only what the
# committed records lack.
# Task (a)'s two smallest regimes alone, on a CPU: $(PYTHON) study/run.py --config configs/study_minilm_rt.yaml
STUDY_QUICK_CONFIGS ?= configs/study_minilm_quick.yaml configs/study_smollm2_shakespeare_quick.yaml
STUDY_CONFIGS ?= configs/study_minilm.yaml configs/study_minilm_gauss_newton.yaml configs/study_minilm_debates.yaml \
	configs/study_minilm_debates_plain_short.yaml configs/study_minilm_debates_fam_body_n300.yaml \
	configs/study_minilm_conventions.yaml configs/study_minilm_conventions_fam_body.yaml \
	configs/study_smollm2_shakespeare_lr2e-3.yaml configs/study_smollm2_lora.yaml

# The study's tasks on a CPU (each resumes from its committed records: run them one per core); `study-tables`
# rebuilds every table (each task's results.md, STUDY.md's decision table) from those records, training nothing.
STUDY_TASK_CONFIGS ?= configs/study_minilm_rt.yaml configs/study_minilm_rt_gauss_newton.yaml \
	configs/study_minilm_debates.yaml configs/study_minilm_debates_plain_short.yaml \
	configs/study_minilm_debates_fam_body_n300.yaml configs/study_minilm_conventions.yaml \
	configs/study_minilm_conventions_fam_body.yaml configs/study_smollm2_shakespeare.yaml \
	configs/study_smollm2_shakespeare_lr2e-3.yaml configs/study_minilm_rt_flatness_sets.yaml \
	configs/study_minilm_debates_flatness_sets.yaml configs/study_minilm_debates_fam_multi_last_block.yaml \
	configs/study_smollm2_shakespeare_lr2e-3_flatness_sets.yaml \
	configs/study_smollm2_shakespeare_lr2e-3_measures.yaml

.PHONY: study-quick study study-tables

study-quick: install install-assets
	@for config in $(STUDY_QUICK_CONFIGS); do \
		$(PYTHON) study/run.py --config $$config || exit 1; \
	done

study: install install-assets
	@for config in $(STUDY_CONFIGS); do \
		$(PYTHON) study/run.py --config $$config || exit 1; \
	done
	$(MAKE) study-tables  # folders shared by two configs: their tables from every record in them

study-tables:
	$(PYTHON) study/report.py --document STUDY.md $(STUDY_TASK_CONFIGS)
