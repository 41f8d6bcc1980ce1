"""Inference speed and memory of `models.inference.restore`, per precision, untiled vs tiled.

Forward passes only (the JPEG inputs are made before the clock starts), on a test set (default
LIVE1_color at QF 10) and on a synthetic photo of `--synthetic-mp` megapixels (a mosaic of the
set's images). For every precision, layout and `--compile` setting, untiled and tiled (per
`--tile` size and `--tile-cache-gib`, and blind or with each `--qf-input`), one after the other
in one process: megapixels/s, achieved TFLOP/s (convolution FLOPs of one untiled pass, counted
analytically), peak memory, and the largest grey-level difference from the first row.

    python -m benchmarks.bench_inference --model fbcnn_color --device cuda --json r.json
    python -m benchmarks.bench_inference --random-init --nc 16 32 64 128 --nb 2 --device cpu \\
        --precision fp32 bf16 --limit 4 --synthetic-mp 2 --tile 256
    python -m benchmarks.bench_inference --model fbcnn_color_lite --device cpu --threads 2 \\
        --precision fp32 --limit 0 --tile 256 512 768 1024 --qf-input blind 10
"""
import argparse
import itertools
import logging
import math
import os
import sys
import time

import numpy as np
import torch

from benchmarks.benchlib import (PeakMemory, add_model_args, build_model, device_name,
                                 fbcnn_conv_flops, print_table, write_json)
from data.jpeg import jpeg
from models.inference import (PRECISIONS, cpu_plan, default_tile_cache_gib,
                              check_options, fit_overlap, restore)
from runners.cli import quality_factor, run_cli
from utils import REPO_ROOT
from utils.errors import UserError
from utils.image import imread_uint, list_images

COLUMNS = [("input", "input", "{}"), ("precision", "precision", "{}"), ("layout", "layout", "{}"),
           ("compile", "compile", "{}"), ("qf_input", "QF fed", "{}"), ("tiling", "tiling", "{}"),
           ("megapixels", "MP", "{:.2f}"),
           ("seconds", "s", "{:.2f}"), ("mp_per_s", "MP/s", "{:.3f}"),
           ("tflops", "TFLOP/s", "{:.3f}"), ("peak_gib", "peak GiB", "{:.2f}"),
           ("max_diff", "max |diff| vs fp32", "{}"), ("qf_pred", "QF", "{}")]


def synthetic_photo(images, megapixels, seed=0):
    """A 4:3 mosaic of `megapixels` cut from the given images (cycled square crops), so the
    content has real edges and textures, unlike noise or an upscaled image."""
    height = int(round(math.sqrt(megapixels * 1e6 * 3 / 4)))
    width = int(round(height * 4 / 3))
    block = min([480, *(min(img.shape[:2]) for img in images)])
    rng = np.random.default_rng(seed)
    rows = []
    k = 0
    for _ in range(-(-height // block)):
        row = []
        for _ in range(-(-width // block)):
            img = images[k % len(images)]
            k += 1
            y = rng.integers(0, img.shape[0] - block + 1)
            x = rng.integers(0, img.shape[1] - block + 1)
            row.append(img[y:y + block, x:x + block])
        rows.append(np.concatenate(row, axis=1))
    return np.ascontiguousarray(np.concatenate(rows, axis=0)[:height, :width])


def _qf_input(text):
    if text == "blind":
        return text
    try:
        return str(quality_factor(text))
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"{exc}, or blind") from None


def measure(model, inputs, device, reference=None, warmup=0, **options):
    """Restore every input once (timed, memory tracked) after `warmup` untimed passes; returns
    the row and the outputs."""
    for _ in range(warmup):
        for img in inputs:
            restore(model, img, device=device, **options)
    outputs, qfs = [], []
    with PeakMemory(device) as memory:
        start = time.perf_counter()
        for img in inputs:
            img_E, qf = restore(model, img, device=device, **options)
            outputs.append(img_E)
            qfs.append(qf)
        seconds = time.perf_counter() - start
    pixels = sum(img.shape[0] * img.shape[1] for img in inputs)
    flops = sum(fbcnn_conv_flops(model.net, *img.shape[:2]) for img in inputs)
    row = {"megapixels": pixels / 1e6, "seconds": seconds, "mp_per_s": pixels / 1e6 / seconds,
           "tflops": flops / seconds / 1e12, "peak_gib": memory.peak / 2 ** 30,
           "peak_kind": memory.kind, "qf_pred": round(float(np.mean(qfs)), 1)}
    if reference is not None:
        row["max_diff"] = int(max(np.abs(a.astype(np.int16) - b).max()
                                  for a, b in zip(outputs, reference)))
    return row, outputs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", nargs="+", choices=tuple(PRECISIONS),
                   default=list(PRECISIONS))
    p.add_argument("--layout", nargs="+", choices=("contiguous", "channels_last"),
                   default=["contiguous"])
    p.add_argument("--compile", nargs="+", choices=("off", "on"), default=["off"],
                   help="torch.compile settings to compare (compiled in the warm-up passes)")
    p.add_argument("--testset", default=os.path.join(REPO_ROOT, "testsets", "LIVE1_color"))
    p.add_argument("--limit", type=int, default=None,
                   help="use the first N images only (0: the synthetic photo alone)")
    p.add_argument("--crop", type=int, default=None, metavar="N",
                   help="use each image's top-left N x N pixels only (quick CPU runs)")
    p.add_argument("--qf", type=int, default=10, help="JPEG quality of the inputs")
    p.add_argument("--synthetic-mp", type=float, default=12.0,
                   help="megapixels of the synthetic photo; 0 skips it (default %(default)s)")
    p.add_argument("--tile", type=int, nargs="+", default=[1024],
                   help="tile sizes of the tiled rows, one set of rows each; 0 skips")
    p.add_argument("--qf-input", type=_qf_input, nargs="+", default=["blind"],
                   help="blind (the network's estimate) and/or QFs fed to the network")
    p.add_argument("--tile-overlap", type=int, default=None,
                   help="default: 32, or half the tile (a multiple of 8) for tiles under 64, "
                        "per tile size")
    p.add_argument("--tile-cache-gib", type=float, nargs="+", default=None,
                   help="encoder cache sizes of the tiled rows, one row each (default: the "
                        "device's default for the model, default_tile_cache_gib in "
                        "models/inference.py)")
    p.add_argument("--untiled-max-mp", type=float, default=None,
                   help="skip untiled rows of larger images (default: no limit on CUDA, where "
                        "OOM falls back to tiles; on CPU the model's cpu_plan limit)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed passes over the inputs before each timed one (default: 1 on "
                        "CUDA, where cudnn.benchmark tunes per shape; 0 on CPU)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--json", default=None, help="also write the results to this file")
    args = p.parse_args(argv)
    tiles = [tile for tile in args.tile if tile]
    overlaps = {tile: fit_overlap(tile) if args.tile_overlap is None else args.tile_overlap
                for tile in tiles}
    for tile in tiles:
        try:
            check_options(tile=tile, tile_overlap=overlaps[tile])
        except ValueError as exc:
            raise UserError(f"--tile {tile}/--tile-overlap: {exc}") from None
    if args.threads:
        torch.set_num_threads(args.threads)
    warmup = args.warmup if args.warmup is not None else int(args.device.startswith("cuda"))
    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    model = build_model(args, device)
    untiled_max = args.untiled_max_mp if args.untiled_max_mp is not None else (
        math.inf if device.type == "cuda" else cpu_plan(model.net).max_untiled_megapixels)
    n_channels = model.net.in_nc
    clean = [imread_uint(path, n_channels) for path in list_images(args.testset)]
    crop = "" if args.crop is None else f", {args.crop}x{args.crop} crops"
    used = clean[:args.limit]  # --limit 0: the synthetic photo alone (still cut from them all)
    sets = [(f"{os.path.basename(os.path.normpath(args.testset))} ({len(used)} images{crop})",
             [jpeg(img[:args.crop, :args.crop], args.qf) for img in used])] if used else []
    if args.synthetic_mp > 0:
        photo = synthetic_photo(clean, args.synthetic_mp)
        sets.append((f"synthetic {photo.shape[1]}x{photo.shape[0]}", [jpeg(photo, args.qf)]))
    caches = args.tile_cache_gib or [default_tile_cache_gib(device, model.net)]
    tilings = [(None, None)] + [(tile, cache) for tile in tiles for cache in caches]

    rows = []
    tflop_per_mp = fbcnn_conv_flops(model.net, 1000, 1000) / 1e12

    def save():  # after every row, so a run stopped at its time limit keeps what it measured
        if args.json:
            write_json(args.json, {"device": device_name(device), "model": model.name,
                                   "tflop_per_megapixel": tflop_per_mp,
                                   "argv": sys.argv[1:] if argv is None else argv, "rows": rows})

    for (name, inputs), qf_input in itertools.product(sets, args.qf_input):
        reference = None  # per input and QF fed: a fed QF changes the output
        for precision, layout, compile, (tile, cache) in itertools.product(
                args.precision, args.layout, args.compile, tilings):
            megapixels = max(img.shape[0] * img.shape[1] for img in inputs) / 1e6
            label = ("untiled" if tile is None else
                     f"{tile}/{overlaps[tile]}, cache {cache:g} GiB")
            base = {"input": name, "precision": precision, "layout": layout, "compile": compile,
                    "qf_input": qf_input, "tiling": label}
            if tile is None and megapixels > untiled_max:
                rows.append({**base, "note": f"skipped: over {untiled_max} MP untiled"})
                save()
                print(f"{base}: skipped, over {untiled_max} MP", file=sys.stderr)
                continue
            row, outputs = measure(model, inputs, device, reference, warmup, precision=precision,
                                   qf=None if qf_input == "blind" else int(qf_input),
                                   tile=tile, tile_overlap=overlaps.get(tile, 32),
                                   channels_last=layout == "channels_last",
                                   compile=compile == "on", max_untiled_megapixels=math.inf,
                                   tile_cache_gib=cache)
            if reference is None:  # the first row: fp32 untiled uncompiled when not skipped
                reference = outputs
                row["max_diff"] = 0
                base["reference"] = True
            rows.append({**base, **row})
            save()
            print(f"{base}: {row['mp_per_s']:.3f} MP/s, peak {row['peak_gib']:.2f} GiB",
                  file=sys.stderr, flush=True)
    print(f"\nDevice: {device_name(device)}. Model: {model.name} ({tflop_per_mp:.3f} TFLOP per "
          f"megapixel). Differences are against the first row of each input.\n")
    print_table(rows, COLUMNS)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))  # a UserError (say, a missing folder) is one error: line
