"""What the projection onto a JPEG's quantization intervals costs, against the network's time.

    python -m benchmarks.bench_projection [--model fbcnn_color_lite] [--testset LIVE1_color]
        [--synthetic-mp 12] [--qf 50] [--method calibrated posterior] [--threads 2]
        [--repeat 3] [--json p.json]

Each image of the test set (or one synthetic photo of `--synthetic-mp` megapixels, a mosaic of
LIVE1 crops) is compressed at `--qf` (OpenCV, as the test scripts); then, timed per image and
summed: reading the file's coefficients (jpeglib), the network's restoration
(`models.inference.restore` with main_restore's engine and layout, `models.engines
.fastest_options`) and each `--method`. "calibrated" (main_restore's) is timed in its two
parts: the twin's network pass, and the arithmetic (twin, shares, projection). The best of
`--repeat` passes is reported in seconds per megapixel, with each part's share of the network's
time and the projection's (reading included) share of the whole restoration.
"""
import argparse
import sys
import time

import torch

from benchmarks.benchlib import device_name, print_table, write_json
from data.jpeg import jpeg_decode, jpeg_encode
from benchmarks.bench_inference import synthetic_photo
from data.jpeg_projection import (PROJECTION_METHODS, make_twin, project, read_coefficients,
                                  twin_shares)
from models.engines import fastest_options
from models.inference import restore
from models.model_zoo import load_model
from runners.cli import quality_factor, run_cli
from data.testsets import resolve_testset
from utils.image import imread_uint, list_images

COLUMNS = [("stage", "stage", "{}"), ("s_per_mp", "s per MP", "{:.3f}"),
           ("vs_network", "vs the network", "{:.1%}"),
           ("share", "projection's share of the whole", "{:.1%}")]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="fbcnn_color_lite")
    p.add_argument("--testset", default=None, help="default: LIVE1_color, or LIVE1_gray for a "
                   "1-channel model")
    p.add_argument("--qf", type=quality_factor, default=50)
    p.add_argument("--method", nargs="+", choices=PROJECTION_METHODS,
                   default=["calibrated", "posterior"])
    p.add_argument("--threads", type=int, default=None, help="torch and OpenCV threads")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--limit", type=int, default=None, help="only the first N images")
    p.add_argument("--synthetic-mp", type=float, default=None,
                   help="one synthetic photo of this many megapixels instead of the test set")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model, device="cpu")
    n_channels = 1 if model.in_nc == 1 else 3
    testset = args.testset or ("LIVE1_gray" if n_channels == 1 else "LIVE1_color")
    paths = list_images(resolve_testset(testset, None))[:args.limit]
    clean = [imread_uint(path, n_channels) for path in paths]
    if args.synthetic_mp:
        clean = [synthetic_photo(clean, args.synthetic_mp)]
    files = [jpeg_encode(img, args.qf) for img in clean]
    decoded = [jpeg_decode(data, n_channels) for data in files]
    megapixels = sum(img.shape[0] * img.shape[1] for img in decoded) / 1e6

    speed = fastest_options({}, "cpu")

    def network(img):
        return restore(model, img, **speed)[0]

    stages = ["read coefficients", "network", *(f"project ({m})" for m in args.method)]
    if "calibrated" in args.method:
        stages += ["calibrated: twin's network pass", "calibrated: arithmetic"]
    best = dict.fromkeys(stages, float("inf"))
    for _ in range(args.repeat):
        seconds = dict.fromkeys(stages, 0.0)
        for data, img in zip(files, decoded):
            t0 = time.perf_counter()
            coefficients = read_coefficients(data)
            t1 = time.perf_counter()
            restored = network(img)
            seconds["read coefficients"] += t1 - t0
            seconds["network"] += time.perf_counter() - t1
            for method in args.method:
                t2 = time.perf_counter()
                if method == "calibrated":
                    twin = make_twin(restored, coefficients)
                    t3 = time.perf_counter()
                    twin_E = network(twin.image)
                    twin_pass = time.perf_counter() - t3
                    project(restored, coefficients, method, twin_shares(twin, twin_E))
                    seconds["calibrated: twin's network pass"] += twin_pass
                    seconds["calibrated: arithmetic"] += time.perf_counter() - t2 - twin_pass
                else:
                    project(restored, coefficients, method)
                seconds[f"project ({method})"] += time.perf_counter() - t2
        best = {k: min(best[k], v) for k, v in seconds.items()}
    rows = [{"stage": k, "s_per_mp": best[k] / megapixels,
             "vs_network": best[k] / best["network"]} for k in stages]
    for row in rows:
        if row["stage"].startswith("project ("):
            projection = best["read coefficients"] + best[row["stage"]]
            row["share"] = projection / (projection + best["network"])
    source = (f"a {args.synthetic_mp:g} MP mosaic of {testset}" if args.synthetic_mp
              else f"{testset} ({len(files)} images)")
    print(f"Device: {device_name(torch.device('cpu'))}. Model {model.name}, network {speed}; "
          f"{source} at QF {args.qf}, {megapixels:.2f} MP; best of {args.repeat}.\n")
    print_table(rows, COLUMNS)
    if args.json:
        write_json(args.json, {"device": device_name(torch.device("cpu")), "model": model.name,
                               "testset": testset, "qf": args.qf, "megapixels": megapixels,
                               "network_options": speed,
                               "argv": sys.argv[1:] if argv is None else argv, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
