"""runners/cli.py: argument types and the speed flags shared by the test scripts and
main_restore."""
import argparse

import pytest

import runners.demo
import runners.evaluation
import runners.restore

from runners.cli import (add_speed_args, bounded_int, non_negative_float, quality_factor,
                         speed_options)
from utils.errors import UserError


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


def _speed(*argv):
    parser = argparse.ArgumentParser()
    add_speed_args(parser)
    return speed_options(parser.parse_args(argv))


def test_unset_speed_flags_leave_restores_defaults():
    assert _speed() == {}
    assert _speed("--precision", "bf16", "--tile-cache-gib", "0", "--channels-last",
                  "--compile", "--x8") == dict(precision="bf16", tile_cache_gib=0.0,
                                               channels_last=True, compile=True, x8=True)


@pytest.mark.parametrize("tile, overlap", [(16, 8), (48, 24), (64, 32), (512, 32)])
def test_a_tile_alone_gets_the_default_overlap_capped_at_half(tile, overlap):
    assert _speed("--tile", str(tile)) == dict(tile=tile, tile_overlap=overlap)
    assert _speed("--tile", str(tile), "--tile-overlap", "0") == dict(tile=tile, tile_overlap=0)


def test_flags_that_do_not_fit_together_name_the_flags():
    with pytest.raises(UserError, match=r"^--tile-overlap 64: must be at most half the tile "
                                        r"\(--tile 96, so at most 48\)"):
        _speed("--tile", "96", "--tile-overlap", "64")


@pytest.mark.parametrize("text", ["-0.5", "inf", "nan", "lots"])
def test_non_negative_float_refuses(text):
    with pytest.raises(argparse.ArgumentTypeError):
        non_negative_float(text)


@pytest.mark.parametrize("parser", [
    *(runners.evaluation.build_parser(preset) for preset in (
        runners.evaluation.COLOR, runners.evaluation.GRAY, runners.evaluation.GRAY_DOUBLE,
        runners.evaluation.COLOR_REAL)),
    runners.restore.build_parser(), runners.demo.build_parser()],
    ids=["color", "gray", "gray_double", "color_real", "restore", "demo"])
def test_every_script_explains_device(parser):
    (action,) = [a for a in parser._actions if "--device" in a.option_strings]
    assert action.help and "auto (CUDA when PyTorch finds a GPU, else the CPU)" in action.help
    assert "(default auto)" in parser.format_help().replace("\n", " ").replace("  ", " ")
