"""FBCNN-D on the paper's non-aligned double-JPEG protocol: estimator accuracy and PSNR.

    python -m benchmarks.eval_fbcnn_d [--model fbcnn_gray] [--pairs 10,30 10,50 30,50 30,10]
                                      [--testset LIVE1_gray] [--shift 4] [--json out.json]
    python -m benchmarks.eval_fbcnn_d --model fbcnn_color_lite --testset LIVE1_color

The paper's protocol is grayscale; a colour model is evaluated the same way on a colour test
set (RGB images, the estimator reading them as main_restore's `--qf dominant` does).

For each image and (QF1, QF2): compress at QF1, crop `shift` rows and columns, compress at
QF2 (data/jpeg.py's double_jpeg, as the gray double-JPEG test script does), then estimate the
dominant QF with data/dominant_qf.py. The dominant QF is QF1 when QF1 < QF2 and QF2 otherwise
(the last, coarser compression then dominates), so the table reports both "= QF1" and
"= dominant". With `--model`, each image is also restored blind (the network's own QF), with
the estimated dominant QF as qf_input (FBCNN-D), and with the true dominant QF (oracle), and
PSNR is measured against the equally cropped ground truth. Prints a table and JSON.
"""
import argparse
import os
import sys
import time
from multiprocessing import Pool

import numpy as np

from benchmarks.benchlib import write_json
from data.dominant_qf import estimate_dominant_qf
from data.jpeg import double_jpeg, shift_crop
from models.inference import resolve_device, restore
from models.model_zoo import load_model
from runners.cli import run_cli
from data.testsets import resolve_testset
from utils.errors import UserError
from utils.image import imread_uint, list_images
from utils.metrics import psnr


def _pair(text):
    try:
        q1, q2 = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected QF1,QF2 such as 10,30") from None
    if not (1 <= q1 <= 100 and 1 <= q2 <= 100):
        raise argparse.ArgumentTypeError(f"{text!r}: quality factors must be in 1..100")
    return q1, q2


def _estimate(task):
    path, q1, q2, shift, max_size, n_channels = task
    img_L = double_jpeg(imread_uint(path, n_channels), q1, q2, shift)
    start = time.perf_counter()
    found = estimate_dominant_qf(img_L, max_size=max_size)
    return dict(image=os.path.basename(path), qf1=q1, qf2=q2, estimate=found.qf,
                first_shift=found.first_shift, last_shift=found.last_shift,
                seconds=time.perf_counter() - start)


def _is_gray(path):
    img = imread_uint(path, 3)
    return bool(np.array_equal(img[..., 0], img[..., 1]) and np.array_equal(img[..., 1],
                                                                              img[..., 2]))


def _summarise(rows, q1, q2):
    est = [r["estimate"] for r in rows]
    dominant = min(q1, q2)
    valid = [e for e in est if e is not None]
    summary = dict(qf1=q1, qf2=q2, dominant=dominant, n_images=len(rows),
                   hit_qf1=float(np.mean([e == q1 for e in est])),
                   hit_dominant=float(np.mean([e == dominant for e in est])),
                   within2_dominant=float(np.mean([e is not None and abs(e - dominant) <= 2
                                                   for e in est])),
                   mae_dominant=float(np.mean([abs(e - dominant) for e in valid]))
                   if valid else None,
                   median_estimate=float(np.median(valid)) if valid else None,
                   no_trace=sum(e is None for e in est),
                   seconds_per_image=float(np.mean([r["seconds"] for r in rows])))
    for key in ("psnr_jpeg", "psnr_blind", "psnr_dominant", "psnr_oracle"):
        if rows and key in rows[0]:
            summary[key] = float(np.mean([r[key] for r in rows]))
    return summary


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--testset", default="LIVE1_gray",
                   help="name under --testsets-root or a folder (default %(default)s)")
    p.add_argument("--testsets-root", default=None,
                   help="folder of test sets (default: this repository's testsets/)")
    p.add_argument("--pairs", type=_pair, nargs="+",
                   default=[(10, 30), (10, 50), (30, 50), (30, 10)])
    p.add_argument("--shift", type=int, default=4)
    p.add_argument("--max-size", type=int, default=256,
                   help="analysis window side (default %(default)s)")
    p.add_argument("--model", default=None, help="a model name or weight file (gray: the "
                   "paper's protocol; colour: on a colour --testset); without it only the "
                   "estimator is evaluated")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="processes for the estimator (default: one per CPU)")
    p.add_argument("--limit", type=int, default=None, help="only the first N images (sorted)")
    p.add_argument("--json", default=None, help="also write the results to this file")
    args = p.parse_args(argv)

    try:
        paths = list_images(resolve_testset(args.testset, args.testsets_root))[:args.limit]
    except UserError as exc:
        p.error(str(exc))
    device = model = None
    if args.model:  # before the estimator's minutes, so a wrong --model fails at once
        device = resolve_device(args.device)
        model = load_model(args.model, device=device)
    n_channels = 3 if model is not None and model.in_nc == 3 else 1
    if n_channels == 3 and _is_gray(paths[0]):
        p.error(f"--model {args.model}: a colour model; give a colour --testset such as "
                "LIVE1_color")

    tasks = [(path, q1, q2, args.shift, args.max_size, n_channels) for q1, q2 in args.pairs
             for path in paths]
    start = time.perf_counter()
    with Pool(args.workers) as pool:
        rows = pool.map(_estimate, tasks)
    elapsed = time.perf_counter() - start

    if model is not None:
        images = {os.path.basename(path): imread_uint(path, n_channels) for path in paths}
        for row in rows:
            img_H = images[row["image"]]
            img_L = double_jpeg(img_H, row["qf1"], row["qf2"], args.shift)
            img_H = shift_crop(img_H, args.shift)
            row["psnr_jpeg"] = psnr(img_L, img_H)
            row["psnr_blind"] = psnr(restore(model, img_L, qf=None, device=device)[0], img_H)
            row["psnr_dominant"] = psnr(restore(model, img_L, qf=row["estimate"],
                                                device=device)[0], img_H)
            row["psnr_oracle"] = psnr(restore(model, img_L, qf=min(row["qf1"], row["qf2"]),
                                              device=device)[0], img_H)

    summaries = [_summarise([r for r in rows if (r["qf1"], r["qf2"]) == pair], *pair)
                 for pair in args.pairs]
    print(f"FBCNN-D estimator on {args.testset} ({len(paths)} images), shift {args.shift}, "
          f"window {args.max_size}, {args.workers} worker(s), {elapsed:.0f} s")
    header = "| QF1,QF2 | dominant | = QF1 | = dominant | within 2 | mean abs err | median est. |"
    if args.model:
        header += " JPEG | blind | FBCNN-D | oracle | D - blind |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for s in summaries:
        line = (f"| {s['qf1']},{s['qf2']} | {s['dominant']} | {s['hit_qf1']:.2f} | "
                f"{s['hit_dominant']:.2f} | {s['within2_dominant']:.2f} | "
                f"{'-' if s['mae_dominant'] is None else round(s['mae_dominant'], 2)} | "
                f"{s['median_estimate']} |")
        if args.model:
            line += (f" {s['psnr_jpeg']:.2f} | {s['psnr_blind']:.2f} | {s['psnr_dominant']:.2f} | "
                     f"{s['psnr_oracle']:.2f} | {s['psnr_dominant'] - s['psnr_blind']:+.2f} |")
        print(line)
    result = dict(testset=args.testset, shift=args.shift, max_size=args.max_size,
                  model=args.model, device=device, seconds=elapsed, summaries=summaries,
                  images=rows)
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))  # a UserError (say, a missing folder) is one error: line
