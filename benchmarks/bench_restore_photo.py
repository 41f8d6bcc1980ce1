"""A large photo through `main_restore.py`, start to exit, against plain network forwards.

    python -m benchmarks.bench_restore_photo [--mp 12] [--qf 50] [--gray] [--model NAME|FILE]
        [--repeat 2] [--variant default torch bf16 no-projection] [--breakdown] [--json r.json]

Makes one JPEG of `--mp` megapixels (a 4:3 mosaic of LIVE1 crops, OpenCV at `--qf`; `--gray`:
of LIVE1_gray's, a one-channel JPEG, which main_restore gives its gray model), then, in
one run: the baseline, plain PyTorch eager fp32 forwards of the same network (contiguous, the
QF predicted per tile) over the image's 512x512 tiles, summed; and for each `--variant` the
whole command `python main_restore.py PHOTO -o DIR --overwrite [flags]` in a new process, timed
from start to exit (Python's start-up, importing torch, decoding, the network, the projection
and writing the PNG included), the best of `--repeat` runs after one untimed run (which fills
the OpenVINO engine's cache of the converted network). `--model` is the network of both: the
baseline's, and main_restore's (its `--model`, or `--gray-model` with `--gray`); without it,
the bundled lite model of the photo's kind, main_restore's default offline. Variants:
`default` (main_restore's own defaults), `torch` (`--engine torch`), `bf16` (`--precision
bf16`), `no-projection`. Each row gives its ratio to the baseline; the header names the CPU,
its bf16 instructions and the model.

`--breakdown`: one more run of each variant under cProfile, split into its parts (start-up and
imports, the network over the photo and the calibration's twin window, the twin and the
projection around it, writing the output, and the rest: options, model, decoding, the file's
coefficients), and what the network would have left for main_restore to take 0.85 times the
baseline with the other parts as they are.
"""
import argparse
import os
import pstats
import subprocess
import sys
import tempfile
import time

import torch

from benchmarks.bench_inference import synthetic_photo
from benchmarks.benchlib import device_name, print_table, write_json
from data.jpeg import jpeg_decode, jpeg_encode
from models.engines import fastest_options
from models.model_zoo import load_model
from runners.cli import quality_factor, run_cli
from utils import REPO_ROOT
from utils.cpu import native_bf16
from utils.image import imread_uint, list_images, uint2tensor

VARIANTS = {"default": [], "torch": ["--engine", "torch"], "bf16": ["--precision", "bf16"],
            "no-projection": ["--no-projection"]}
COLUMNS = [("variant", "variant", "{}"), ("flags", "flags", "{}"), ("seconds", "s", "{:.2f}"),
           ("vs_baseline", "vs plain forwards", "{:.2f}x")]


def plain_forwards(model, img, tile=512):
    """Seconds of eager fp32 forwards of `model`'s network over `img`'s tile x tile tiles."""
    net = model.net.float().eval()
    x = uint2tensor(img)
    seconds = 0.0
    with torch.no_grad():
        net(x[..., :64, :64])  # oneDNN's first-call set-up, outside the clock
        for top in range(0, x.shape[-2], tile):
            for left in range(0, x.shape[-1], tile):
                part = x[..., top:top + tile, left:left + tile].contiguous()
                start = time.perf_counter()
                net(part)
                seconds += time.perf_counter() - start
    return seconds


def _command(photo, out, flags):
    """main_restore.py's arguments for `photo`, written to `out` with `flags`."""
    return [os.path.join(REPO_ROOT, "main_restore.py"), photo, "-o", out, "--overwrite",
            "--quiet", *flags]


def whole_command(photo, out, flags, repeat):
    """Best wall seconds of `main_restore.py` on `photo`, after one untimed run."""
    command = [sys.executable, *_command(photo, out, flags)]
    best = float("inf")
    for run in range(repeat + 1):
        start = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        if run:
            best = min(best, time.perf_counter() - start)
    return best


# the parts of a run, by the functions whose cumulative time they are
_PARTS = {"main": ("runners/restore.py", "main"), "write": ("runners/restore.py", "_write"),
          "network": ("models/consistency.py", "_network"),
          "consistent": ("models/consistency.py", "restore_consistent_batch")}
BREAKDOWN_COLUMNS = [("variant", "variant", "{}"), ("startup", "start-up, imports", "{:.2f}"),
                     ("network", "network", "{:.2f}"), ("projection", "twin, projection",
                                                          "{:.2f}"),
                     ("write", "writing", "{:.2f}"), ("rest", "rest", "{:.2f}"),
                     ("seconds", "total", "{:.2f}"),
                     ("network_left", "network left for 0.85x", "{:.2f}")]


def breakdown(photo, out, flags):
    """Seconds per part of one `main_restore.py` run under cProfile (see the docstring)."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "profile")
        command = [sys.executable, "-m", "cProfile", "-o", path, *_command(photo, out, flags)]
        start = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - start
        stats = pstats.Stats(path).stats  # {(file, line, name): (cc, nc, tt, ct, callers)}
    seconds = {part: sum(row[3] for (file, _, name), row in stats.items()
                         if name == func and file.replace(os.sep, "/").endswith(suffix))
               for part, (suffix, func) in _PARTS.items()}
    return {"seconds": wall, "startup": wall - seconds["main"], "network": seconds["network"],
            "projection": seconds["consistent"] - seconds["network"], "write": seconds["write"],
            "rest": seconds["main"] - seconds["consistent"] - seconds["write"]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mp", type=float, default=12.0)
    p.add_argument("--qf", type=quality_factor, default=50)
    p.add_argument("--gray", action="store_true", help="a gray photo (one-channel JPEG)")
    p.add_argument("--model", default=None,
                   help="the network of the baseline and of main_restore (default "
                        "fbcnn_color_lite, or fbcnn_gray_lite with --gray)")
    p.add_argument("--variant", nargs="+", choices=tuple(VARIANTS), default=list(VARIANTS))
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--breakdown", action="store_true",
                   help="also split one run of each variant into its parts (cProfile)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    channels, testset = (1, "LIVE1_gray") if args.gray else (3, "LIVE1_color")
    clean = [imread_uint(path, channels) for path in
             list_images(os.path.join(REPO_ROOT, "testsets", testset))]
    data = jpeg_encode(synthetic_photo(clean, args.mp), args.qf)
    model_name = args.model or f"fbcnn_{'gray' if args.gray else 'color'}_lite"
    model = load_model(model_name)
    model_flags = [] if args.model is None else ["--gray-model" if args.gray else "--model",
                                                 args.model]
    img = jpeg_decode(data, channels)
    megapixels = img.shape[0] * img.shape[1] / 1e6
    with tempfile.TemporaryDirectory() as folder:
        photo = os.path.join(folder, "photo.jpg")
        with open(photo, "wb") as f:
            f.write(data)
        baseline = plain_forwards(model, img)
        rows = [{"variant": "plain forwards", "flags": "eager fp32, 512x512 tiles",
                 "seconds": baseline, "vs_baseline": 1.0}]
        for name in args.variant:
            seconds = whole_command(photo, os.path.join(folder, "out"),
                                    [*model_flags, *VARIANTS[name]], args.repeat)
            rows.append({"variant": f"main_restore {name}", "flags": " ".join(VARIANTS[name])
                         or f"(defaults: {fastest_options({}, 'cpu')})", "seconds": seconds,
                         "vs_baseline": seconds / baseline})
            print(f"{name}: {seconds:.2f} s", file=sys.stderr, flush=True)
        parts = []
        for name in args.variant if args.breakdown else ():
            part = breakdown(photo, os.path.join(folder, "out"), [*model_flags, *VARIANTS[name]])
            part["network_left"] = 0.85 * baseline - (part["seconds"] - part["network"])
            parts.append({"variant": f"main_restore {name}", **part})
    features = native_bf16()
    print(f"\nCPU: {device_name('cpu')}; AVX-512 bf16: {features['avx512_bf16']}, AMX bf16: "
          f"{features['amx_bf16']}. A {img.shape[1]}x{img.shape[0]} ({megapixels:.1f} MP) "
          f"{'gray ' if args.gray else ''}JPEG at QF {args.qf}, model {model_name}; main_restore "
          f"timed start to exit, best of {args.repeat}.\n")
    print_table(rows, COLUMNS)
    if parts:
        print("\nOne run of each under cProfile, in seconds; the network's part covers the "
              "photo and the calibration's twin window:\n")
        print_table(parts, BREAKDOWN_COLUMNS)
    if args.json:
        write_json(args.json, {"cpu": device_name("cpu"), **features, "megapixels": megapixels,
                               "channels": channels, "qf": args.qf, "model": model_name,
                               "rows": rows, "breakdown": parts,
                               "argv": sys.argv[1:] if argv is None else argv})
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
