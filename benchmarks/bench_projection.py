"""What the projection onto a JPEG's quantization intervals costs, against the network's time.

    python benchmarks/bench_projection.py [--model fbcnn_color_lite] [--testset LIVE1_color]
                                          [--qf 50] [--threads 2] [--repeat 3] [--json p.json]

Each image of the test set is compressed at `--qf` (OpenCV, as the test scripts); then, timed
per image and summed: reading the file's coefficients (data/jpeg_projection.py's
`read_coefficients`, jpeglib), the projection itself (`project`), and the network's restoration
(`models.inference.restore`, fp32, as main_restore runs it). The best of `--repeat` passes is
reported, in seconds per megapixel, with the projection's share of the whole.
"""
import argparse
import sys
import time

import torch

from benchmarks.benchlib import device_name, print_table, write_json
from data.jpeg import jpeg_decode, jpeg_encode
from data.jpeg_projection import project, read_coefficients
from models.inference import restore
from models.model_zoo import load_model
from runners.cli import quality_factor, run_cli
from runners.evaluation import resolve_testset
from utils.image import imread_uint, list_images

COLUMNS = [("stage", "stage", "{}"), ("s_per_mp", "s per MP", "{:.3f}"),
           ("share", "share of the whole", "{:.1%}")]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="fbcnn_color_lite")
    p.add_argument("--testset", default=None, help="default: LIVE1_color, or LIVE1_gray for a "
                   "1-channel model")
    p.add_argument("--qf", type=quality_factor, default=50)
    p.add_argument("--threads", type=int, default=None, help="torch and OpenCV threads")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--limit", type=int, default=None, help="only the first N images")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model, device="cpu")
    n_channels = 1 if model.in_nc == 1 else 3
    testset = args.testset or ("LIVE1_gray" if n_channels == 1 else "LIVE1_color")
    paths = list_images(resolve_testset(testset, None))[:args.limit]
    files = [jpeg_encode(imread_uint(path, n_channels), args.qf) for path in paths]
    decoded = [jpeg_decode(data, n_channels) for data in files]
    megapixels = sum(img.shape[0] * img.shape[1] for img in decoded) / 1e6
    best = {"read coefficients": float("inf"), "project": float("inf"),
            "network": float("inf")}
    for _ in range(args.repeat):
        seconds = dict.fromkeys(best, 0.0)
        for data, img in zip(files, decoded):
            t0 = time.perf_counter()
            coefficients = read_coefficients(data)
            t1 = time.perf_counter()
            restored, _ = restore(model, img)
            t2 = time.perf_counter()
            project(restored, coefficients)
            t3 = time.perf_counter()
            seconds["read coefficients"] += t1 - t0
            seconds["network"] += t2 - t1
            seconds["project"] += t3 - t2
        best = {k: min(best[k], v) for k, v in seconds.items()}
    whole = sum(best.values())
    rows = [{"stage": k, "s_per_mp": v / megapixels, "share": v / whole} for k, v in best.items()]
    rows.append({"stage": "projection (read + project)",
                 "s_per_mp": (best["read coefficients"] + best["project"]) / megapixels,
                 "share": (best["read coefficients"] + best["project"]) / whole})
    print(f"Device: {device_name(torch.device('cpu'))}. Model {model.name}, {testset} at QF "
          f"{args.qf}: {len(files)} images, {megapixels:.2f} MP; best of {args.repeat}.\n")
    print_table(rows, COLUMNS)
    if args.json:
        write_json(args.json, {"device": device_name(torch.device("cpu")), "model": model.name,
                               "testset": testset, "qf": args.qf, "megapixels": megapixels,
                               "argv": sys.argv[1:] if argv is None else argv, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
