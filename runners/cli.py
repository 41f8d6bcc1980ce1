"""What the command-line scripts share: argument types, the speed flags, the exit contract.

This module owns how an integer argument is checked, so every script words the error alike
(argparse then prints it with the option's name and exits with status 2); the flags that choose
how the network runs (`add_speed_args`: engine, precision, tiles, encoder cache, memory
layout, compile, and the x8 self-ensemble), the same on every test script and `main_restore.py`, and
how they become `models.inference.restore` keyword arguments (`speed_options`); where a
process of a sharded run computes (`shard_device`); and how a script ends: one `error:` line
and status 2 for a UserError, 130 for Ctrl+C.
"""
import argparse
import os
import sys

import torch

from models.engines import ENGINES, INSTALL_OPENVINO
from models.inference import PRECISIONS, check_options, fit_overlap
from utils.errors import UserError

__all__ = ["bounded_int", "quality_factor", "non_negative_float", "tile_size", "DEVICE_HELP",
           "SPEED_FLAGS", "add_speed_args", "speed_options", "shard_device", "run_cli"]

DEVICE_HELP = ("where the network runs: auto (CUDA when PyTorch finds a GPU, else the CPU), cpu, "
               "or cuda (default %(default)s)")


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
tile_size = bounded_int(16, multiple_of=8, why=" (tiles follow the 8x8 JPEG grid)")
_overlap = bounded_int(0, multiple_of=8, why=" (tiles follow the 8x8 JPEG grid)")


def non_negative_float(text):
    """An argparse type: a finite number >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number >= 0")
    return value


# restore() keyword -> flag. Unset flags are left out of speed_options, so restore() keeps its
# own (faithful) defaults.
SPEED_FLAGS = {"precision": "--precision", "tile": "--tile", "tile_overlap": "--tile-overlap",
               "tile_cache_gib": "--tile-cache-gib", "channels_last": "--channels-last",
               "compile": "--compile", "x8": "--x8", "engine": "--engine"}


def add_speed_args(parser, engine_default="torch"):
    """Add the speed-and-memory flags (SPEED_FLAGS) to `parser`, as one argument group;
    `engine_default` is what --engine's help says the default is."""
    g = parser.add_argument_group("speed, memory and self-ensemble (the defaults are the "
                                  "faithful path)")
    g.add_argument("--precision", choices=tuple(PRECISIONS), default=None,
                   help="network arithmetic: fp32 (IEEE), tf32 (TF32 convolutions and matmuls), or "
                        "bf16/fp16 autocast (default fp32)")
    g.add_argument("--engine", choices=ENGINES, default=None,
                   help="who runs the network: torch (PyTorch), openvino on the CPU (fp32 or "
                        "bf16; " + INSTALL_OPENVINO + "), or auto (openvino where it measured "
                        "faster: untiled images and bf16); default: " + engine_default)
    g.add_argument("--tile", type=tile_size, default=None, metavar="N",
                   help="restore in tiles of at most N x N pixels (a multiple of 8, at least 16; "
                        "each side cut into as few tiles as N allows, sized to the image) with "
                        "one QF for the whole image; default: whole images, tiled only on CPU "
                        "above the network's limit (1.5 megapixels for the lite models) or on "
                        "CUDA when memory runs out")
    g.add_argument("--tile-overlap", type=_overlap, default=None, metavar="M",
                   help="pixels shared by neighbouring tiles, a multiple of 8 at most N/2 "
                        "(default 32, or N/2 rounded down to a multiple of 8 for tiles under "
                        "64)")
    g.add_argument("--tile-cache-gib", type=non_negative_float, default=None, metavar="GIB",
                   help="memory for keeping each tile's encoder output between the QF pass and "
                        "the restoring pass of blind tiling (default 1 on CUDA; on CPU 1 for "
                        "the lite models, 0 for the released ones; 0 recomputes it)")
    g.add_argument("--channels-last", action="store_true", default=None,
                   help="NHWC memory layout for the network")
    g.add_argument("--compile", action="store_true", default=None,
                   help="torch.compile the network (pays off on many or large images)")
    g.add_argument("--x8", action="store_true", default=None,
                   help="self-ensemble: average the network's outputs over the 8 rotations "
                        "and mirrorings of each image, with the QF of the unturned pass (8x "
                        "the time)")
    return g


def speed_options(args):
    """The restore() keyword arguments the user set with `add_speed_args`'s flags; UserError,
    naming the flags, when they do not fit together. A tile without --tile-overlap gets the
    default overlap, capped at half the tile."""
    options = {key: getattr(args, key) for key in SPEED_FLAGS
               if getattr(args, key, None) is not None}
    if "tile" in options and "tile_overlap" not in options:
        options["tile_overlap"] = fit_overlap(options["tile"])
    try:
        check_options(options.get("precision", "fp32"), options.get("tile"),
                      options.get("tile_overlap", 32), options.get("engine", "torch"))
    except ValueError as exc:
        text = str(exc)
        for key in sorted(SPEED_FLAGS, key=len, reverse=True):  # tile_overlap before tile
            text = text.replace(f"{key}=", f"{SPEED_FLAGS[key]} ")
        raise UserError(text) from None
    return options


def run_cli(body):
    """Call `body()` and return the exit status: its own when it returns an int, else 0;
    2 after printing an `error:` line for each line of a UserError (one per problem); 130 on
    Ctrl+C."""
    try:
        status = body()
    except UserError as exc:
        for line in str(exc).splitlines() or [""]:
            print(f"error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return status if isinstance(status, int) else 0


def shard_device(shard, device):
    """This process's device in a sharded run (utils.dist.Shard), given the resolved `--device`:
    cuda:LOCAL_RANK, or the CPU with an equal share of the machine's threads."""
    if not shard.distributed:
        return device
    if device == "cuda":
        return f"cuda:{shard.local_rank % torch.cuda.device_count()}"
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // shard.local_world_size))
    return device
