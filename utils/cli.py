"""Command-line argument types shared by the scripts.

This module owns how an integer argument is checked, so every script words the error alike
(argparse then prints it with the option's name and exits with status 2).
"""
import argparse

__all__ = ["bounded_int", "quality_factor"]


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
