"""Evaluate FBCNN on grayscale non-aligned double JPEG (LIVE1_gray, QF1 x QF2 in {10, 30, 50},
    shift 4).

A preset of the shared runner in runners/evaluation.py; `--help` lists the options.
"""
import sys

from runners.evaluation import GRAY_DOUBLE, main

if __name__ == "__main__":
    sys.exit(main(GRAY_DOUBLE))
