"""The one test runner behind the four `main_test_fbcnn_*.py` scripts.

This module owns the paper's evaluation protocol end to end: which images are read and how,
how they are degraded (single JPEG, shifted double JPEG, or real JPEGs restored with QF
control), the per-image and average PSNR / SSIM / PSNR-B lines, the restored PNGs and log under
the results folder, and the `--json` summaries. The model is loaded once per run; the scripts
are presets (`Preset`) that fix the mode, the channel count and the defaults of the original.
Inputs are degraded ahead, and results scored and written behind the network, on worker threads
(runners/pipeline.py); the output is the same as a serial run's (`--workers 0`), in the same order.
Under torchrun (or srun) each process restores its share of the (setting, image) pairs; rank 0
gathers their scores and writes the log, the averages and the JSON as one process would.
"""
import argparse
import functools
import json
import logging
import math
import os
import sys
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from data.jpeg import double_jpeg_file, jpeg_file, shift_crop
from data.testsets import read_testset, resolve_testset
from models.consistency import file_coefficients, restore_consistent
from models.inference import resolve_device
from models.model_zoo import MODEL_ZOO, load_model
from runners.cli import (DEVICE_HELP, SPEED_FLAGS, add_speed_args, quality_factor, run_cli,
                         shard_device, speed_options)
from runners.pipeline import Pipeline, StageClock
from utils.dist import all_gather_objects, join_shards, leave_shards
from utils.errors import UserError
from utils.fileio import atomic_write_bytes, make_folder
from utils.image import imwrite, read_file_bytes
from utils.logger import setup_logging
from utils.metrics import mean_score, scores

__all__ = ["Preset", "COLOR", "GRAY", "GRAY_DOUBLE", "COLOR_REAL", "EvalSettings",
           "build_parser", "run", "main"]

LOG = logging.getLogger(f"fbcnn.{__name__}")
DEFAULT_WORKERS = min(4, os.cpu_count() or 1)


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


def build_parser(preset, prog=None):
    """The command line of a test script; defaults are the preset's (the original's)."""
    p = argparse.ArgumentParser(prog=prog, description=preset.description)
    p.add_argument("--testset", default=preset.testset,
                   help="test set name under --testsets-root, or a folder (default %(default)s)")
    p.add_argument("--testsets-root", default=None,
                   help="folder holding the named test sets (default: the repository's testsets/)")
    p.add_argument("--model", default=preset.model,
                   help=f"a zoo name ({', '.join(MODEL_ZOO)}), jpeg (the unrestored input), "
                        "or a .pth/.safetensors path (default %(default)s)")
    if preset.mode == "single":
        p.add_argument("--qf", type=quality_factor, nargs="+", default=list(preset.qf),
                       help="JPEG quality factors (default %(default)s)")
    elif preset.mode == "double":
        p.add_argument("--qf1", type=quality_factor, nargs="+", default=list(preset.qf1),
                       help="first JPEG quality factors (default %(default)s)")
        p.add_argument("--qf2", type=quality_factor, nargs="+", default=list(preset.qf2),
                       help="second JPEG quality factors (default %(default)s)")
        p.add_argument("--shift", type=int, default=preset.shift,
                       help="rows and columns cropped between the two JPEGs (default %(default)s)")
    else:
        p.add_argument("--qf-control", type=quality_factor, nargs="+",
                       default=list(preset.qf_control),
                       help="QFs fed to the network as qf_input after the blind pass "
                            "(default %(default)s)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help=DEVICE_HELP)
    speed = add_speed_args(p)
    speed.add_argument("--workers", type=int, default=DEFAULT_WORKERS,
                       help="threads that prepare JPEG inputs and write results while the network "
                            "runs; 0 runs every stage in turn (default %(default)s)")
    p.add_argument("--results", default="test_results",
                   help="folder for restored images and logs (default %(default)s)")
    p.add_argument("--no-save-images", action="store_true", help="do not write restored PNGs")
    p.add_argument("--json", default=None, help="write the per-setting summaries to this file")
    p.add_argument("--projection", action="store_true",
                   help="project each restoration onto its JPEG's quantization intervals, as "
                        "main_restore does by default (not the paper's protocol, so off here; "
                        "the settings are named ..._proj and the JSON says so)")
    return p


@dataclass(frozen=True)
class EvalSettings:
    """One run of the test runner, as a test script's command line describes it: benchmarks
    build it directly (`EvalSettings.of(preset, ...)`), the scripts from their flags."""
    model: str
    testset: str
    testsets_root: object = None
    qf: tuple = ()
    qf1: tuple = ()
    qf2: tuple = ()
    shift: int = 4
    qf_control: tuple = ()
    device: str = "auto"
    speed: dict = field(default_factory=dict)  # restore() keyword arguments (speed_options)
    workers: int = DEFAULT_WORKERS
    results: str = "test_results"
    save_images: bool = True
    json: object = None
    projection: bool = False
    console: bool = True  # the lines on stdout too (they always go to the log)

    @classmethod
    def of(cls, preset, **changes):
        """The preset's defaults (the original's), with `changes`."""
        defaults = dict(model=preset.model, testset=preset.testset, qf=preset.qf,
                        qf1=preset.qf1, qf2=preset.qf2, shift=preset.shift,
                        qf_control=preset.qf_control)
        return cls(**{**defaults, **changes})

    @classmethod
    def from_args(cls, preset, args):
        """The settings of a test script's parsed flags (`build_parser`)."""
        modes = {"single": ("qf",), "double": ("qf1", "qf2", "shift"), "real": ("qf_control",)}
        return cls.of(preset, model=args.model, testset=args.testset,
                      testsets_root=args.testsets_root, device=args.device,
                      speed=speed_options(args), workers=args.workers, results=args.results,
                      save_images=not args.no_save_images, json=args.json,
                      projection=args.projection,
                      **{k: getattr(args, k) for k in modes[preset.mode]})


@dataclass
class Setting:
    """One row of a results table: a degradation applied to every image of the test set."""
    name: str
    keys: dict
    degrade: object = None  # uint8 H -> (L, H aligned with L, the JPEG bytes L decodes)
    qf_input: object = None
    x8: bool = False  # restored with the self-ensemble (--x8): its name ends in _x8
    projection: bool = False  # projected onto the JPEG's intervals (--projection): ..._proj
    scores: list = field(default_factory=list)


def _check_channels(model, n_channels, model_arg):
    out_nc = getattr(model.net, "out_nc", model.in_nc)
    if model.in_nc is not None and out_nc != model.in_nc:
        raise UserError(f"--model {model_arg}: takes {model.in_nc} channels but returns "
                        f"{out_nc}; the test scripts score images against their input's channels")
    if model.in_nc is None or model.in_nc == n_channels:
        return
    kind = {1: "grayscale (1-channel)", 3: "colour (3-channel)"}
    script = "main_test_fbcnn_gray.py" if model.in_nc == 1 else "main_test_fbcnn_color.py"
    raise UserError(f"--model {model_arg}: a {kind.get(model.in_nc, model.in_nc)} model cannot "
                    f"run this script's {kind[n_channels]} images; use {script} or a "
                    f"{kind[n_channels]} model")


def _single_jpeg(img, qf):
    img_L, data = jpeg_file(img, qf)
    return img_L, img, data


def _double_jpeg(img, qf1, qf2, shift):
    img_L, data = double_jpeg_file(img, qf1, qf2, shift)
    return img_L, shift_crop(img, shift), data


def _settings(preset, cfg, prefix, x8, projection):
    """The rows of the cfg, each named once: `<prefix>_qf10`, ..., with `_x8` and `_proj`
    when restored with the self-ensemble or projected."""
    suffix = ("_x8" if x8 else "") + ("_proj" if projection else "")

    def setting(name, keys, **kwargs):
        return Setting(f"{prefix}_{name}{suffix}", keys, x8=x8, projection=projection, **kwargs)
    if preset.mode == "single":
        return [setting(f"qf{q}", {"qf": q}, degrade=functools.partial(_single_jpeg, qf=q))
                for q in cfg.qf]
    if preset.mode == "double":
        if cfg.shift < 0:
            raise UserError(f"--shift {cfg.shift}: must be 0 or more")
        return [setting(f"qf{q1}_{q2}_shift{cfg.shift}", {"qf1": q1, "qf2": q2, "shift": cfg.shift},
                        degrade=functools.partial(_double_jpeg, qf1=q1, qf2=q2, shift=cfg.shift))
                for q1 in cfg.qf1 for q2 in cfg.qf2]
    return [setting("blind", {"qf_control": None}),
            *[setting(f"qf{q}", {"qf_control": q}, qf_input=q) for q in cfg.qf_control]]


def _fmt(value, digits):
    if value is None:
        return "-"  # no image of the setting had this score (SSIM needs 11x11 pixels)
    return "inf" if value == float("inf") else f"{value:.{digits}f}"


def _write_json(path, summaries):
    """Strict JSON: an infinite average (a restoration equal to its ground truth) is null."""
    finite = [{k: None if isinstance(v, float) and not math.isfinite(v) else v
               for k, v in summary.items()} for summary in summaries]
    atomic_write_bytes(path, (json.dumps(finite, indent=2, allow_nan=False) + "\n").encode(),
                       fsync=False)


def _scores(img_E, img_H, clock, device):
    with clock("metrics"):
        # on a GPU the metrics run there too (the same values, utils/metrics.py), or the CPU
        # threads computing them would set the pace instead of the network
        return scores(img_E, img_H, device="cuda" if device == "cuda" else None)


def _write_png(path, img_E, clock):
    with clock("write"):
        imwrite(path, img_E)


def _describe(setting, n_images, restores):
    """What a setting does to its images, for the line that opens its block of the log."""
    keys = setting.keys
    if "qf" in keys:
        what = f"JPEG at QF {keys['qf']}"
    elif "qf1" in keys:
        what = (f"JPEG at QF {keys['qf1']}, shifted by {keys['shift']} pixels, JPEG at QF "
                f"{keys['qf2']}")
    elif not restores:
        what = "the files returned unchanged (--model jpeg runs no network" + (
            ")" if keys["qf_control"] is None else f", so QF {keys['qf_control']} is not used)")
    elif keys["qf_control"] is None:
        what = "blind: each file restored with the QF the network predicts for it"
    else:
        what = f"QF {keys['qf_control']} fed to the network (qf_input) for every file"
    if setting.x8:
        what += ", self-ensemble of 8 flips and rotations (--x8)"
    if setting.projection:
        what += ", projected onto the JPEG's quantization intervals (--projection)"
    return f"{setting.name}: {what}; {n_images} image(s)"


def _log_setting(setting, n_images, restores):
    LOG.info("== %s", _describe(setting, n_images, restores))


def _log_image(setting, name, qf_pred, scores, written):
    """Log one image's line and keep its scores (in order, on the finishing thread)."""
    qf_text = "" if qf_pred is None else f"; predicted QF: {qf_pred}"
    if scores is None:  # real JPEGs: no ground truth, so the QF fed is what tells settings apart
        scores = (None, None, None, qf_pred)
        if qf_pred is None:
            LOG.info("%s - unchanged (--model jpeg)", name)
        else:
            fed = "the predicted" if setting.qf_input is None else setting.qf_input
            LOG.info("%s - predicted QF: %s; QF fed: %s", name, qf_pred, fed)
    else:
        scores = (*scores.result(), qf_pred)
        LOG.info("%s - PSNR: %s dB; SSIM: %.4f; PSNRB: %s dB%s", name,
                 _fmt(scores[0], 2), scores[1], _fmt(scores[2], 2), qf_text)
    setting.scores.append(scores)
    if written is not None:
        written.result()  # a failed write stops the run here


def _summarize(setting, testset, model_name, skipped, summaries):
    """Average one setting's scores and log its line (on the finishing thread, after its images)."""
    columns = list(zip(*setting.scores))
    summary = {"testset": testset, "model": model_name, **setting.keys, "x8": setting.x8,
               "projection": setting.projection,
               "n_images": len(setting.scores), "psnr": mean_score(columns[0]),
               "ssim": mean_score(columns[1]), "psnrb": mean_score(columns[2]),
               "qf_pred_mean": mean_score(columns[3]), "skipped": skipped}
    if summary["psnr"] is not None:
        LOG.info("Average PSNR/SSIM/PSNRB - %s -: %s|%s|%s", setting.name,
                 _fmt(summary["psnr"], 2), _fmt(summary["ssim"], 3), _fmt(summary["psnrb"], 2))
    elif summary["qf_pred_mean"] is not None:
        fed = "the predicted" if setting.qf_input is None else setting.qf_input
        LOG.info("Average predicted QF - %s -: %.1f (QF fed: %s)", setting.name,
                 summary["qf_pred_mean"], fed)
    elif "qf_control" in setting.keys:
        LOG.info("%s -: %d image(s) returned unchanged (--model jpeg)", setting.name,
                 summary["n_images"])
    summaries.append(summary)


def run(preset, settings, clock=None):
    """Evaluate one model on one test set for every setting of `settings` (an EvalSettings);
    returns the summaries.

    `clock`, a StageClock, receives the seconds spent loading the model, reading images,
    making JPEGs, in the network, on metrics and on writes (for benchmarks).
    """
    clock = clock if clock is not None else StageClock()
    testset_dir = resolve_testset(settings.testset, settings.testsets_root)
    testset = os.path.basename(os.path.normpath(testset_dir))
    shard = join_shards()
    device = shard_device(shard, resolve_device(settings.device))
    speed = {**settings.speed, "device": device}
    if settings.workers < 0:
        raise UserError(f"--workers {settings.workers}: must be 0 (serial) or more")
    if not settings.results.strip():
        raise UserError("--results '': give a folder for the restored images and the log")
    if settings.json:  # before the work, not after it
        if os.path.isdir(settings.json):
            raise UserError(f"--json {settings.json}: is a folder; give a file name")
        make_folder(os.path.dirname(settings.json) or ".")
    with clock("load_model"):
        model = load_model(settings.model, device=device)
    _check_channels(model, preset.n_channels, settings.model)
    prefix = f"{testset}_{model.name}"
    # the run's lines, and the shared modules' notes (automatic tiling, 16-bit inputs), go to
    # stdout and to the appended log of this test set and model
    # (rank 0's alone in a sharded run: the others say only their errors)
    undo_logging = (setup_logging(os.path.join(settings.results, f"{prefix}.log"),
                                  file_format="%(asctime)s %(levelname)s %(message)s",
                                  stream=sys.stdout, console=settings.console) if shard.is_main
                    else setup_logging(level=logging.ERROR))
    try:
        return _evaluate(preset, settings, clock, model, speed, testset, testset_dir, prefix, shard)
    finally:
        undo_logging()
        leave_shards()


def _coefficients(data, name):
    """The JPEG's coefficients for --projection, or None (with a warning) where it has none."""
    coefficients, _, problem = file_coefficients(data)
    if problem:
        LOG.warning("%s: not projected (%s)", name, problem)
    return coefficients


def _output_names(names):
    """Restored PNG name per image: the stem + .png, or the whole name + .png for images whose
    stems collide (`a.png` and `a.bmp`, `x.PNG` and `x.png`), so no result replaces another."""
    stems = [os.path.splitext(name)[0] + ".png" for name in names]
    shared = {stem for stem in stems if stems.count(stem) > 1}
    if shared:
        LOG.warning("images sharing a name keep their extension in the output name: %s",
                    ", ".join(n for n, stem in zip(names, stems) if stem in shared))
    return {name: name + ".png" if stem in shared else stem for name, stem in zip(names, stems)}


class _Done:
    """A finished result, as a future gives it (a sharded run's gathered scores)."""

    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


def _evaluate(preset, cfg, clock, model, speed, testset, testset_dir, prefix, shard):
    device = speed["device"]
    LOG.info("model %s on %s (%s), device %s, %s", cfg.model, testset, testset_dir, device,
             ", ".join([speed.get("precision", "fp32")]
                       + [SPEED_FLAGS[k] if v is True else f"{SPEED_FLAGS[k]} {v}"
                          for k, v in speed.items() if k not in ("precision", "device")]))
    # x8 and the projection get rows, folders and log lines of their own names
    settings = _settings(preset, cfg, prefix, bool(speed.get("x8")),
                         cfg.projection and model.net is not None)
    if device == "cuda":
        torch.backends.cudnn.benchmark = True  # conv algorithms tuned once per input shape

    summaries = []
    with Pipeline(cfg.workers) as pipe:
        with clock("read"):
            images, skipped = read_testset(testset_dir, preset.n_channels, pipe.map_prepared)
        if preset.mode == "double":  # the crop between the two JPEGs must leave a pixel
            small = [name for name, img in images if min(img.shape[:2]) <= cfg.shift]
            for name in small:
                LOG.warning("skipped %s: smaller than %dx%d, nothing is left after --shift %d",
                            name, cfg.shift + 1, cfg.shift + 1, cfg.shift)
            images = [(name, img) for name, img in images if name not in small]
            skipped += small
            if not images:
                raise UserError(f"--testset {testset_dir}: no image larger than --shift "
                                f"{cfg.shift}")
        out_names = _output_names([name for name, _ in images])

        file_coefficients = {}  # real JPEGs: each file's, read once for all its settings

        def degrade(job):
            setting, name, img_H = job
            if setting.degrade is None:  # real JPEGs: restore the file as it is
                if not setting.projection:
                    return img_H, None, None
                if name not in file_coefficients:
                    with clock("projection"):
                        file_coefficients[name] = _coefficients(
                            read_file_bytes(os.path.join(testset_dir, name)), name)
                return img_H, None, file_coefficients[name]
            with clock("jpeg"):
                img_L, img_H, data = setting.degrade(img_H)
            if not setting.projection:
                return img_L, img_H, None
            with clock("projection"):
                return img_L, img_H, _coefficients(data, name)

        jobs = [(setting, name, img) for setting in settings for name, img in images]
        mine = shard.take(range(len(jobs)))  # every job when not sharded
        collected = []  # sharded: (job, predicted QF, scores, write) of this process's jobs
        # one bar over every (setting, image) pair, with the time left for the whole run
        with tqdm(total=len(mine), unit="img", dynamic_ncols=True,
                  disable=None if shard.is_main else True) as bar:
            for i, (img_L, img_H, coefficients) in zip(
                    mine, pipe.map_prepared(degrade, [jobs[i] for i in mine])):
                setting, name, _ = jobs[i]
                index = i % len(images)
                out_dir = (None if not cfg.save_images
                           else os.path.join(cfg.results, setting.name))
                if out_dir is not None and (index == 0 or shard.distributed):
                    make_folder(out_dir)
                if index == 0 or shard.distributed:
                    bar.set_description(setting.name, refresh=False)
                if index == 0 and not shard.distributed:
                    pipe.finish(_log_setting, setting, len(images), model.net is not None)
                with clock("network"):  # and the projection's twin, when there is one
                    img_E, qf_pred = restore_consistent(model, img_L, coefficients,
                                                        qf=setting.qf_input, **speed)
                scores = (None if img_H is None
                          else pipe.submit(_scores, img_E, img_H, clock, device))
                written = None if out_dir is None else pipe.submit(
                    _write_png, os.path.join(out_dir, out_names[name]), img_E, clock)
                bar.update()
                if shard.distributed:
                    collected.append((i, qf_pred, scores, written))
                    continue
                pipe.finish(_log_image, setting, name, qf_pred, scores, written)
                if index == len(images) - 1:
                    pipe.finish(_summarize, setting, testset, model.name, skipped, summaries)
        if shard.distributed:
            done = [(i, qf_pred, None if scores is None else scores.result(),
                     None if written is None else written.result())
                    for i, qf_pred, scores, written in collected]
            gathered = sorted(job for part in all_gather_objects(done) for job in part)
            if not shard.is_main:
                return []
            for i, qf_pred, scores, _ in gathered:  # in order, as one process logs them
                setting, name, _ = jobs[i]
                index = i % len(images)
                if index == 0:
                    _log_setting(setting, len(images), model.net is not None)
                _log_image(setting, name, qf_pred, None if scores is None else _Done(scores),
                           None)
                if index == len(images) - 1:
                    _summarize(setting, testset, model.name, skipped, summaries)
    if skipped:
        LOG.warning("%d file(s) skipped: %s", len(skipped), ", ".join(skipped))
    if cfg.json:
        _write_json(cfg.json, summaries)
        LOG.info("summaries written to %s", cfg.json)
    return summaries


def main(preset, argv=None, prog=None):
    """Entry point of a test script: one clear line and exit status 2 on a user error."""
    args = build_parser(preset, prog).parse_args(argv)
    return run_cli(lambda: run(preset, EvalSettings.from_args(preset, args)))
