"""Training data speed: patches/s the training DataLoader delivers, per number of workers.

Builds the training dataset, batch sampler and DataLoader exactly as main_train_fbcnn.py does
(option file plus `--set` overrides; `datasets.train.dataroot_H` must exist), and times
`--batches` batches after `--warmup` ones (which include starting the worker processes and
the batches they prepare ahead) for each `--workers` value, in one process. No network runs:
this is what the loader alone can feed a GPU. Compare it with `bench_train.py`'s patches/s
for the step alone; the loader keeps up when its rate with the workers a run will use is
above the step's.

    python -m benchmarks.bench_loader --set datasets.train.dataroot_H=trainsets/sub480 \\
        --workers 0 1 2 --json loader.json
"""
import argparse
import sys
import time
from types import SimpleNamespace

import torch

from benchmarks.benchlib import add_training_option_args, device_name, print_table, write_json
from data.dataset_jpeg import IterationBatchSampler, define_dataset
from runners.cli import run_cli
from runners.train_options import load_options
from runners.training import make_loader

COLUMNS = [("workers", "workers", "{}"), ("batch", "batch", "{}"), ("patch", "patch", "{}"),
           ("double_prob", "double JPEG share", "{:.2f}"), ("seconds", "s", "{:.2f}"),
           ("patches_per_s", "patches/s", "{:.1f}")]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_option_args(p)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2],
                   help="dataloader_num_workers values to compare (default 0 2)")
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed batches first (default: workers x prefetch factor, at least "
                        "2, so the batches prepared ahead are not timed as if made at once)")
    p.add_argument("--json", default=None, help="also write the results to this file")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # as a loader worker: the measured work is the workers'

    rows = []
    for workers in args.workers:
        opt = load_options(args.opt, [*args.set,
                                      f"datasets.train.dataloader_num_workers={workers}"],
                           world_size=1)
        train_opt = opt["datasets"]["train"]
        dataset = define_dataset(train_opt, "train", opt["n_channels"], seed=0)
        batch = train_opt["dataloader_batch_size"]
        sampler = IterationBatchSampler(len(dataset), batch, seed=0,
                                        shuffle=train_opt["dataloader_shuffle"],
                                        double_prob=dataset.degradation.double_prob)
        info = SimpleNamespace(world_size=1, device=torch.device("cpu"))
        batches = iter(make_loader(dataset, sampler, train_opt, info))
        warmup = (args.warmup if args.warmup is not None else
                  max(2, workers * train_opt["dataloader_prefetch_factor"]))
        for _ in range(warmup):
            next(batches)
        start = time.perf_counter()
        for _ in range(args.batches):
            next(batches)
        seconds = time.perf_counter() - start
        del batches  # stop this setting's workers before the next one starts
        rows.append({"workers": workers, "batch": batch, "patch": train_opt["H_size"],
                     "double_prob": dataset.degradation.double_prob, "seconds": seconds,
                     "patches_per_s": batch * args.batches / seconds})
        print(f"workers {workers}: {rows[-1]['patches_per_s']:.1f} patches/s", file=sys.stderr,
              flush=True)
    print(f"\nDevice: {device_name(torch.device('cpu'))}. Dataset {train_opt['dataset_type']}, "
          f"{len(dataset)} images in {train_opt['dataroot_H']}; options {args.opt} "
          f"{' '.join(args.set)}.\n")
    print_table(rows, COLUMNS)
    if args.json:
        write_json(args.json, {"device": device_name(torch.device("cpu")),
                               "argv": sys.argv[1:] if argv is None else argv, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))  # a UserError (say, a missing folder) is one error: line
