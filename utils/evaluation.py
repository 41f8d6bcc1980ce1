"""The one test runner behind the four `main_test_fbcnn_*.py` scripts.

This module owns the paper's evaluation protocol end to end: which images are read and how,
how they are degraded (single JPEG, shifted double JPEG, or real JPEGs restored with QF
control), the per-image and average PSNR / SSIM / PSNR-B lines, the restored PNGs and log under
the results folder, and the `--json` summaries. The model is loaded once per run; the scripts
are presets (`Preset`) that fix the mode, the channel count and the defaults of the original.
"""
import argparse
import json
import logging
import os
import sys
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from data.jpeg import double_jpeg, jpeg, shift_crop
from models.inference import restore
from models.model_zoo import load_model
from utils.errors import UserError
from utils.image import ImageReadError, imread_uint, imwrite
from utils.metrics import psnr, psnrb, ssim

__all__ = ["Preset", "COLOR", "GRAY", "GRAY_DOUBLE", "COLOR_REAL", "build_parser", "run", "main"]

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOG = logging.getLogger("fbcnn.test")


@dataclass(frozen=True)
class Preset:
    """What distinguishes one test script from another."""
    mode: str  # "single", "double" or "real"
    n_channels: int
    testset: str
    model: str
    qf: tuple = ()
    qf1: tuple = ()
    qf2: tuple = ()
    shift: int = 4
    qf_control: tuple = ()
    description: str = ""


ALL_QF = tuple(range(10, 100, 10))
COLOR = Preset("single", 3, "LIVE1_color", "fbcnn_color", qf=ALL_QF,
               description="Colour JPEG artifact removal: single JPEG at each QF.")
GRAY = Preset("single", 1, "Classic5", "fbcnn_gray", qf=ALL_QF,
              description="Grayscale JPEG artifact removal: single JPEG at each QF.")
GRAY_DOUBLE = Preset("double", 1, "LIVE1_gray", "fbcnn_gray_double", qf1=(10, 30, 50),
                     qf2=(10, 30, 50), description="Grayscale non-aligned double JPEG: QF1, crop "
                     "by the shift, QF2, for every (QF1, QF2) pair.")
COLOR_REAL = Preset("real", 3, "Real", "fbcnn_color", qf_control=(5, 10, 30, 50, 70, 90),
                    description="Real-world JPEGs (no ground truth): blind restoration, then one "
                    "result per QF in the control list.")


def _quality(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 1 <= value <= 100:
        raise argparse.ArgumentTypeError(f"{value} is outside the JPEG quality range 1..100")
    return value


def build_parser(preset, prog=None):
    """The command line of a test script; defaults are the preset's (the original's)."""
    p = argparse.ArgumentParser(prog=prog, description=preset.description)
    p.add_argument("--testset", default=preset.testset,
                   help="test set name under --testsets-root, or a folder (default %(default)s)")
    p.add_argument("--testsets-root", default=None,
                   help="folder holding the named test sets (default: the repository's testsets/)")
    p.add_argument("--model", default=preset.model,
                   help="fbcnn_color, fbcnn_gray, fbcnn_gray_double, jpeg (the unrestored input), "
                        "or a .pth/.safetensors path (default %(default)s)")
    if preset.mode == "single":
        p.add_argument("--qf", type=_quality, nargs="+", default=list(preset.qf),
                       help="JPEG quality factors (default %(default)s)")
    elif preset.mode == "double":
        p.add_argument("--qf1", type=_quality, nargs="+", default=list(preset.qf1),
                       help="first JPEG quality factors (default %(default)s)")
        p.add_argument("--qf2", type=_quality, nargs="+", default=list(preset.qf2),
                       help="second JPEG quality factors (default %(default)s)")
        p.add_argument("--shift", type=int, default=preset.shift,
                       help="rows and columns cropped between the two JPEGs (default %(default)s)")
    else:
        p.add_argument("--qf-control", type=_quality, nargs="+", default=list(preset.qf_control),
                       help="QFs fed to the network as qf_input after the blind pass "
                            "(default %(default)s)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--results", default="test_results",
                   help="folder for restored images and logs (default %(default)s)")
    p.add_argument("--no-save-images", action="store_true", help="do not write restored PNGs")
    p.add_argument("--json", default=None, help="write the per-setting summaries to this file")
    return p


@dataclass
class Setting:
    """One row of a results table: a degradation applied to every image of the test set."""
    name: str
    keys: dict
    degrade: object = None  # uint8 H -> (L, H aligned with L)
    qf_input: object = None
    scores: list = field(default_factory=list)


def _resolve_testset(testset, root):
    """A name under `root` (default: the repository's testsets/) first, else a folder path."""
    root = root or os.path.join(REPO_ROOT, "testsets")
    path = os.path.join(root, testset)
    if os.path.isdir(path):
        return os.path.abspath(path)
    if os.path.isdir(testset):
        return os.path.abspath(testset)
    known = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))) \
        if os.path.isdir(root) else []
    hint = f"; sets in {root}: {', '.join(known)}" if known else f"; {root} holds no test sets"
    raise UserError(f"--testset {testset!r}: no folder {path}{hint}")


def _resolve_device(device):
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available; use --device cpu")
    return device


def _check_channels(model, n_channels, model_arg):
    if model.in_nc is None or model.in_nc == n_channels:
        return
    kind = {1: "grayscale (1-channel)", 3: "colour (3-channel)"}
    script = "main_test_fbcnn_gray.py" if model.in_nc == 1 else "main_test_fbcnn_color.py"
    raise UserError(f"--model {model_arg}: a {kind.get(model.in_nc, model.in_nc)} model cannot "
                    f"run this script's {kind[n_channels]} images; use {script} or a "
                    f"{kind[n_channels]} model")


def _settings(preset, args, prefix):
    if preset.mode == "single":
        return [Setting(f"{prefix}_qf{q}", {"qf": q},
                        degrade=lambda img, q=q: (jpeg(img, q), img)) for q in args.qf]
    if preset.mode == "double":
        if args.shift < 0:
            raise UserError(f"--shift {args.shift}: must be 0 or more")
        return [Setting(f"{prefix}_qf{q1}_{q2}_shift{args.shift}",
                        {"qf1": q1, "qf2": q2, "shift": args.shift},
                        degrade=lambda img, q1=q1, q2=q2: (double_jpeg(img, q1, q2, args.shift),
                                                           shift_crop(img, args.shift)))
                for q1 in args.qf1 for q2 in args.qf2]
    return [Setting(f"{prefix}_blind", {"qf_control": None}),
            *[Setting(f"{prefix}_qf{q}", {"qf_control": q}, qf_input=q) for q in args.qf_control]]


def _setup_logging(log_path):
    LOG.setLevel(logging.INFO)
    LOG.propagate = False
    for handler in list(LOG.handlers):
        LOG.removeHandler(handler)
        handler.close()

    class TqdmHandler(logging.Handler):
        def emit(self, record):
            tqdm.write(self.format(record), file=sys.stdout)

    console = TqdmHandler()
    console.setFormatter(logging.Formatter("%(message)s"))
    LOG.addHandler(console)
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    to_file = logging.FileHandler(log_path)
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    LOG.addHandler(to_file)


def _read_testset(folder, n_channels):
    """The readable images of `folder` as (name, uint8 array); unreadable files are skipped."""
    names = sorted(n for n in os.listdir(folder)
                   if not n.startswith(".") and os.path.isfile(os.path.join(folder, n)))
    images, skipped = [], []
    for name in names:
        try:
            images.append((name, imread_uint(os.path.join(folder, name), n_channels)))
        except ImageReadError as exc:
            LOG.warning("skipped %s", exc)
            skipped.append(name)
    if not images:
        raise UserError(f"--testset {folder}: no readable images")
    return images, skipped


def _fmt(value, digits):
    return "inf" if value == float("inf") else f"{value:.{digits}f}"


def _mean(values):
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def _write_json(path, summaries):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.part-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(summaries, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def run(preset, args):
    """Evaluate one model on one test set for every setting; returns the summaries."""
    testset_dir = _resolve_testset(args.testset, args.testsets_root)
    testset = os.path.basename(os.path.normpath(testset_dir))
    device = _resolve_device(args.device)
    model = load_model(args.model, device=device)
    _check_channels(model, preset.n_channels, args.model)
    prefix = f"{testset}_{model.name}"
    _setup_logging(os.path.join(args.results, f"{prefix}.log"))
    LOG.info("model %s on %s (%s), device %s", args.model, testset, testset_dir, device)
    settings = _settings(preset, args, prefix)
    images, skipped = _read_testset(testset_dir, preset.n_channels)

    summaries = []
    for setting in settings:
        out_dir = os.path.join(args.results, setting.name)
        if not args.no_save_images:
            os.makedirs(out_dir, exist_ok=True)
        for name, img_H in tqdm(images, desc=setting.name, unit="img", leave=False,
                                disable=None):
            stem = os.path.splitext(name)[0]
            if setting.degrade is None:  # real JPEGs: restore the file as it is
                img_L, img_H = img_H, None
            else:
                img_L, img_H = setting.degrade(img_H)
            img_E, qf_pred = restore(model, img_L, qf=setting.qf_input, device=device)
            qf_text = "" if qf_pred is None else f"; predicted QF: {qf_pred}"
            if img_H is None:
                scores = (None, None, None, qf_pred)
                LOG.info("%s%s", name, qf_text)
            else:
                scores = (psnr(img_E, img_H), ssim(img_E, img_H), psnrb(img_E, img_H), qf_pred)
                LOG.info("%s - PSNR: %s dB; SSIM: %.4f; PSNRB: %s dB%s", name,
                         _fmt(scores[0], 2), scores[1], _fmt(scores[2], 2), qf_text)
            setting.scores.append(scores)
            if not args.no_save_images:
                imwrite(os.path.join(out_dir, stem + ".png"), img_E)
        columns = list(zip(*setting.scores))
        summary = {"testset": testset, "model": model.name, **setting.keys,
                   "n_images": len(setting.scores), "psnr": _mean(columns[0]),
                   "ssim": _mean(columns[1]), "psnrb": _mean(columns[2]),
                   "qf_pred_mean": _mean(columns[3]), "skipped": skipped}
        if summary["psnr"] is not None:
            LOG.info("Average PSNR/SSIM/PSNRB - %s -: %s|%.3f|%s", setting.name,
                     _fmt(summary["psnr"], 2), summary["ssim"], _fmt(summary["psnrb"], 2))
        elif summary["qf_pred_mean"] is not None:
            LOG.info("Average predicted QF - %s -: %.1f", setting.name, summary["qf_pred_mean"])
        summaries.append(summary)
    if skipped:
        LOG.warning("%d file(s) skipped: %s", len(skipped), ", ".join(skipped))
    if args.json:
        _write_json(args.json, summaries)
        LOG.info("summaries written to %s", args.json)
    return summaries


def main(preset, argv=None, prog=None):
    """Entry point of a test script: one clear line and exit status 2 on a user error."""
    args = build_parser(preset, prog).parse_args(argv)
    try:
        run(preset, args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
