# The study: plain vs FAM vs SAM on real data over seeds (recipes/study.py, STUDY.md).
# Included from the Makefile, which defines PYTHON, PIP and the `install` target.
