"""Does main_restore make a JPEG better or worse, QF 10 to 100? Gain over the JPEG, per image.

    python -m benchmarks.no_harm --testset LIVE1_color Classic5 --qf 10 50 90 95 \
        [--variant default blind header header+proj] [--model M] [--gray-model M] \
        [--clean] [--out results/no_harm] [--plot docs/no_harm.png]

Each clean image of each test set is compressed with OpenCV at each QF (data/jpeg.py, as the
test scripts do) and written as a .jpg; then `main_restore.py` itself restores the folder, once
per variant, and each output is scored against the clean image (PSNR; RGB for colour, as the
test scripts). Variants are main_restore's options:

    default       no flags: blind (the network's own QF), projected onto the file's DCT
    blind         --no-projection
    header        --qf header --no-projection (the QF fed from the file's tables)
    header+proj   --qf header

`--clean` also restores the clean originals as PNG files (no JPEG trace: a model that keeps a
clean image gives them back at a high PSNR of themselves). The table gives per test set,
variant and QF the mean JPEG PSNR, the mean gain, the worst image's gain and how many images
lose more than 0.1 dB (for clean originals: the restored PSNR of themselves); `--json` keeps
every image's row, `--plot` draws mean gain against QF (matplotlib).
"""
import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

from benchmarks.benchlib import print_table, write_json
from data.jpeg import jpeg_decode, jpeg_encode
from runners import restore as main_restore
from runners.cli import quality_factor
from data.testsets import resolve_testset
from utils.image import imread_uint, imwrite, list_images
from utils.metrics import psnr

VARIANTS = {"default": [], "blind": ["--no-projection"], "header": ["--qf", "header",
                                                                  "--no-projection"],
            "header+proj": ["--qf", "header"]}
GRAY_SETS = ("Classic5", "LIVE1_gray", "BSDS500_gray")
LABELS = {"default": "projected (default)", "blind": "--no-projection",
          "header": "--qf header --no-projection", "header+proj": "--qf header, projected"}
COLUMNS = [("testset", "test set", "{}"), ("variant", "variant", "{}"), ("qf", "QF", "{}"),
           ("n", "images", "{}"), ("jpeg", "JPEG dB", "{:.2f}"), ("psnr", "restored dB", "{:.2f}"),
           ("lowest", "lowest dB", "{:.2f}"), ("gain", "mean gain", "{:+.2f}"),
           ("worst", "worst gain", "{:+.2f}"), ("losers", "lose > 0.1 dB", "{}"),
           ("seconds", "s", "{:.1f}")]


def _restore(folder, out, variant, args):
    """Run main_restore on `folder` with the variant's flags; returns its seconds."""
    argv = [folder, "-o", out, "--quiet", "--device", "cpu", *VARIANTS[variant]]
    argv += ["--model", args.model] if args.model else []
    argv += ["--gray-model", args.gray_model] if args.gray_model else []
    start = time.perf_counter()
    status = main_restore.main(argv)
    if status != 0:
        raise SystemExit(f"main_restore {' '.join(argv)} exited with status {status}")
    return time.perf_counter() - start


def _score(clean, out_dir, names, n_channels):
    return [psnr(imread_uint(os.path.join(out_dir, os.path.splitext(n)[0] + ".png"),
                             n_channels), clean[n]) for n in names]


def evaluate(testset, args, work):
    folder = resolve_testset(testset, args.testsets_root)
    n_channels = 1 if os.path.basename(folder) in GRAY_SETS else 3
    paths = list_images(folder)[:args.limit]
    clean = {os.path.basename(p): imread_uint(p, n_channels) for p in paths}
    names = sorted(clean)
    rows = []
    for qf in args.qf:
        jpeg_dir = os.path.join(work, f"{testset}_qf{qf}")
        os.makedirs(jpeg_dir)
        jpeg_psnr = {}
        for name in names:
            data = jpeg_encode(clean[name], qf)
            with open(os.path.join(jpeg_dir, os.path.splitext(name)[0] + ".jpg"), "wb") as f:
                f.write(data)
            jpeg_psnr[name] = psnr(jpeg_decode(data, n_channels), clean[name])
        for variant in args.variant:
            out = os.path.join(work, f"{testset}_qf{qf}_{variant}")
            seconds = _restore(jpeg_dir, out, variant, args)
            scores = _score(clean, out, names, n_channels)
            rows.append(_row(testset, variant, qf, names, [jpeg_psnr[n] for n in names], scores,
                             seconds))
    if args.clean:
        png_dir = os.path.join(work, f"{testset}_clean")
        os.makedirs(png_dir)
        for name in names:
            imwrite(os.path.join(png_dir, os.path.splitext(name)[0] + ".png"), clean[name])
        out = os.path.join(work, f"{testset}_clean_out")
        seconds = _restore(png_dir, out, "default", args)
        scores = _score(clean, out, names, n_channels)
        rows.append({"testset": testset, "variant": "default", "qf": "clean", "n": len(names),
                     "psnr": float(np.mean(scores)), "lowest": float(np.min(scores)),
                     "seconds": seconds, "images": dict(zip(names, map(float, scores)))})
    return rows


def _row(testset, variant, qf, names, jpeg_psnr, scores, seconds):
    scores, jpeg_psnr = np.array(scores), np.array(jpeg_psnr)
    # an exact JPEG (a flat or two-level graphic at a high QF) kept exact gains nothing; made
    # inexact, it loses without bound (-inf), which is counted among the losers
    both_exact = np.isinf(scores) & np.isinf(jpeg_psnr)
    gains = np.where(both_exact, 0.0, scores - np.where(both_exact, 0.0, jpeg_psnr))
    return {"testset": testset, "variant": variant, "qf": qf, "n": len(names),
            "jpeg": float(np.mean(jpeg_psnr)), "psnr": float(np.mean(scores)),
            "lowest": float(np.min(scores)), "gain": float(gains.mean()),
            "worst": float(gains.min()), "losers": int((gains < -0.1).sum()),
            "seconds": seconds, "images": dict(zip(names, map(float, gains)))}


def plot(rows, path, title):
    """Mean gain over the JPEG against QF, one line per test set and variant."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.8), dpi=100)
    series = sorted({(r["testset"], r["variant"]) for r in rows if r["qf"] != "clean"})
    for testset, variant in series:
        points = sorted((r["qf"], r["gain"]) for r in rows if r["qf"] != "clean"
                        and (r["testset"], r["variant"]) == (testset, variant))
        ax.plot(*zip(*points), marker="o", markersize=3,
                linestyle="-" if "proj" in variant or variant == "default" else "--",
                label=f"{testset}: {LABELS[variant]}")
    ax.axhline(0, color="black", linewidth=0.8)
    low = min(r["gain"] for r in rows if r["qf"] != "clean")
    if low < -3:  # keep the scale where the models are compared; say what is cut off
        ax.set_ylim(bottom=-3)
        ax.text(0.01, 0.02, f"lowest point off the chart: {low:+.1f} dB", fontsize=7,
                transform=ax.transAxes)
    ax.set_xlabel("JPEG quality factor (OpenCV)")
    ax.set_ylabel("PSNR gain over the JPEG (dB)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--testset", nargs="+", default=["LIVE1_color", "Classic5"])
    p.add_argument("--testsets-root", default=None)
    p.add_argument("--qf", type=quality_factor, nargs="+",
                   default=[10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 100])
    p.add_argument("--variant", nargs="+", choices=tuple(VARIANTS), default=["default", "blind"])
    p.add_argument("--model", default=None, help="main_restore's --model (default: its default)")
    p.add_argument("--gray-model", default=None, help="main_restore's --gray-model")
    p.add_argument("--clean", action="store_true", help="also restore the clean originals (PNG)")
    p.add_argument("--limit", type=int, default=None, help="only the first N images of each set")
    p.add_argument("--json", default=None, help="write every row, images included")
    p.add_argument("--plot", default=None, help="draw mean gain against QF to this PNG")
    p.add_argument("--title", default="main_restore: PSNR gain over the JPEG")
    p.add_argument("--plot-variants", nargs="+", choices=tuple(VARIANTS), default=None,
                   help="the variants drawn (default: every one run)")
    p.add_argument("--from-json", default=None, metavar="PATH",
                   help="draw and print the rows of an earlier --json instead of running")
    args = p.parse_args(argv)
    rows = []
    if args.from_json:
        with open(args.from_json, encoding="utf-8") as f:
            rows = json.load(f)["rows"]
    else:
        with tempfile.TemporaryDirectory(prefix="no_harm_") as work:
            for testset in args.testset:
                rows += evaluate(testset, args, work)
    print_table(rows, COLUMNS)
    if args.json:
        write_json(args.json, {"argv": sys.argv[1:] if argv is None else argv, "rows": rows})
    if args.plot:
        drawn = [r for r in rows if args.plot_variants is None
                 or r["variant"] in args.plot_variants]
        plot(drawn, args.plot, args.title)
    return 0


if __name__ == "__main__":
    sys.exit(main())
