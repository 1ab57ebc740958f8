# Benchmarks: FAM and SAM steps timed against the plain Trainer step (benchmarks/, BENCHMARKS.md).
# Included from the Makefile, which defines PYTHON, PIP and the `install` target.
