"""What the command-line scripts share: integer argument types and the exit-status contract.

This module owns how an integer argument is checked, so every script words the error alike
(argparse then prints it with the option's name and exits with status 2), and how a script
ends: one `error:` line and status 2 for a UserError, 130 for Ctrl+C.
"""
import argparse
import sys

from utils.errors import UserError

__all__ = ["bounded_int", "quality_factor", "run_cli"]


def bounded_int(low=None, high=None, multiple_of=None, why=""):
    """An argparse type: an integer in [low, high] (either end open when None)."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if low is not None and value < low or high is not None and value > high:
            if high is None:
                bound = f"at least {low}"
            elif low is None:
                bound = f"at most {high}"
            else:
                bound = f"in {low}..{high}"
            raise argparse.ArgumentTypeError(f"{value} is not {bound}{why}")
        if multiple_of and value % multiple_of:
            raise argparse.ArgumentTypeError(f"{value} is not a multiple of {multiple_of}{why}")
        return value
    return parse


quality_factor = bounded_int(1, 100, why=" (the JPEG quality range)")


def run_cli(body):
    """Call `body()` and return the exit status: its own when it returns an int, else 0;
    2 after printing one `error:` line for a UserError; 130 on Ctrl+C."""
    try:
        status = body()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return status if isinstance(status, int) else 0
