"""Evaluate FBCNN on colour images, single JPEG (LIVE1_color, QF 10..90).

A preset of the shared runner in runners/evaluation.py; `--help` lists the options.
"""
import sys

from runners.evaluation import COLOR, main

if __name__ == "__main__":
    sys.exit(main(COLOR))
