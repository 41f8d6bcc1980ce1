"""Train a lite FBCNN within a time budget, score it on LIVE1 and write it, ready to ship.

    python -m benchmarks.gpu_train_lite --model color --out DIR --budget-s 600     # on a GPU
    python -m benchmarks.gpu_train_lite --model gray --out DIR --budget-s 600 \\
        --init model_zoo/fbcnn_gray_lite.safetensors      # fine-tune the shipped network
    python -m benchmarks.gpu_train_lite --smoke --model color --out /tmp/x  # the same path, tiny

Through the project's own code: a probe run measures the iterations per second (and the
start-up) of the recipe's exact options; `train.total_iter` is what that rate fits into
`--budget-s` less the time spent, the start-up and `--eval-reserve-s` (the cosine schedule ends
there, BatchNorm folded at 90%); `runners.training.train` runs it (ending early at the budget
less the reserve, saved); the network is written as fp16 safetensors with its architecture and
scored with the test runner on LIVE1 at QF 10 to 40 beside the JPEG rows. `--model` picks the
recipe (color, gray, gray_double: the original's three models); `--init` fine-tunes a shipped
lite model with a fresh cosine cycle; `--set` passes options as main_train_fbcnn.py takes them.
`--out` receives `<name>.safetensors`, `<name>.json` (device, options, probe, plan, timings,
scores, sha256), `<name>_train.log`, `<name>_metrics.jsonl` and `<name>_eval.log`. The training
tiles go in trainsets/train_pack (or `--data`); `--smoke` runs every step on the CPU with a tiny
network and Classic5 as training data, to check the script. docs/benchmarks.md has the rest.
"""
import argparse
import gc
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass

import torch

from benchmarks.benchlib import device_name, print_table, write_json
from models.model_zoo import (infer_fbcnn_kwargs, load_model, load_state_dict_file,
                              read_fbcnn_kwargs, sha256_file)
from models.select_network import merge_bn, net_act_mode
from runners.cli import run_cli
from data.testsets import resolve_testset
from runners.evaluation import COLOR, GRAY, EvalSettings, Preset, run
from runners.train_options import load_options
from runners.training import RunDirs, train
from utils import REPO_ROOT
from utils import checkpoint as ckpt
from utils.errors import UserError
from utils.fileio import make_folder
from utils.image import imread_uint, imwrite, list_images

__all__ = ["RECIPES", "plan_iterations", "probe_rate", "main"]


@dataclass(frozen=True)
class Recipe:
    """What one `--model` value trains (an option file and overrides) and where it is scored."""
    name: str
    option_file: str
    overrides: tuple
    preset: Preset
    testset: str


RECIPES = {
    "color": Recipe("fbcnn_color_lite", "train_fbcnn_color_lite.json", (), COLOR, "LIVE1_color"),
    "gray": Recipe("fbcnn_gray_lite", "train_fbcnn_gray_lite.json",
                   ("datasets.train.dataset_type=jpeggray",), GRAY, "LIVE1_gray"),
    "gray_double": Recipe("fbcnn_gray_double_lite", "train_fbcnn_gray_lite.json",
                          ("datasets.train.dataset_type=jpeggraydouble",), GRAY, "LIVE1_gray"),
}
EVAL_QFS = (10, 20, 30, 40)
FOLD_AT = 0.9  # BatchNorm folded at this share of the run, as the recipes' 18,000 of 20,000
SAFETY = 0.95  # share of the planned training time the planned iterations are meant to fill
PROBE_TOTAL_ITER = 10 ** 7  # the probe's schedule: a cosine that has not moved in 30 s
SMOKE_OPTIONS = ["netG.nc=[4,8,8,16]", "netG.nb=1", "datasets.train.H_size=32",
                 "datasets.train.dataloader_batch_size=2",
                 "datasets.train.dataloader_num_workers=0", "train.precision=fp32",
                 "train.channels_last=false", "train.cudnn_benchmark=false"]


def _read_records(path, kind="train"):
    records = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue  # a line being written
                if record.get("kind") == kind:
                    records.append(record)
    except OSError:
        pass
    return records


def probe_rate(records, started):
    """(iterations/s, start-up seconds) from a run's train records and the time.time() at which
    train() was called: the rate between the first and the last record (the first interval
    holds the start-up), and the time before the first iteration at that rate."""
    first, last = records[0], records[-1]
    rate = (last["iter"] - first["iter"]) / (last["time"] - first["time"])
    startup = max(0.0, first["time"] - started - first["iter"] / rate)
    return rate, startup


def plan_iterations(rate, seconds_left, max_iter=None, merge=True):
    """train.total_iter and merge_bn_startpoint (or None) that fit `seconds_left` at `rate`."""
    total = int(rate * seconds_left * SAFETY)
    if max_iter is not None:
        total = min(total, max_iter)
    if total < 2:
        raise UserError(f"--budget-s: {seconds_left:.1f} s are left for training at "
                        f"{rate:.2f} it/s, fewer than 2 iterations; give a larger budget")
    fold = min(total - 1, max(1, round(FOLD_AT * total))) if merge else None
    return total, fold


def _resolve_folder(path):
    if os.path.isdir(path):
        return os.path.abspath(path)
    inside = os.path.join(REPO_ROOT, path)
    return inside if os.path.isdir(inside) else None


def _init_overrides(path, recipe):
    """Options that make the network the one in `path` and start from its weights."""
    if not os.path.isfile(path):
        raise UserError(f"--init {path!r}: no such file")
    kwargs = {**infer_fbcnn_kwargs(load_state_dict_file(path), path),
              **(read_fbcnn_kwargs(path) or {})}
    channels = recipe.preset.n_channels
    if kwargs["in_nc"] != channels:
        raise UserError(f"--init {path}: a {kwargs['in_nc']}-channel network; the "
                        f"{recipe.name} recipe trains {channels}-channel ones")
    merge = "B" in kwargs["act_mode"]  # a folded network has no BatchNorm left to fold
    return [f"path.pretrained_netG={os.path.abspath(path)}",
            *(f"netG.{key}={json.dumps(kwargs[key])}" for key in
              ("in_nc", "out_nc", "nc", "nb", "act_mode", "downsample_mode", "upsample_mode")),
            f"merge_bn={json.dumps(merge)}"], kwargs


def _smoke_testset(folder, source, n_channels, count=2, size=64):
    """`count` crops of `size` x `size` from the first images of `source`, as PNGs."""
    make_folder(folder)
    for path in list_images(source)[:count]:
        name = os.path.splitext(os.path.basename(path))[0] + ".png"
        imwrite(os.path.join(folder, name), imread_uint(path, n_channels)[:size, :size])
    return folder


def _load(args, recipe, root, data, extra, run_overrides):
    """The validated options of a run: the recipe, this script's settings, then `--set`."""
    path = os.path.join(REPO_ROOT, "options", recipe.option_file)
    overrides = [*recipe.overrides, f"path.root={root}", f"datasets.train.dataroot_H={data}",
                 "datasets.test=null", f"gpu_ids={'[]' if args.device == 'cpu' else '[0]'}",
                 *(SMOKE_OPTIONS if args.smoke else []), *extra, *run_overrides, *args.set]
    return load_options(path, overrides, world_size=1)


def _probe(args, recipe, root, data, extra):
    """Train the exact recipe for about --measure-s; (iterations/s, start-up s, record,
    whether the recipe folds BatchNorm)."""
    opt = _load(args, recipe, root, data, extra, [
        f"task={recipe.name}_probe", f"train.total_iter={PROBE_TOTAL_ITER}",
        f"merge_bn_startpoint={PROBE_TOTAL_ITER}",
        f"train.checkpoint_print={2 if args.smoke else 10}",
        f"train.checkpoint_save={PROBE_TOTAL_ITER}"])
    metrics = RunDirs.from_options(opt).metrics
    started = time.time()
    hard_stop = time.monotonic() + 2 * args.measure_s + 120  # a start-up that never ends

    def measured():  # --measure-s of steady training, after the first interval's start-up
        records = _read_records(metrics)
        enough = len(records) >= 3 and records[-1]["time"] - records[0]["time"] >= args.measure_s
        return enough or time.monotonic() > hard_stop

    train(opt, should_end=measured)
    gc.collect()  # the probe's loader workers and network go before the real run starts
    records = _read_records(metrics)
    if len(records) < 2:
        raise UserError(f"the probe logged {len(records)} interval(s) of "
                        f"{opt['train']['checkpoint_print']} iterations in "
                        f"{time.time() - started:.0f} s; at least 2 are needed to measure it/s")
    rate, startup = probe_rate(records, started)
    batch = opt["datasets"]["train"]["dataloader_batch_size"]
    return rate, startup, {"iterations": records[-1]["iter"],
                           "seconds": round(time.time() - started, 2), "it_per_s": rate,
                           "patches_per_s": rate * batch,
                           "startup_s": round(startup, 2)}, opt["merge_bn"]


def _train(args, recipe, root, data, extra, total, fold, deadline):
    """The planned run: (options, the network file of the iteration reached, that iteration,
    whether the deadline ended it before train.total_iter)."""
    overrides = [f"task={recipe.name}", f"train.total_iter={total}",
                 f"train.checkpoint_print={max(1, min(100, total // 20))}",
                 f"train.checkpoint_save={max(1, total // 5)}", "train.checkpoint_keep=1"]
    if fold is not None:
        overrides.append(f"merge_bn_startpoint={fold}")
    opt = _load(args, recipe, root, data, extra, overrides)
    span = train(opt, should_end=lambda: time.monotonic() > deadline)
    if span["end"] == 0:
        raise UserError("the deadline came before the first iteration; give a larger --budget-s")
    models = RunDirs.from_options(opt).models
    return opt, ckpt.network_file(models, span["end"]), span["end"], span["end"] < total


def _write_weights(source, dest, metadata):
    """The checkpoint's network, BatchNorm folded, as fp16 safetensors with its architecture."""
    net = load_model(source).net
    if "B" in net_act_mode(net):  # ended before the fold: fold now (same outputs in eval)
        net = merge_bn(net)
    kwargs = {**read_fbcnn_kwargs(source), "act_mode": net_act_mode(net)}
    state = net.state_dict()
    largest = max(float(v.abs().max()) for v in state.values() if v.is_floating_point())
    if not largest < torch.finfo(torch.float16).max:
        raise UserError(f"{source}: a weight of magnitude {largest:.3g} does not fit fp16")
    ckpt.save_network(dest, state, kwargs, metadata, dtype=torch.float16)
    return {"file": os.path.basename(dest), "bytes": os.path.getsize(dest),
            "sha256": sha256_file(dest), "fbcnn_kwargs": kwargs,
            "parameters": sum(v.numel() for v in state.values())}


def _evaluate(recipe, weights, testset, device, workdir, eval_log):
    """The runner's summaries of the network and of the JPEG input at EVAL_QFS."""
    summaries, logs = {}, []
    for label, model in (("network", weights), ("jpeg", "jpeg")):
        results = os.path.join(workdir, f"eval_{label}")
        # the per-image lines go to the runner's log file, copied below
        summaries[label] = run(recipe.preset, EvalSettings.of(
            recipe.preset, model=model, testset=testset, qf=EVAL_QFS, device=device,
            results=results, save_images=False, console=False))
        logs += [(label, os.path.join(results, name)) for name in sorted(os.listdir(results))
                 if name.endswith(".log")]
    _copy_logs(logs, eval_log)
    rows = []
    for net, jpeg in zip(summaries["network"], summaries["jpeg"]):
        rows.append({"qf": net["qf"], "psnr": net["psnr"], "ssim": net["ssim"],
                     "psnrb": net["psnrb"], "qf_pred_mean": net["qf_pred_mean"],
                     "jpeg_psnr": jpeg["psnr"], "jpeg_ssim": jpeg["ssim"],
                     "jpeg_psnrb": jpeg["psnrb"], "n_images": net["n_images"]})
    return rows


COLUMNS = [("qf", "QF", "{}"), ("jpeg_psnr", "JPEG PSNR", "{:.2f}"), ("psnr", "PSNR", "{:.2f}"),
           ("jpeg_ssim", "JPEG SSIM", "{:.4f}"), ("ssim", "SSIM", "{:.4f}"),
           ("jpeg_psnrb", "JPEG PSNR-B", "{:.2f}"), ("psnrb", "PSNR-B", "{:.2f}"),
           ("qf_pred_mean", "predicted QF", "{:.1f}")]


def _copy_logs(sources, dest):
    with open(dest, "w", encoding="utf-8") as out:
        for label, path in sources:
            if os.path.isfile(path):
                with open(path, encoding="utf-8") as f:
                    out.write(f"===== {label}: {path}\n{f.read()}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=tuple(RECIPES), required=True,
                   help="the recipe: color, gray (jpeggray) or gray_double (jpeggraydouble)")
    p.add_argument("--out", required=True, help="folder for the five result files")
    p.add_argument("--budget-s", type=float, default=None,
                   help="seconds from start to the written results (required; 60 with "
                        "--smoke)")
    p.add_argument("--measure-s", type=float, default=None,
                   help="seconds of steady training the probe measures it/s over (default 30; "
                        "2 with --smoke)")
    p.add_argument("--eval-reserve-s", type=float, default=None,
                   help="seconds kept for writing and scoring the network (default 60; 15 "
                        "with --smoke)")
    p.add_argument("--max-iter", type=int, default=None,
                   help="at most this many iterations (default: none; 20 with --smoke)")
    p.add_argument("--data", default="trainsets/train_pack",
                   help="folder of clean training images (default %(default)s)")
    p.add_argument("--init", default=None, metavar="WEIGHTS",
                   help="fine-tune this lite network (a fresh cosine cycle) instead of "
                        "training from scratch")
    p.add_argument("--testset", default=None,
                   help="scoring set (default LIVE1_color or LIVE1_gray; with --smoke, two "
                        "64x64 crops of it)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: cuda when available (cpu with --smoke)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="option overrides, as main_train_fbcnn.py takes them")
    p.add_argument("--workdir", default=None,
                   help="keep the run folders (checkpoints, logs) here; default: a temporary "
                        "folder, removed at the end")
    p.add_argument("--smoke", action="store_true",
                   help="every step on the CPU, tiny: checks the script, trains nothing useful")
    args = p.parse_args(argv)
    return run_cli(lambda: _main(args))


def _defaults(args):
    smoke = args.smoke
    if args.budget_s is None and not smoke:
        raise UserError("--budget-s: give the seconds this run may take, start to results")
    for key, normal, tiny in (("budget_s", None, 60.0), ("measure_s", 30.0, 2.0),
                              ("eval_reserve_s", 60.0, 15.0), ("max_iter", None, 20)):
        if getattr(args, key) is None:
            setattr(args, key, tiny if smoke else normal)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() and not smoke else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device here")


def _main(args):
    start = time.monotonic()
    _defaults(args)
    recipe = RECIPES[args.model]
    data = _resolve_folder(args.data)
    if data is None and args.smoke:
        data = os.path.join(REPO_ROOT, "testsets", "Classic5")
    if data is None:
        raise UserError(f"--data {args.data!r}: no such folder (trainsets/ is not in git: copy "
                        f"the training tiles to trainsets/train_pack, and carry it to the GPU "
                        f"machine)")
    extra, init_kwargs = _init_overrides(args.init, recipe) if args.init else ([], None)
    make_folder(args.out)
    workdir = args.workdir or tempfile.mkdtemp(prefix="gpu_train_lite_")
    root = os.path.join(workdir, "runs")
    try:
        testset = resolve_testset(args.testset or recipe.testset, None)
        if args.smoke:
            testset = _smoke_testset(os.path.join(workdir, "smoke_testset"), testset,
                                     recipe.preset.n_channels)
        result = {"model": args.model, "name": recipe.name, "smoke": args.smoke,
                  "device": device_name(args.device), "torch": torch.__version__,
                  "option_file": f"options/{recipe.option_file}", "data": data,
                  "init": None, "budget_s": args.budget_s,
                  "measure_s": args.measure_s, "eval_reserve_s": args.eval_reserve_s}
        if args.init:
            result["init"] = {"file": args.init, "sha256": sha256_file(args.init),
                              "fbcnn_kwargs": init_kwargs}
        t0 = time.monotonic()
        rate, startup, result["probe"], merge = _probe(args, recipe, root, data, extra)
        probe_s = time.monotonic() - t0
        print(f"probe: {rate:.2f} it/s after {startup:.1f} s of start-up "
              f"({result['probe']['iterations']} iterations in {probe_s:.1f} s)", flush=True)

        deadline = start + args.budget_s - args.eval_reserve_s
        left = deadline - time.monotonic() - startup
        total, fold = plan_iterations(rate, left, args.max_iter, merge)
        result["plan"] = {"total_iter": total, "merge_bn_startpoint": fold,
                          "training_s_left": round(left, 1),
                          "expected_training_s": round(startup + total / rate, 1)}
        print(f"plan: {total} iterations" + (f", BatchNorm folded at {fold}" if fold else "")
              + f", about {startup + total / rate:.0f} s", flush=True)

        t0 = time.monotonic()
        opt, checkpoint, end, stopped = _train(args, recipe, root, data, extra, total, fold,
                                               deadline)
        train_s = time.monotonic() - t0
        result["training"] = {"iterations": end, "seconds": round(train_s, 1),
                              "stopped_at_deadline": stopped}
        result["options"] = opt
        print(f"trained {end} iterations in {train_s:.1f} s"
              + (" (ended at the deadline)" if stopped else ""),
              flush=True)

        t0 = time.monotonic()
        weights = os.path.join(args.out, f"{recipe.name}.safetensors")
        metadata = {"name": recipe.name,
                    "recipe": " ".join([f"options/{recipe.option_file}", *recipe.overrides]),
                    "dataset_type": opt["datasets"]["train"]["dataset_type"],
                    "iterations": end,
                    "init": os.path.basename(args.init) if args.init else "none",
                    "trained_on": result["device"], "date": time.strftime("%Y-%m-%d")}
        result["weights"] = _write_weights(checkpoint, weights, metadata)
        result["evaluation"] = {"testset": testset, "rows": _evaluate(
            recipe, weights, testset, args.device, workdir,
            os.path.join(args.out, f"{recipe.name}_eval.log"))}
        eval_s = time.monotonic() - t0
        run_dir = RunDirs.from_options(opt)
        probe_dir = os.path.join(root, f"{recipe.name}_probe")
        _copy_logs([("probe (ended on purpose once its it/s was measured)",
                     os.path.join(probe_dir, "train.log")), ("run", run_dir.log)],
                   os.path.join(args.out, f"{recipe.name}_train.log"))
        shutil.copyfile(run_dir.metrics, os.path.join(args.out, f"{recipe.name}_metrics.jsonl"))
        result["seconds"] = {"probe": round(probe_s, 1), "training": round(train_s, 1),
                             "evaluation": round(eval_s, 1),
                             "total": round(time.monotonic() - start, 1)}
        write_json(os.path.join(args.out, f"{recipe.name}.json"), result)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)

    rows = result["evaluation"]["rows"]
    print(f"\nDevice: {result['device']}. {recipe.name}: {end} iterations "
          f"({'from ' + os.path.basename(args.init) if args.init else 'from scratch'}), "
          f"{result['weights']['bytes'] / 2 ** 20:.2f} MiB in fp16. {os.path.basename(testset)}"
          f", {rows[0]['n_images']} images. Seconds: {result['seconds']}.\n")
    print_table(rows, COLUMNS)
    print(json.dumps({k: result[k] for k in ("name", "probe", "plan", "training", "weights",
                                               "seconds")}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
