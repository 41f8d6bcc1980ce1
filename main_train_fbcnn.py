"""Train FBCNN: `python main_train_fbcnn.py -opt options/train_fbcnn_color.json [--set KEY=VALUE]`.

Several GPUs: `torchrun --nproc_per_node N main_train_fbcnn.py -opt ...`. A run resumes by itself
from its newest complete checkpoint. See docs/training.md; the work happens in runners.training.
"""
import argparse
import signal
import sys

from runners.cli import run_cli
from runners.train_options import load_options
from runners.training import train


def main(argv=None):
    parser = argparse.ArgumentParser(description="Train FBCNN from a JSON option file.")
    parser.add_argument("-opt", "--opt", required=True, help="path to the option JSON file")
    parser.add_argument("--set", action="append", default=[], metavar="DOTTED.KEY=VALUE",
                        help="override an option; VALUE is parsed as JSON, else taken as a string "
                             "(repeatable), e.g. --set train.total_iter=1000")
    args = parser.parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _interrupt)  # a scheduler's stop, like Ctrl+C
    try:
        return run_cli(lambda: train(load_options(args.opt, args.set)))
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
