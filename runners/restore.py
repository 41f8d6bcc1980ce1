"""The `main_restore.py` tool: restore your own images (the restore loop).

This module owns the command line and the loop that restores each input: routing a grayscale
image (a one-component JPEG; for other formats, three equal channels) to `--gray-model` and
any other to `--model` unless `--channels` forces one; the QF fed to the network (`--qf`: its
own estimate, the file's quantization tables, FBCNN-D's dominant QF, or a number); the
restoration made consistent with a JPEG's file (`--projection`, on by default:
models/consistency.py), `--batch N` same-size inputs together; turning the result by its EXIF
orientation and writing it atomically; reporting (a progress bar, one line per failed file, a
summary; exit 1 when a file failed, 2 for a usage error); sharding under torchrun or srun
(each process its share of the sorted inputs, rank 0 summarises). Files, models and the
output plan are runners/restore_io.py's; `--qf-estimate` is runners/qf_estimate.py.
"""
import argparse
import contextlib
import logging
import os
import sys
import time
from dataclasses import dataclass

from tqdm import tqdm

from data.dominant_qf import estimate_dominant_qf
from models.consistency import NOT_PROJECTED, file_coefficients, restore_consistent_batch
from models.engines import fastest_options
from models.inference import resolve_device
from models.model_zoo import MODEL_ZOO
from runners.cli import (DEVICE_HELP, add_speed_args, bounded_int, quality_factor, run_cli,
                         shard_device, speed_options)
from runners.qf_estimate import run_qf_estimate
from runners.restore_io import (DEFAULT_QUALITY, FILE_FAILURES, FORMATS, Job, ModelCache,
                                OptionError, collect_inputs, encode_image, failure,
                                log_passed_over, output_lock, plan_outputs, refusals,
                                warn_unused)
from utils.dist import all_gather_objects, join_shards, leave_shards
from utils.errors import UserError
from utils.fileio import atomic_write_bytes, display_path, remove_stale_temporaries
from utils.image_file import read_image
from utils.image_meta import ICC_FORMATS, apply_orientation, icc_colour_space
from utils.jpeg_header import header_qf
from utils.logger import rank_logging, setup_logging

__all__ = ["build_parser", "choose_qf", "run_restore", "main"]

LOG = logging.getLogger(f"fbcnn.{__name__}")

def _qf_mode(text):
    if text in ("auto", "header", "dominant"):
        return text
    try:
        return quality_factor(text)
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"{exc}: use auto, header, dominant or a quality "
                                         "factor") from None


def build_parser(prog=None):
    known = ", ".join(["jpeg", *MODEL_ZOO])
    p = argparse.ArgumentParser(
        prog=prog, description="Remove JPEG artifacts from your own images with FBCNN, or report "
        "their JPEG quality (--qf-estimate). Inputs are files, folders or glob patterns.")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders or globs")
    p.add_argument("-o", "--output", metavar="OUTDIR",
                   help="folder for the restored images (required unless --qf-estimate)")
    p.add_argument("-r", "--recursive", action="store_true",
                   help="descend into sub-folders of folder inputs; lets ** in globs match "
                        "any depth")
    p.add_argument("--model", default=None,
                   help=f"model for colour images: {known}, or a .pth/.safetensors file "
                        "(default: fbcnn_color when its weights are in model_zoo/, else the "
                        "bundled fbcnn_color_lite)")
    p.add_argument("--gray-model", default=None,
                   help="model for grayscale images, same choices (default: fbcnn_gray when "
                        "its weights are in model_zoo/, else the bundled fbcnn_gray_lite)")
    p.add_argument("--channels", choices=("auto", "color", "gray"), default="auto",
                   help="auto: grayscale files to --gray-model, others to --model; color: all "
                        "to --model; gray: all to --gray-model, colour inputs converted to "
                        "gray (default %(default)s)")
    p.add_argument("--qf", type=_qf_mode, default="auto", metavar="auto|header|dominant|N",
                   help="QF fed to the network: auto (its own estimate), header (from the "
                        "JPEG's quantization tables), dominant (FBCNN-D, for double JPEG), or a "
                        "number 1..100; lower removes more (default %(default)s)")
    p.add_argument("--projection", action=argparse.BooleanOptionalAction, default=True,
                   help="project each JPEG's restoration onto the quantization intervals of the "
                        "file's DCT coefficients, so it never strays from what the file says "
                        "(docs/restore.md); no effect on other formats (default: on)")
    p.add_argument("--format", choices=sorted(FORMATS), default="png",
                   help="output format (default %(default)s)")
    p.add_argument("--batch", type=bounded_int(1), default=1, metavar="N",
                   help="restore up to N inputs of the same size in one forward pass (many "
                        "small files, such as dataset crops; not with --tile or --x8; default "
                        "%(default)s)")
    p.add_argument("--bit-depth", type=int, choices=(8, 16), default=8,
                   help="bits per sample of png and tif outputs: 16 keeps the network's output "
                        "between 8-bit levels (default %(default)s)")
    p.add_argument("--quality", type=quality_factor, default=None,
                   help=f"quality of jpg and webp outputs (default {DEFAULT_QUALITY})")
    p.add_argument("--suffix", default="", help="added to each output's file name stem")
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing outputs (inputs are never overwritten)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help=DEVICE_HELP)
    p.add_argument("--qf-estimate", action="store_true",
                   help="do not restore: print each file's header, network and dominant QF")
    p.add_argument("--no-network", action="store_true",
                   help="with --qf-estimate: skip the network's QF (no model is loaded)")
    p.add_argument("--json", metavar="PATH", help="with --qf-estimate: also write the results "
                   "as a JSON list of {file, header_qf, network_qf, dominant_qf} (an existing "
                   "file only with --overwrite)")
    p.add_argument("-q", "--quiet", action="store_true", help="only errors and the summary")
    add_speed_args(p, engine_default="auto where openvino is installed (CPU), else torch; "
                      "with --channels-last")
    return p


def choose_qf(mode, decoded):
    """`(qf or None, how it was found)` for `--qf mode`; raises UserError when it cannot be."""
    if isinstance(mode, int):
        return mode, "given"
    if mode == "auto":
        return None, "network"
    if mode == "header":
        if decoded.jpeg_info is None:
            raise UserError("no JPEG quantization tables to read the QF from (not a JPEG "
                            "file); use --qf auto or --qf dominant")
        found = header_qf(decoded.jpeg_info)
        return found.qf, "header" if found.exact else "header, nearest to non-standard tables"
    estimate = estimate_dominant_qf(decoded.img)
    if estimate.qf is None:
        return None, "no JPEG trace found for --qf dominant"
    return estimate.qf, "dominant"


def _qf_used(model, decoded, qf, qf_source, qf_pred):
    """What the network was fed and why: `QF 10 (network estimate)`, `QF 85 (header)`, ..."""
    if model.net is None:  # the jpeg pseudo-model: no network ran, no QF was used
        return f"unchanged: --{'gray-' if decoded.gray else ''}model jpeg runs no network"
    if qf is None:
        why = "network estimate" if qf_source == "network" else f"network estimate: {qf_source}"
        return f"QF {qf_pred} ({why})"
    return f"QF {qf} ({qf_source}; network estimate {qf_pred})"


def run_restore(args):
    """Restore every input; returns the exit status (0 all done, 1 some file failed).

    Under torchrun (or srun) each process restores its share of the sorted list (items rank,
    rank + N, ...) on its own device, and rank 0 prints one summary for all and returns the
    run's status (the others return 0, so that the launcher names one cause)."""
    if not args.output:
        raise OptionError("-o OUTDIR is required (where the restored images go)")
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        raise OptionError(f"-o {args.output}: exists and is not a folder")
    device = resolve_device(args.device)
    options = fastest_options(speed_options(args), device)
    ext = FORMATS[args.format]
    if args.batch > 1 and (options.get("tile") or options.get("x8")):
        raise OptionError(f"--batch {args.batch}: not with --tile or --x8 (a batch is one "
                          "untiled forward pass)")
    if args.bit_depth == 16 and ext not in (".png", ".tif"):
        raise OptionError(f"--bit-depth 16: {args.format} holds 8 bits; use --format png or tif")
    warn_unused(args, [("--json", args.json, "without --qf-estimate"),
                        ("--no-network", args.no_network, "without --qf-estimate"),
                        ("--quality", args.quality is not None and ext not in (".jpg", ".webp"),
                         f"on {args.format} output (only jpg and webp)")])
    shard = join_shards()
    try:
        with rank_logging(shard.is_main):
            return _restore_all(args, shard, shard_device(shard, device), options, ext)
    finally:
        leave_shards()


def _restore_all(args, shard, device, options, ext):
    jobs, failures, passed = collect_inputs(args.inputs, args.recursive, exclude=args.output)
    if shard.is_main:
        log_passed_over(passed)
        for message in failures:
            LOG.error("error: %s", message)
    models = ModelCache({"color": args.model, "gray": args.gray_model}, device)
    work = plan_outputs(jobs, args, ext)
    mine = shard.take(zip(work, refusals(work)))
    done, skipped, failed = 0, 0, []
    said = {"lines": [], "icc": set()}  # each restored file's line; ICC profiles not carried
    start = time.perf_counter()
    # no input, no output folder: nothing is made where nothing will be written
    with output_lock(args.output, shard) if work else contextlib.nullcontext():
        if shard.is_main:  # what a killed run left half-written (never under its own name)
            for folder in sorted({os.path.dirname(dest) for _, dest in work}):
                remove_stale_temporaries(folder)
        all_gather_objects(None)  # the others start once the stale files are gone
        with tqdm(total=len(mine), desc="restoring", unit="img",
                  disable=None if shard.is_main else True) as bar:
            for first in range(0, len(mine), args.batch):
                chunk = mine[first:first + args.batch]
                for status in _restore_chunk(chunk, args, models, device, options, ext, said):
                    if status == "done":
                        done += 1
                    elif status == "skipped":
                        skipped += 1
                    else:
                        failed.append(status)
                bar.update(len(chunk))
        gathered = all_gather_objects({"done": done, "skipped": skipped, "failed": failed,
                                       "icc": sorted(said["icc"]), "lines": said["lines"],
                                       "models_failed": bool(models.failed)})
    elapsed = time.perf_counter() - start
    failed = failures + [line for part in gathered for line in part["failed"]]
    done, skipped = sum(p["done"] for p in gathered), sum(p["skipped"] for p in gathered)
    status = 2 if any(p["models_failed"] for p in gathered) else 1 if failed else 0
    if not shard.is_main:
        return 0
    for part in gathered[1:]:  # the other processes' files: every file's line is said here
        for line in part["lines"]:
            LOG.info("%s", line)
    for item in sorted({item for part in gathered for item in part["icc"]}):
        LOG.warning("warning: ICC profile not carried for %s", item)
    summary = f"{done} restored, {skipped} skipped, {len(failed)} failed in {elapsed:.1f} s"
    if options.get("x8"):
        summary += " (x8 self-ensemble)"
    if shard.distributed:
        summary += f" by {shard.world_size} processes"
    if done:
        summary += f" -> {args.output}"
    if shard.distributed and failed:  # each was said by its own process; here all together
        summary += "".join(f"\n  failed: {line}" for line in failed)
    tqdm.write(summary, file=sys.stderr if failed else sys.stdout)
    return status


@dataclass
class _Item:
    """One input on its way through `_restore_chunk`."""
    job: Job
    dest: str
    decoded: object
    qf: object
    qf_source: str
    model: object
    img_E: object = None
    qf_pred: object = None
    coefficients: object = None  # the file's, for the projection (None: not projected)
    consistency: str = ""  # what is said of it (models.consistency.PROJECTED, ...)
    problem: object = None  # why a JPEG's coefficients could not be used


def _groups(items, batch):
    """`items` (index -> _Item) in runs of at most `batch` that one forward pass can take: the
    same model, image size and kind of QF (fed or predicted)."""
    runs = {}
    for k, item in items.items():
        runs.setdefault((id(item.model), item.decoded.img.shape, item.qf is None), []).append(k)
    return [ks[i:i + batch] for ks in runs.values() for i in range(0, len(ks), batch)]


def _restore_chunk(chunk, args, models, device, options, ext, said):
    """Restore a chunk of `((job, output), refusal)` (one, or `--batch` of them): per input,
    "done", "skipped", or the failure's line. Inputs of the same size and model go through
    the network together, and so do their projections' twins (models/consistency.py)."""
    statuses, items = [None] * len(chunk), {}
    for k, ((job, dest), refused) in enumerate(chunk):
        try:
            if refused:
                raise UserError(refused)
            if os.path.exists(dest) and not args.overwrite:
                LOG.info("skipped %s: %s exists (--overwrite replaces it)",
                         display_path(job.path), dest)
                statuses[k] = "skipped"
                continue
            decoded = read_image(job.path, args.channels)
            qf, qf_source = choose_qf(args.qf, decoded)
            model = models.get("gray" if decoded.gray else "color")
            item = items[k] = _Item(job, dest, decoded, qf, qf_source, model)
            if model.net is not None:  # the file's coefficients, read once
                item.coefficients, item.consistency, item.problem = file_coefficients(
                    decoded.data, args.projection)
        except FILE_FAILURES as exc:
            statuses[k] = failure(job.path, exc)
    for keys in _groups(items, args.batch):
        group = [items[k] for k in keys]
        try:
            results = restore_consistent_batch(
                group[0].model, [item.decoded.img for item in group],
                [item.coefficients for item in group],
                None if group[0].qf is None else [item.qf for item in group], device=device,
                bit_depth=args.bit_depth, **options)
        except FILE_FAILURES as exc:  # a pass that fails fails its items
            for k in keys:
                statuses[k] = failure(items[k].job.path, exc)
            continue
        for item, (img_E, qf_pred) in zip(group, results):
            item.img_E, item.qf_pred = img_E, qf_pred
    for k, item in items.items():
        if statuses[k] is None:
            statuses[k] = _write(item, args, options, ext, said)
    return statuses


def _write(item, args, options, ext, said):
    """Make `item`'s restoration consistent with its file, turn it, write it; its status."""
    shown, decoded, img_E = display_path(item.job.path), item.decoded, item.img_E
    try:
        consistency = item.consistency
        if item.problem:
            LOG.warning("warning: %s: %s (%s); written as the network restored it",
                        shown, NOT_PROJECTED, item.problem)
        img_E = apply_orientation(img_E, decoded.orientation)
        icc = decoded.icc
        if icc is not None and (ext not in ICC_FORMATS or icc_colour_space(icc)
                                != ("GRAY" if img_E.ndim == 2 else "RGB")):
            said["icc"].add(f"{shown} ({ext} output)" if ext not in ICC_FORMATS
                            else f"{shown} ({icc_colour_space(icc)} profile, "
                                 f"{'gray' if img_E.ndim == 2 else 'colour'} output)")
            icc = None
        quality = DEFAULT_QUALITY if args.quality is None else args.quality
        atomic_write_bytes(item.dest, encode_image(img_E, ext, quality, icc), fsync=False,
                           replace=args.overwrite)
        line = "{} -> {} [{}]".format(shown, display_path(item.dest), ", ".join(
            ["gray" if decoded.gray else "colour", _qf_used(item.model, decoded, item.qf,
                                                            item.qf_source, item.qf_pred)]
            + ([consistency] if consistency else [])
            + (["x8"] if options.get("x8") and item.model.net is not None else [])))
        LOG.info("%s", line)
        said["lines"].append(line)
        return "done"
    except FileExistsError:
        LOG.info("skipped %s: %s appeared meanwhile (--overwrite replaces it)", shown,
                 display_path(item.dest))
        return "skipped"
    except FILE_FAILURES as exc:
        return failure(item.job.path, exc)


def main(argv=None, prog=None):
    """Entry point: exit status 0 (all done), 1 (some files failed) or 2 (usage error)."""
    args = build_parser(prog).parse_args(argv)
    # info to stdout, warnings and errors to stderr; the shared modules' notes (automatic
    # tiling, 16-bit inputs) as the test scripts show them
    undo_logging = setup_logging(level=logging.WARNING if args.quiet else logging.INFO,
                                 stream=sys.stdout, error_stream=sys.stderr)
    try:
        return run_cli(lambda: run_qf_estimate(args) if args.qf_estimate else run_restore(args))
    finally:
        undo_logging()
