"""Evaluate FBCNN on grayscale images, single JPEG (Classic5, QF 10..90).

A preset of the shared runner in runners/evaluation.py; `--help` lists the options.
"""
import sys

from runners.evaluation import GRAY, main

if __name__ == "__main__":
    sys.exit(main(GRAY))
