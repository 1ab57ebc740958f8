# Benchmarks: FAM and SAM steps timed against the plain Trainer step (benchmarks/, BENCHMARKS.md).
# Included from the Makefile, which defines PYTHON, PIP and the `install` target.

# Each target rewrites only its own section of $(BENCH_OUT) (between <!-- bench:quick/full:start/end --> markers)
# and leaves the raw figures in outputs/bench/. BENCH_ARGS adds options, e.g. BENCH_ARGS="--threads 1 --repeats 20".
BENCH_OUT ?= BENCHMARKS.md
BENCH_ARGS ?=

.PHONY: bench bench-quick

# Every case: MiniLM head, SmolLM2 full fine-tune (LM head), SmolLM2 LoRA (LM head, probe); ~40 min on 2 CPU cores.
bench: install install-assets
	@mkdir -p outputs/bench
	$(PYTHON) benchmarks/bench_steps.py --out $(BENCH_OUT) --json outputs/bench/full.json --make "make bench" $(BENCH_ARGS)

# MiniLM head + SmolLM2 LoRA at 128 tokens, fewer rounds: ≤ 10 min on 2 CPU cores.
bench-quick: install install-assets
	@mkdir -p outputs/bench
	$(PYTHON) benchmarks/bench_steps.py --quick --out $(BENCH_OUT) --json outputs/bench/quick.json --make "make bench-quick" $(BENCH_ARGS)
