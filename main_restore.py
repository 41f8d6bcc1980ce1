"""Restore your own JPEGs with FBCNN, or report their JPEG quality (--qf-estimate).

    python main_restore.py photos/ -o restored/ [--qf auto|header|dominant|N]
    python main_restore.py --qf-estimate 'scans/*.jpg' --json qf.json

A thin entry point over runners/restore.py; `--help` lists the options and docs/restore.md
explains them.
"""
import sys

from runners.restore import main

if __name__ == "__main__":
    sys.exit(main(prog="main_restore.py"))
