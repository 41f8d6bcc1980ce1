"""Benchmark and evaluation scripts (`python benchmarks/<name>.py`), over `benchmarks.benchlib`.

They import the project as installed by requirements.txt (`-e .`); on a machine where it is not
installed, run them with the repository on the path: `PYTHONPATH=. python benchmarks/<name>.py`.
"""
