"""The whole colour test script (main_test_fbcnn_color.py's runner), timed stage by stage.

For each precision and QF, runs `runners.evaluation.run` on the test set as the script does,
once serially (`--workers 0`) and once with the pipelined stages, in one process, after
`--warmup` untimed runs: wall time, seconds per stage (summed over threads) and megapixels/s
after the model load. Then, per precision and `--workers`, it runs `python
main_test_fbcnn_color.py` with every `--qf` in a new process, as a user does, timed from start
to exit (start-up, imports, model load and the cold first pass included), its PSNR per QF
compared with the runner's. A `--random-init` model is saved to a temporary .safetensors file
and loaded as released weights are.

    python -m benchmarks.bench_test_script --model fbcnn_color --device cuda --qf 10 20 30 40
    python -m benchmarks.bench_test_script --random-init --nc 16 32 64 128 --nb 2 --device cpu
    python -m benchmarks.bench_test_script --random-init --device cuda --precision fp32 bf16 \\
        fp16 --channels-last --qf 10 40 --workers 8 --no-process
"""
import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace

import torch

from benchmarks.benchlib import add_model_args, build_model, device_name, print_table, write_json
from data.testsets import resolve_testset
from models.inference import PRECISIONS, fit_overlap
from runners.cli import run_cli
from runners.evaluation import COLOR, DEFAULT_WORKERS, EvalSettings, run
from runners.pipeline import StageClock
from utils import REPO_ROOT
from utils.errors import UserError
from utils.image import list_images, read_image_header

STAGES = ("load_model", "read", "jpeg", "network", "metrics", "write")
COLUMNS = [("precision", "precision", "{}"), ("qf", "QF", "{}"), ("workers", "workers", "{}"),
           ("wall_s", "wall s", "{:.2f}"),
           *[(f"{s}_s", f"{s} s", "{:.2f}") for s in STAGES],
           ("mp_per_s_after_load", "MP/s after load", "{:.3f}"), ("psnr", "PSNR", "{:.4f}")]
PROCESS_COLUMNS = [("precision", "precision", "{}"), ("qfs", "QFs", "{}"),
                   ("workers", "workers", "{}"),
                   ("process_s", "process s", "{:.2f}"),
                   ("runner_s", "runner s (in-process, summed)", "{:.2f}"),
                   ("outside_runner_s", "difference s", "{:.2f}"),
                   ("mp_per_s", "MP/s (process)", "{:.3f}")]
SCRIPT = os.path.join(REPO_ROOT, "main_test_fbcnn_color.py")


def _model_argument(args, workdir):
    if args.model is not None:
        return args.model
    from safetensors.torch import save_file
    model = build_model(args, "cpu")
    path = os.path.join(workdir, f"{model.name}.safetensors")
    save_file(model.net.state_dict(), path)
    return path


def _runner_flags(args, model_arg, testset, precision):
    """The test script's command line shared by the in-process runs and the process runs."""
    flags = ["--model", model_arg, "--testset", testset, "--device", args.device,
             "--precision", precision]
    flags += ["--tile", args.tile] if args.tile else []
    flags += ["--channels-last"] if args.channels_last else []
    return flags


def _runner_settings(args, model_arg, testset, precision):
    """The same run as `_runner_flags`, as the runner's settings object."""
    speed = {"precision": precision}
    if args.tile:
        speed.update(tile=int(args.tile), tile_overlap=fit_overlap(int(args.tile)))
    if args.channels_last:
        speed["channels_last"] = True
    return EvalSettings.of(COLOR, model=model_arg, testset=testset, device=args.device,
                           speed=speed)


def _run_runner(settings, qf, workers, results):
    """One in-process run of the runner for one QF: (wall seconds, StageClock, summary)."""
    clock = StageClock()
    start = time.perf_counter()
    (summary,) = run(COLOR, replace(settings, qf=(qf,), workers=workers, results=results,
                                    console=False), clock)
    return time.perf_counter() - start, clock, summary


def _run_process(flags, qfs, workers, workdir, threads):
    """`python main_test_fbcnn_color.py` with every QF in a new process, timed from its start to
    its exit: (seconds, the summaries of its --json)."""
    results = tempfile.mkdtemp(prefix="process_", dir=workdir)
    summaries = os.path.join(results, "summaries.json")
    command = [sys.executable, SCRIPT, *flags, "--qf", *map(str, qfs), "--workers", str(workers),
               "--results", results, "--json", summaries]
    env = dict(os.environ)
    if threads:  # as torch.set_num_threads in this process
        env["OMP_NUM_THREADS"] = str(threads)
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        tail = " ".join(proc.stderr.split()[-40:])
        raise UserError(f"{os.path.basename(SCRIPT)} --workers {workers} exited with status "
                        f"{proc.returncode}: {tail}")
    with open(summaries, encoding="utf-8") as f:
        return seconds, json.load(f)


def _process_row(flags, args, workers, workdir, pixels, runner):
    """Run the script in a new process with every QF; its row beside the runner's `runner`."""
    seconds, summaries = _run_process(flags, args.qf, workers, workdir, args.threads)
    # equal on the CPU; on CUDA, cuDNN may pick other kernels in another process
    psnr_diff = max(abs(s["psnr"] - r["psnr"]) for s, r in zip(summaries, runner))
    if psnr_diff > 0.01:
        print(f"warning: the script in a new process scored up to {psnr_diff:.4f} dB apart "
              f"from the runner", file=sys.stderr)
    runner_s = sum(r["wall_s"] for r in runner)
    print(f"{runner[0]['precision']}, process, workers {workers}: {seconds:.1f} s",
          file=sys.stderr, flush=True)
    return {"precision": runner[0]["precision"], "qfs": ",".join(map(str, args.qf)),
            "workers": workers, "process_s": seconds, "runner_s": runner_s,
            "outside_runner_s": seconds - runner_s,
            "mp_per_s": pixels * len(args.qf) / 1e6 / seconds,
            "psnr": [s["psnr"] for s in summaries], "max_psnr_diff": psnr_diff}


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
    p.add_argument("--precision", nargs="+", choices=tuple(PRECISIONS), default=["fp32"],
                   help="runner --precision values to compare (default fp32)")
    p.add_argument("--tile", default=None, help="runner --tile")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed runs of the first QF before each precision's timed ones "
                        "(default: 1 on CUDA, 0 on CPU)")
    p.add_argument("--no-process", action="store_true",
                   help="skip the runs of the script in a new process")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--json", default=None, help="also write the results to this file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    warmup = args.warmup if args.warmup is not None else int(args.device == "cuda")

    testset = resolve_testset(args.testset, None)
    pixels = sum(read_image_header(path).pixels for path in list_images(testset))  # no decoding
    rows, process_rows, named = [], [], {}

    def save():  # after every row, so a run stopped at its time limit keeps what it measured
        if args.json:
            write_json(args.json, {"device": device_name(args.device), "model": named["model"],
                                   "argv": sys.argv[1:] if argv is None else argv,
                                   "warmup": warmup, "rows": rows, "process_rows": process_rows})

    with tempfile.TemporaryDirectory(prefix="bench_test_script_") as workdir:
        model_arg = _model_argument(args, workdir)
        named["model"] = os.path.splitext(os.path.basename(model_arg))[0]
        for precision in args.precision:
            flags = _runner_flags(args, model_arg, testset, precision)
            settings = _runner_settings(args, model_arg, testset, precision)
            for i in range(warmup):  # each precision's kernels chosen before its timed runs
                seconds, _, _ = _run_runner(settings, args.qf[0], args.workers[0],
                                            os.path.join(workdir, f"warmup_{precision}_{i}"))
                print(f"warm-up {i + 1} ({precision}): {seconds:.1f} s", file=sys.stderr,
                      flush=True)
            for qf, workers in itertools.product(args.qf, args.workers):
                wall, clock, summary = _run_runner(settings, qf, workers, os.path.join(
                    workdir, f"results_{precision}_qf{qf}_w{workers}"))
                rows.append({"precision": precision, "qf": qf, "workers": workers,
                             "wall_s": wall, **{f"{s}_s": clock.seconds.get(s, 0.0)
                                                for s in STAGES},
                             "megapixels": pixels / 1e6,
                             "mp_per_s_after_load": (pixels / 1e6
                                                     / (wall - clock.seconds["load_model"])),
                             "psnr": summary["psnr"], "ssim": summary["ssim"],
                             "psnrb": summary["psnrb"], "n_images": summary["n_images"]})
                save()
                print(f"{precision}, QF {qf}, workers {workers}: {wall:.1f} s", file=sys.stderr,
                      flush=True)
            for workers in [] if args.no_process else args.workers:
                process_rows.append(_process_row(flags, args, workers, workdir, pixels, [
                    r for r in rows if (r["precision"], r["workers"]) == (precision, workers)]))
                save()
    print(f"\nDevice: {device_name(args.device)}. Model: {named['model']}. "
          f"Test set: {args.testset}, "
          f"{rows[0]['n_images']} images, {rows[0]['megapixels']:.2f} MP. {warmup} untimed "
          f"warm-up run(s) before each precision. Stage seconds are summed over threads.\n")
    print_table(rows, COLUMNS)
    if process_rows:
        print("\nThe script in a new process (python main_test_fbcnn_color.py, every QF), from "
              "start to exit, against the in-process runs above:\n")
        print_table(process_rows, PROCESS_COLUMNS)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))  # a UserError (say, a missing folder) is one error: line
