"""Training speed: patches/s of `ModelFBCNN.optimize_parameters`, per training precision.

Builds the model from an option file exactly as main_train_fbcnn.py does (`--set` overrides
as there), feeds it synthetic uint8 batches of the configured patch size (the step's cost does
not depend on pixel values; the data pipeline is not part of this measurement), and times
`--steps` iterations after `--warmup` ones for each `train.precision` (fp32 is IEEE fp32; tf32
lets cuDNN and cuBLAS use TF32, PyTorch's default for convolutions and so the original's) and
`train.compile` setting, in one process. Achieved TFLOP/s counts a training step as 3x the
forward convolution FLOPs (forward, and a backward pass for activations and weights).

    python -m benchmarks.bench_train --device cuda --precision fp32 tf32 bf16 fp16 --json t.json
    python -m benchmarks.bench_train --device cuda --precision bf16 --channels-last --compile off on
    python -m benchmarks.bench_train --device cpu --set netG.nc=[16,32,64,128] --set netG.nb=2 \\
        --set datasets.train.dataloader_batch_size=4 --precision fp32 --steps 3
"""
import argparse
import itertools
import sys
import time

import torch

from benchmarks.benchlib import (PeakMemory, add_training_option_args, device_name,
                                 fbcnn_conv_flops, print_table, write_json)
from models.inference import PRECISIONS
from models.model_fbcnn import ModelFBCNN
from runners.cli import run_cli
from runners.train_options import load_options

COLUMNS = [("precision", "precision", "{}"), ("channels_last", "channels_last", "{}"),
           ("compile", "compile", "{}"),
           ("batch", "batch", "{}"), ("patch", "patch", "{}"), ("seconds", "s", "{:.2f}"),
           ("patches_per_s", "patches/s", "{:.2f}"), ("tflops", "TFLOP/s (3x fwd)", "{:.3f}"),
           ("peak_gib", "peak GiB", "{:.2f}")]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_option_args(p)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", nargs="+", choices=tuple(PRECISIONS), default=None,
                   help="train.precision values to compare (default fp32 bf16)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", nargs="+", choices=("off", "on"), default=["off"],
                   help="train.compile settings to compare (compiled during the warm-up steps)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--json", default=None, help="also write the results to this file")
    args = p.parse_args(argv)
    precisions = args.precision or ["fp32", "bf16"]
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    rows = []
    for precision, compile in itertools.product(precisions, args.compile):
        overrides = [*args.set, f"train.precision={precision}",
                     f"train.channels_last={'true' if args.channels_last else 'false'}",
                     f"train.compile={'true' if compile == 'on' else 'false'}"]
        opt = load_options(args.opt, overrides, world_size=1, check_paths=False)
        if device.type == "cuda":  # as training sets it (--set train.cudnn_benchmark=true)
            torch.backends.cudnn.benchmark = opt["train"]["cudnn_benchmark"]
        torch.manual_seed(0)
        model = ModelFBCNN(opt, device)
        batch = opt["datasets"]["train"]["dataloader_batch_size"]
        patch = opt["datasets"]["train"]["H_size"]
        channels = opt["netG"]["in_nc"]
        generator = torch.Generator().manual_seed(0)
        data = {"L": torch.randint(0, 256, (batch, channels, patch, patch), dtype=torch.uint8,
                                   generator=generator),
                "H": torch.randint(0, 256, (batch, channels, patch, patch), dtype=torch.uint8,
                                   generator=generator),
                "qf": torch.rand(batch, 1, generator=generator)}
        for step in range(args.warmup):
            model.feed_data(data)
            model.optimize_parameters(step)
        with PeakMemory(device) as memory:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            for step in range(args.steps):
                model.feed_data(data)
                model.optimize_parameters(args.warmup + step)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - start
        flops = 3 * fbcnn_conv_flops(model.bare, patch, patch) * batch * args.steps
        rows.append({"precision": model.precision, "channels_last": args.channels_last,
                     "compile": compile,
                     "batch": batch,
                     "patch": patch, "seconds": seconds,
                     "patches_per_s": batch * args.steps / seconds,
                     "tflops": flops / seconds / 1e12, "peak_gib": memory.peak / 2 ** 30,
                     "peak_kind": memory.kind})
        if args.json:  # after every row: a run stopped at its time limit keeps what it measured
            write_json(args.json, {"device": device_name(device), "nc": model.bare.nc,
                                   "nb": model.bare.nb,
                                   "argv": sys.argv[1:] if argv is None else argv, "rows": rows})
        print(f"{precision}, compile {compile}: {rows[-1]['patches_per_s']:.2f} patches/s",
              file=sys.stderr, flush=True)
    nc, nb = model.bare.nc, model.bare.nb
    print(f"\nDevice: {device_name(device)}. Network: nc {nc}, nb {nb}, options {args.opt} "
          f"{' '.join(args.set)}.\n")
    print_table(rows, COLUMNS)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))  # a UserError (say, a missing folder) is one error: line
