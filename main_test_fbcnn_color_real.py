"""Evaluate FBCNN on real-world colour JPEGs with QF control (testsets/Real).

A preset of the shared runner in runners/evaluation.py; `--help` lists the options.
"""
import sys

from runners.evaluation import COLOR_REAL, main

if __name__ == "__main__":
    sys.exit(main(COLOR_REAL))
