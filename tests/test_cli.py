"""utils/cli.py: integer argument types."""
import argparse

import pytest

from utils.cli import bounded_int, quality_factor


@pytest.mark.parametrize("text,value", [("1", 1), ("100", 100), ("55", 55)])
def test_quality_factor_accepts_the_jpeg_range(text, value):
    assert quality_factor(text) == value


@pytest.mark.parametrize("text,needle", [("0", "0 is not in 1..100"), ("101", "101 is not in"),
                                         ("ten", "'ten' is not an integer")])
def test_quality_factor_rejects_with_a_reason(text, needle):
    with pytest.raises(argparse.ArgumentTypeError, match=needle):
        quality_factor(text)


def test_open_bounds_and_multiples():
    tile = bounded_int(16, multiple_of=8)
    assert tile("512") == 512
    with pytest.raises(argparse.ArgumentTypeError, match="at least 16"):
        tile("8")
    with pytest.raises(argparse.ArgumentTypeError, match="multiple of 8"):
        tile("20")
    with pytest.raises(argparse.ArgumentTypeError, match="at most 3"):
        bounded_int(high=3)("4")
