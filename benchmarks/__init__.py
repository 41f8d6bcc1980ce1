"""Benchmark and evaluation scripts over `benchmarks.benchlib`, run from the checkout's root as
modules: `python -m benchmarks.<name>` (the project is not installed; docs/install.md).
"""
