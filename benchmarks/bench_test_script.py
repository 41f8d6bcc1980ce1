"""The whole colour test script (main_test_fbcnn_color.py's runner), timed stage by stage.

For each QF, runs `runners.evaluation.run` on the test set exactly as the script does (model load,
image reads, JPEG, network, PSNR/SSIM/PSNR-B, PNG writes, log), once serially (`--workers 0`)
and once with the pipelined stages, in the same process, and reports the wall time, the seconds
spent in each stage (summed over threads: with workers they overlap, so they can add up to more
than the wall time) and megapixels/s after the model load. A `--random-init` model is saved to
a temporary .safetensors file and loaded through the same path as released weights.

    python benchmarks/bench_test_script.py --model fbcnn_color --device cuda --qf 10 20 30 40
    python benchmarks/bench_test_script.py --random-init --nc 16 32 64 128 --nb 2 --device cpu
"""
import argparse
import contextlib
import os
import sys
import tempfile
import time

import torch

from benchmarks.benchlib import add_model_args, build_model, device_name, print_table, write_json
from models.inference import PRECISIONS
from runners.cli import run_cli
from runners.evaluation import COLOR, DEFAULT_WORKERS, build_parser, run
from runners.pipeline import StageClock
from utils import REPO_ROOT
from utils.image import list_images, read_image_header

STAGES = ("load_model", "read", "jpeg", "network", "metrics", "write")
COLUMNS = [("qf", "QF", "{}"), ("workers", "workers", "{}"), ("wall_s", "wall s", "{:.2f}"),
           *[(f"{s}_s", f"{s} s", "{:.2f}") for s in STAGES],
           ("mp_per_s_after_load", "MP/s after load", "{:.3f}"), ("psnr", "PSNR", "{:.4f}")]


def _model_argument(args, workdir):
    if args.model is not None:
        return args.model
    from safetensors.torch import save_file
    model = build_model(args, "cpu")
    path = os.path.join(workdir, f"{model.name}.safetensors")
    save_file(model.net.state_dict(), path)
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--device", choices=("cpu", "cuda"),
                   default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--testset", default="LIVE1_color")
    p.add_argument("--qf", type=int, nargs="+", default=[10])
    p.add_argument("--workers", type=int, nargs="+", default=[0, DEFAULT_WORKERS],
                   help="runner --workers values to compare (default %(default)s)")
    p.add_argument("--precision", choices=tuple(PRECISIONS), default="fp32")
    p.add_argument("--tile", default=None, help="runner --tile")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--json", default=None, help="also write the results to this file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    folder = (args.testset if os.path.isdir(args.testset) else
              os.path.join(REPO_ROOT, "testsets", args.testset))
    pixels = sum(read_image_header(path).pixels for path in list_images(folder))  # no decoding
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_test_script_") as workdir:
        model_arg = _model_argument(args, workdir)
        for qf in args.qf:
            for workers in args.workers:
                results = os.path.join(workdir, f"results_qf{qf}_w{workers}")
                cli = ["--model", model_arg, "--testset", args.testset, "--qf", str(qf),
                       "--device", args.device, "--precision", args.precision,
                       "--workers", str(workers), "--results", results]
                cli += ["--tile", args.tile] if args.tile else []
                cli += ["--channels-last"] if args.channels_last else []
                run_args = build_parser(COLOR).parse_args(cli)
                clock = StageClock()
                start = time.perf_counter()
                with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
                    (summary,) = run(COLOR, run_args, clock)
                wall = time.perf_counter() - start
                row = {"qf": qf, "workers": workers, "wall_s": wall,
                       **{f"{s}_s": clock.seconds.get(s, 0.0) for s in STAGES},
                       "megapixels": pixels / 1e6,
                       "mp_per_s_after_load": pixels / 1e6 / (wall - clock.seconds["load_model"]),
                       "psnr": summary["psnr"], "ssim": summary["ssim"],
                       "psnrb": summary["psnrb"], "n_images": summary["n_images"]}
                rows.append(row)
                print(f"QF {qf}, workers {workers}: {wall:.1f} s", file=sys.stderr, flush=True)
    model_name = os.path.splitext(os.path.basename(model_arg))[0]
    print(f"\nDevice: {device_name(args.device)}. Model: {model_name}. Test set: {args.testset}, "
          f"{rows[0]['n_images']} images, {rows[0]['megapixels']:.2f} MP. Precision "
          f"{args.precision}. Stage seconds are summed over threads.\n")
    print_table(rows, COLUMNS)
    if args.json:
        write_json(args.json, {"device": device_name(args.device), "model": model_name,
                               "argv": sys.argv[1:] if argv is None else argv, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))  # a UserError (say, a missing folder) is one error: line
