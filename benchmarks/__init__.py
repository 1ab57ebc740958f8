"""Benchmarks: FAM and SAM steps timed against the plain ``Trainer`` step (``make bench``, BENCHMARKS.md)."""
