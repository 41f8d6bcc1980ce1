"""The `main_restore.py` tool: restore your own images, or report their JPEG quality.

This module owns the command line that turns inputs (files, folders, globs) into restored
images on disk, with every model loaded at most once:
- routing: a grayscale image (a one-component JPEG; for other formats, three equal channels)
  goes to `--gray-model`, any other to `--model`, unless `--channels` forces one;
- the QF fed to the network (`--qf`): the network's own estimate (auto), the file's
  quantization tables (header, utils/jpeg_header.py), FBCNN-D's dominant QF (dominant,
  data/dominant_qf.py) or a fixed number;
- consistency with the file (`--projection`, on by default): a JPEG's restoration is projected
  onto the quantization intervals its DCT coefficients were stored with
  (data/jpeg_projection.py), so it stays an image the file could have come from; other formats
  carry no such trace and are restored blind, which the per-file line says;
- files: outputs in `-o OUTDIR` (folder inputs keep their sub-folders), PNG by default, written
  atomically and only when the file was restored in full; an input is never overwritten and an
  existing output only with `--overwrite`; files found in folders that are outputs of other
  inputs (an earlier run's results) are not inputs; JPEGs are restored on their stored 8x8
  grid and then turned by their EXIF orientation; ICC profiles are carried into PNG and JPEG
  outputs; `--bit-depth 16` writes png and tif outputs at 16 bits per sample;
- reporting: a progress bar, one line per failed file naming it, a summary, exit status 1 when
  any file failed (the others are still processed), 2 for a usage error;
- `--qf-estimate`: per file the header QF, the network's QF and the dominant QF, as a table
  and optionally as JSON; a model that cannot be had (offline, say) leaves the network column
  empty with one warning, and the other two columns are still reported;
- many files: under torchrun or srun each process restores its share of the sorted inputs
  (`utils.dist.join_shards`), rank 0 summarises; `--batch N` sends same-size inputs through
  the network together; the output folder is locked while a run writes it.
The network step itself is models/inference.py's `restore`.
"""
import argparse
import contextlib
import glob
import json
import logging
import os
import sys
import time
from dataclasses import dataclass

import cv2
import numpy as np
from tqdm import tqdm

from data.dominant_qf import estimate_dominant_qf
from data.jpeg_projection import (ProjectionUnavailable, make_twin, project, read_coefficients,
                                  twin_shares)
from models.engines import fastest_options
from models.inference import plan_tile, predict_qf, resolve_device, restore, restore_batch
from models.model_zoo import MODEL_ZOO, default_model, load_model
from runners.cli import (DEVICE_HELP, add_speed_args, bounded_int, quality_factor, run_cli,
                         shard_device, speed_options)
from utils.errors import UserError
from utils.dist import all_gather_objects, join_shards, leave_shards
from utils.fileio import atomic_write_bytes, display_path, folder_lock, remove_stale_temporaries
from utils.image import IMG_EXTENSIONS, ImageReadError, decode_uint8, imencode, read_file_bytes
from utils.image_meta import (ICC_FORMATS, apply_orientation, embed_icc, icc_colour_space,
                              read_icc_profile, read_orientation)
from utils.jpeg_header import JpegHeaderError, header_qf, is_jpeg, parse_jpeg
from utils.logger import setup_logging

__all__ = ["FORMATS", "build_parser", "collect_inputs", "plan_outputs", "ModelCache",
           "ModelUnavailable", "read_image", "choose_qf", "make_consistent", "encode_image",
           "refusals", "run_restore",
           "run_qf_estimate", "main"]

LOG = logging.getLogger(f"fbcnn.{__name__}")
FORMATS = {"png": ".png", "jpg": ".jpg", "jpeg": ".jpg", "webp": ".webp", "tif": ".tif",
           "tiff": ".tif", "bmp": ".bmp"}
GLOB_CHARS = "*?["
DEFAULT_QUALITY = 95  # of jpg and webp outputs
# what the per-file line says of the projection (make_consistent)
PROJECTED = "projected onto the file's DCT"
NOT_PROJECTED = "not projected onto the file's DCT"
NOT_A_JPEG = "not a JPEG file: no JPEG trace read"
LOCK_NAME = ".main_restore.lock"  # in -o OUTDIR while a run writes there
# the speed options a batch takes
BATCH_OPTIONS = ("precision", "channels_last", "compile", "engine")


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
    add_speed_args(p, engine_default="openvino where it is installed (CPU), else torch with "
                      "--channels-last")
    return p


class OptionError(UserError):
    """A problem with the options or a model that stops the whole run (exit 2)."""


@dataclass(frozen=True)
class Job:
    """One input file and where its result goes (`subdir` is relative to OUTDIR)."""
    path: str
    subdir: str = ""
    named: bool = True  # given by name, not found in a folder or by a glob


def _is_image_name(name):
    return name.lower().endswith(IMG_EXTENSIONS) and not name.startswith(".")


def _strictly_inside(path, folder):
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path != folder and path.startswith(folder.rstrip(os.sep) + os.sep)


def _top_level(folder, onerror):
    """os.walk's first step alone, with the same `onerror` contract."""
    try:
        return [(folder, [], os.listdir(folder))]
    except OSError as exc:
        onerror(exc)
        return []


def collect_inputs(inputs, recursive=False, exclude=None):
    """Expand INPUT arguments to Jobs (sorted per argument, duplicates dropped), errors, and
    what folder inputs held that is not taken: `{"files": n, "folders": m}` (files without an
    image extension; sub-folders, when not recursive).

    Files named explicitly are taken whatever their extension; folders and globs contribute
    files with an image extension. A recursive walk does not enter `exclude` (the output
    folder) when it lies inside the walked folder.
    """
    jobs, errors, seen = [], [], set()
    passed = {"files": 0, "folders": 0}

    def add(path, subdir="", named=False):
        key = os.path.realpath(path)
        if key not in seen:
            seen.add(key)
            jobs.append(Job(path, subdir, named))

    for arg in inputs:
        if os.path.isfile(arg):
            add(arg, named=True)
        elif os.path.isdir(arg):
            found, unlisted = 0, []

            def unreadable(exc, unlisted=unlisted):  # a folder that cannot be listed
                unlisted.append(f"{exc.filename}: cannot list this folder ({exc.strerror})")

            walker = (os.walk(arg, onerror=unreadable) if recursive else
                      _top_level(arg, unreadable))
            for folder, dirs, names in walker:
                dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not (
                    exclude and _strictly_inside(exclude, arg)
                    and os.path.realpath(os.path.join(folder, d)) == os.path.realpath(exclude)))
                rel = os.path.relpath(folder, arg)
                for name in sorted(names):
                    path = os.path.join(folder, name)
                    if _is_image_name(name) and os.path.isfile(path):
                        add(path, "" if rel == "." else rel)
                        found += 1
                    elif name.startswith(".") or (exclude and os.path.realpath(path)
                                                  == os.path.realpath(exclude)):
                        continue
                    elif os.path.isdir(path):
                        passed["folders"] += not recursive
                    else:
                        passed["files"] += 1
            errors.extend(unlisted)
            if not found and not unlisted:
                errors.append(f"{arg}: no image files in this folder"
                              + ("" if recursive else " (use --recursive for sub-folders)"))
        elif any(c in arg for c in GLOB_CHARS):
            matches = [m for m in sorted(glob.glob(arg, recursive=recursive))
                       if os.path.isfile(m) and _is_image_name(os.path.basename(m))]
            if not matches:
                errors.append(f"{arg}: no image files match this pattern")
            for m in matches:
                add(m)
        else:
            errors.append(f"{arg}: no such file or folder")
    return jobs, errors, passed


def _log_passed_over(passed):
    """One line for what the folder inputs held that is not restored, when there is any."""
    parts = []
    if passed["files"]:
        parts.append(f"{passed['files']} file(s) without an image extension")
    if passed["folders"]:
        parts.append(f"{passed['folders']} sub-folder(s) (--recursive descends into them)")
    if parts:
        LOG.info("passed over in the input folders: %s", "; ".join(parts))


class ModelUnavailable(UserError):
    """`--model` or `--gray-model` cannot be used: the files that need it fail, the others go
    on, and the run exits with status 2."""


class ModelCache:
    """Loads `--model` and `--gray-model` on first use, each once (a failure once, too)."""

    ROLES = {"color": ("--model", 3, "a colour (3-channel) model such as fbcnn_color"),
             "gray": ("--gray-model", 1, "a grayscale (1-channel) model such as fbcnn_gray")}
    # without --model / --gray-model: the released weights when at hand, else the bundled lite
    DEFAULTS = {"color": ("fbcnn_color", "fbcnn_color_lite"),
                "gray": ("fbcnn_gray", "fbcnn_gray_lite")}

    def __init__(self, names, device):
        self.names, self.device, self.loaded, self.failed = names, device, {}, {}

    def get(self, role):
        option, n_channels, wanted = self.ROLES[role]
        if self.names[role] is None:
            self.names[role] = default_model(*self.DEFAULTS[role])
        if role in self.failed:
            raise ModelUnavailable(f"{option} {self.names[role]} cannot be used (see the first "
                                   f"error)")
        if role not in self.loaded:
            try:
                model = load_model(self.names[role], device=self.device, option=option)
                if model.in_nc not in (None, n_channels):
                    raise UserError(f"{option} {self.names[role]}: a {model.in_nc}-channel "
                                    f"model; {option} needs {wanted}")
            except UserError as exc:
                self.failed[role] = str(exc)
                raise ModelUnavailable(str(exc)) from None
            LOG.info("loaded %s %s on %s", option, self.names[role], self.device)
            self.loaded[role] = model
        return self.loaded[role]


@dataclass
class Decoded:
    """An input as the network sees it: pixels in stored orientation, RGB or gray."""
    img: np.ndarray
    gray: bool
    orientation: int  # EXIF orientation still to apply to the result (1 = none)
    icc: object  # bytes or None
    jpeg_info: object  # utils.jpeg_header.JpegInfo, or None for other formats
    data: bytes = b""  # the file's bytes (the projection reads a JPEG's coefficients from them)


def read_image(path, channels="auto"):
    """Read one input file; raises ImageReadError, naming the file, when it cannot be used.

    Decoding goes through utils/image.py's `decode_uint8`, which refuses empty, truncated and
    oversized files (decompression bombs) before OpenCV sees them and rounds 16-bit pixels.
    """
    data = read_file_bytes(path)
    info = None
    if is_jpeg(data):
        try:
            info = parse_jpeg(data)
        except JpegHeaderError:
            info = None  # let the decoder judge; only --qf header needs the tables
    flags = cv2.IMREAD_COLOR
    orientation = 1
    if info is not None:
        # decode as stored so the network sees the file's own 8x8 grid; turn the result after
        flags |= cv2.IMREAD_IGNORE_ORIENTATION
        orientation = read_orientation(data)
    gray = channels == "gray" or (channels == "auto" and info is not None
                                  and info.n_components == 1)
    if gray and info is not None:
        flags = (flags & ~cv2.IMREAD_COLOR) | cv2.IMREAD_GRAYSCALE
    img = decode_uint8(data, flags, path)
    if img.ndim == 3:
        if (channels == "auto" and info is None and np.array_equal(img[..., 0], img[..., 1])
                and np.array_equal(img[..., 1], img[..., 2])):
            gray = True
        if gray:
            img = img[..., 0] if channels == "auto" else cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
        else:
            img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    return Decoded(np.ascontiguousarray(img), gray, orientation, read_icc_profile(data), info,
                   data)


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


def encode_image(img, ext, quality=95, icc=None):
    """Encoded bytes of a uint8 (or, for png and tif, uint16) RGB or gray image; `icc` embedded
    where the format allows."""
    params = {".jpg": [int(cv2.IMWRITE_JPEG_QUALITY), quality],
              ".webp": [int(cv2.IMWRITE_WEBP_QUALITY), quality]}.get(ext, [])
    data = imencode(img, ext, params)
    return embed_icc(data, ext, icc) if icc is not None else data


def _qf_used(model, decoded, qf, qf_source, qf_pred):
    """What the network was fed and why: `QF 10 (network estimate)`, `QF 85 (header)`, ..."""
    if model.net is None:  # the jpeg pseudo-model: no network ran, no QF was used
        return f"unchanged: --{'gray-' if decoded.gray else ''}model jpeg runs no network"
    if qf is None:
        why = "network estimate" if qf_source == "network" else f"network estimate: {qf_source}"
        return f"QF {qf_pred} ({why})"
    return f"QF {qf} ({qf_source}; network estimate {qf_pred})"


def make_consistent(img_E, decoded, wanted, again=None, shares=None, coefficients=None):
    """`(image, note, problem)`: a JPEG's restoration projected onto the quantization intervals
    of its file's DCT coefficients when `wanted` (data/jpeg_projection.py, "calibrated": `again`
    is the restore function that made `img_E`, run once more on a twin, or `shares` what the
    twin taught when it was restored with others; `coefficients` the file's when already
    read), a few words saying what was done (empty when the projection was not wanted), and
    why a JPEG could not be projected (CMYK, 12-bit, arithmetic coding, ...: the restoration
    is then kept as it is), else None."""
    if decoded.jpeg_info is None:
        return img_E, NOT_A_JPEG, None
    if not wanted:
        return img_E, "", None
    try:
        if coefficients is None:
            coefficients = read_coefficients(decoded.data)
        return project(img_E, coefficients, "calibrated", again, shares), PROJECTED, None
    except ProjectionUnavailable as exc:
        return img_E, NOT_PROJECTED, str(exc)


def _failure(path, exc):
    """Log and return the one line that reports a failed file."""
    detail = " ".join(str(exc).split())[:600] or type(exc).__name__
    line = detail if isinstance(exc, ImageReadError) else f"{display_path(path)}: {detail}"
    LOG.error("error: %s", line)
    return line


def _output_path(args, job, ext):
    stem = os.path.splitext(os.path.basename(job.path))[0] + args.suffix
    return os.path.join(args.output, job.subdir, stem + ext)


def plan_outputs(jobs, args, ext):
    """`(job, output path)` pairs. A file found in a folder or by a glob that is itself the
    output of another input (an earlier run's result) is not restored again; one that would be
    its own output stays, and is refused (never overwritten) when its turn comes."""
    planned = [(job, _output_path(args, job, ext)) for job in jobs]
    made_by = {}
    for job, dest in planned:
        made_by.setdefault(os.path.realpath(dest), []).append(job)
    return [(job, dest) for job, dest in planned
            if job.named or all(other is job for other in made_by.get(os.path.realpath(job.path),
                                                                      ()))]


def refusals(work):
    """Per `(job, output)` pair, None or why it is not restored, decided over the whole list so
    that the processes of a sharded run agree: an output that is an input file is never
    written, and an output two inputs share goes to the first of them."""
    inputs = {os.path.realpath(job.path) for job, _ in work}
    first, reasons = {}, []
    for job, dest in work:
        key = os.path.realpath(dest)
        if key in inputs:
            reasons.append(f"its output {dest} is an input file, which is never overwritten; "
                           "choose another -o or a --suffix")
        elif key in first:
            reasons.append(f"its output {dest} is also the output of {first[key]}; use --suffix "
                           "or separate runs")
        else:
            first[key] = display_path(job.path)
            reasons.append(None)
    return reasons


@contextlib.contextmanager
def _output_lock(folder, shard):
    """Hold -o OUTDIR's lock for the run (rank 0 holds it for every process of a sharded run):
    another run writing there meanwhile is refused, naming the holder."""
    with contextlib.ExitStack() as stack:
        error = None
        if shard.is_main:
            try:
                stack.enter_context(folder_lock(folder, LOCK_NAME, "another main_restore run is "
                                                "writing this folder", "wait for it to end, or "
                                                "choose another -o", remove=True))
            except UserError as exc:
                error = str(exc)
        error = all_gather_objects(error)[0]  # every process learns rank 0's answer
        if error:
            raise UserError(error)
        yield


@contextlib.contextmanager
def _rank_logging(shard):
    """Processes other than rank 0 of a sharded run say only warnings and errors (their own
    files' failures); rank 0 says its files' lines and the summary for all."""
    root = logging.getLogger("fbcnn")
    saved = root.level
    if not shard.is_main:
        root.setLevel(max(saved, logging.WARNING))
    try:
        yield
    finally:
        root.setLevel(saved)


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
    _warn_unused(args, [("--json", args.json, "without --qf-estimate"),
                        ("--no-network", args.no_network, "without --qf-estimate"),
                        ("--quality", args.quality is not None and ext not in (".jpg", ".webp"),
                         f"on {args.format} output (only jpg and webp)")])
    shard = join_shards()
    try:
        with _rank_logging(shard):
            return _restore_all(args, shard, shard_device(shard, device), options, ext)
    finally:
        leave_shards()


def _restore_all(args, shard, device, options, ext):
    jobs, failures, passed = collect_inputs(args.inputs, args.recursive, exclude=args.output)
    if shard.is_main:
        _log_passed_over(passed)
        for message in failures:
            LOG.error("error: %s", message)
    models = ModelCache({"color": args.model, "gray": args.gray_model}, device)
    work = plan_outputs(jobs, args, ext)
    mine = shard.take(zip(work, refusals(work)))
    done, skipped, failed, icc_dropped = 0, 0, [], set()
    start = time.perf_counter()
    with _output_lock(args.output, shard):
        if shard.is_main:  # what a killed run left half-written (never under its own name)
            for folder in sorted({os.path.dirname(dest) for _, dest in work}):
                remove_stale_temporaries(folder)
        all_gather_objects(None)  # the others start once the stale files are gone
        with tqdm(total=len(mine), desc="restoring", unit="img",
                  disable=None if shard.is_main else True) as bar:
            for first in range(0, len(mine), args.batch):
                chunk = mine[first:first + args.batch]
                for status in _restore_chunk(chunk, args, models, device, options, ext,
                                             icc_dropped):
                    if status == "done":
                        done += 1
                    elif status == "skipped":
                        skipped += 1
                    else:
                        failed.append(status)
                bar.update(len(chunk))
        gathered = all_gather_objects({"done": done, "skipped": skipped, "failed": failed,
                                       "icc": sorted(icc_dropped),
                                       "models_failed": bool(models.failed)})
    elapsed = time.perf_counter() - start
    failed = failures + [line for part in gathered for line in part["failed"]]
    done, skipped = sum(p["done"] for p in gathered), sum(p["skipped"] for p in gathered)
    status = 2 if any(p["models_failed"] for p in gathered) else 1 if failed else 0
    if not shard.is_main:
        return 0
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
    coefficients: object = None  # the file's, read once for the twin and the projection
    twin: object = None
    shares: object = None


def _groups(items, batch):
    """`items` (index -> _Item) in runs of at most `batch` that one forward pass can take: the
    same model, image size and kind of QF (fed or predicted)."""
    runs = {}
    for k, item in items.items():
        runs.setdefault((id(item.model), item.decoded.img.shape, item.qf is None), []).append(k)
    return [ks[i:i + batch] for ks in runs.values() for i in range(0, len(ks), batch)]


def _network(items, keys, images, args, device, options):
    """Restore `images` (one per key, each with its item's model and QF): together when there
    are several (`restore_batch`, untiled), else with every speed option (`restore`)."""
    first = items[keys[0]]
    qfs = None if first.qf is None else [items[k].qf for k in keys]
    if len(keys) > 1 and plan_tile(images[0].shape, device, net=first.model.net)[0] is None:
        return restore_batch(first.model, images, qfs, device=device, bit_depth=args.bit_depth,
                             **{k: v for k, v in options.items() if k in BATCH_OPTIONS})
    return [restore(items[k].model, img, qf=items[k].qf, device=device,
                    bit_depth=args.bit_depth, **options) for k, img in zip(keys, images)]


def _restore_chunk(chunk, args, models, device, options, ext, icc_dropped):
    """Restore a chunk of `((job, output), refusal)` (one, or `--batch` of them): per input,
    "done", "skipped", or the failure's line. Inputs of the same size and model go through
    the network together, and so do their projections' twins."""
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
            items[k] = _Item(job, dest, decoded, qf, qf_source, model)
        except (UserError, OSError, ValueError, cv2.error, RuntimeError, MemoryError) as exc:
            statuses[k] = _failure(job.path, exc)

    def through_network(pending, image_of):
        """{index: (restored, predicted QF)} for `pending`'s items, in forward passes of their
        groups; a pass that fails fails its items."""
        results = {}
        for keys in _groups(pending, args.batch):
            try:
                results.update(zip(keys, _network(pending, keys, [image_of(pending[k])
                                                                  for k in keys],
                                                  args, device, options)))
            except (UserError, OSError, ValueError, RuntimeError, MemoryError) as exc:
                for k in keys:
                    statuses[k] = _failure(pending[k].job.path, exc)
        return results

    for k, (img_E, qf_pred) in through_network(items, lambda item: item.decoded.img).items():
        items[k].img_E, items[k].qf_pred = img_E, qf_pred
    items = {k: item for k, item in items.items() if statuses[k] is None}
    if args.projection:  # each JPEG's twin, restored as the JPEG was (the calibration)
        for item in items.values():
            if item.model.net is not None and item.decoded.jpeg_info is not None:
                with contextlib.suppress(ProjectionUnavailable):  # said when writing
                    coefficients = read_coefficients(item.decoded.data)
                    item.twin = make_twin(item.img_E, coefficients)
                    item.coefficients = coefficients
        twinned = {k: item for k, item in items.items() if item.twin is not None}
        for k, (restored, _) in through_network(twinned, lambda item: item.twin.image).items():
            items[k].shares = twin_shares(items[k].twin, restored)
    for k, item in items.items():
        if statuses[k] is None:
            statuses[k] = _write(item, args, options, ext, icc_dropped)
    return statuses


def _write(item, args, options, ext, icc_dropped):
    """Make `item`'s restoration consistent with its file, turn it, write it; its status."""
    shown, decoded, img_E = display_path(item.job.path), item.decoded, item.img_E
    try:
        consistency = ""
        if item.model.net is not None:
            img_E, consistency, problem = make_consistent(img_E, decoded, args.projection,
                                                          shares=item.shares,
                                                          coefficients=item.coefficients)
            if problem:
                LOG.warning("warning: %s: %s (%s); written as the network restored it",
                            shown, NOT_PROJECTED, problem)
        img_E = apply_orientation(img_E, decoded.orientation)
        icc = decoded.icc
        if icc is not None and (ext not in ICC_FORMATS or icc_colour_space(icc)
                                != ("GRAY" if img_E.ndim == 2 else "RGB")):
            icc_dropped.add(f"{shown} ({ext} output)" if ext not in ICC_FORMATS
                            else f"{shown} ({icc_colour_space(icc)} profile, "
                                 f"{'gray' if img_E.ndim == 2 else 'colour'} output)")
            icc = None
        quality = DEFAULT_QUALITY if args.quality is None else args.quality
        atomic_write_bytes(item.dest, encode_image(img_E, ext, quality, icc), fsync=False,
                           replace=args.overwrite)
        LOG.info("%s -> %s [%s]", shown, display_path(item.dest), ", ".join(
            ["gray" if decoded.gray else "colour", _qf_used(item.model, decoded, item.qf,
                                                            item.qf_source, item.qf_pred)]
            + ([consistency] if consistency else [])
            + (["x8"] if options.get("x8") and item.model.net is not None else [])))
        return "done"
    except FileExistsError:
        LOG.info("skipped %s: %s appeared meanwhile (--overwrite replaces it)", shown,
                 display_path(item.dest))
        return "skipped"
    except (UserError, OSError, ValueError, cv2.error, RuntimeError, MemoryError) as exc:
        return _failure(item.job.path, exc)


def _warn_unused(args, checks):
    """One warning per option given where it does nothing (`(flag, given, where)` triples)."""
    for flag, given, where in checks:
        if given:
            LOG.warning("warning: %s has no effect %s", flag, where)


def _check_json_path(path, jobs, overwrite):
    """UserError unless `path` may receive --qf-estimate's JSON: never an image or an input
    (`--json *.jpg` unquoted makes the first image the JSON path), an existing file only with
    --overwrite."""
    if _is_image_name(os.path.basename(path)) or any(
            os.path.realpath(path) == os.path.realpath(job.path) for job in jobs):
        raise OptionError(f"--json {path}: is an image or input file, which is never "
                          "overwritten (is a glob after --json unquoted?)")
    if os.path.exists(path) and not overwrite:
        raise OptionError(f"--json {path}: exists (--overwrite replaces it)")


def run_qf_estimate(args):
    """Print (and optionally save as JSON) each input's header, network and dominant QF.

    Returns 0, or 1 when some file could not be read. A model that cannot be loaded (no
    network to download it, a wrong file) is no file's fault: its files keep their header and
    dominant QF, their network QF stays empty, and one warning per model says why. Under
    torchrun (or srun) each process estimates its share and rank 0 prints (and writes) them
    all, in the inputs' order."""
    shard = join_shards()
    try:
        with _rank_logging(shard):
            return _estimate_all(args, shard)
    finally:
        leave_shards()


def _estimate_all(args, shard):
    device = None if args.no_network else shard_device(shard, resolve_device(args.device))
    options = {} if args.no_network else speed_options(args)
    options.pop("tile_cache_gib", None)  # the QF pass alone caches nothing
    options.pop("x8", None)  # x8 reports the QF of its unturned pass: the plain one
    _warn_unused(args, [(flag, given, "with --qf-estimate (nothing is restored)")
                        for flag, given in (("-o", args.output), ("--format", args.format != "png"),
                                            ("--quality", args.quality is not None),
                                            ("--suffix", args.suffix),
                                            ("--no-projection", not args.projection))])
    jobs, failures, passed = collect_inputs(args.inputs, args.recursive)
    if args.json:
        _check_json_path(args.json, jobs, args.overwrite)
    if shard.is_main:
        _log_passed_over(passed)
        for message in failures:
            LOG.error("error: %s", message)
    models = None if args.no_network else ModelCache(
        {"color": args.model, "gray": args.gray_model}, device)
    rows, failed = [], []
    for index, job in tqdm(shard.take(enumerate(jobs)), desc="estimating", unit="img",
                           disable=None if shard.is_main else True):
        try:
            decoded = read_image(job.path, args.channels)
            header = header_qf(decoded.jpeg_info) if decoded.jpeg_info is not None else None
            network_qf = None
            model = None if models is None else _estimating_model(models, decoded.gray)
            if model is not None:
                network_qf = predict_qf(model, decoded.img, device=device, **options)
            dominant = estimate_dominant_qf(decoded.img).qf
        except (UserError, OSError, ValueError, cv2.error, RuntimeError, MemoryError) as exc:
            failed.append(_failure(job.path, exc))
            continue
        rows.append((index, {"file": job.path, "header_qf": None if header is None else
                             header.qf, "network_qf": network_qf, "dominant_qf": dominant},
                     None if header is None else str(header)))
    gathered = all_gather_objects((rows, failed))
    failures += [line for _, part in gathered for line in part]
    if not shard.is_main:
        return 0
    rows = [(row, header) for _, row, header in sorted(r for part, _ in gathered for r in part)]
    width = max([len("file")] + [len(display_path(r["file"])) for r, _ in rows])
    lines = [f"{'file':<{width}}  {'header':>24}  {'network':>7}  {'dominant':>8}"]
    for row, header in rows:
        cells = ["-" if header is None else header,
                 "-" if row["network_qf"] is None else str(row["network_qf"]),
                 "-" if row["dominant_qf"] is None else str(row["dominant_qf"])]
        lines.append(f"{display_path(row['file']):<{width}}  {cells[0]:>24}  {cells[1]:>7}  "
                     f"{cells[2]:>8}")
    tqdm.write("\n".join(lines), file=sys.stdout)
    if args.json:
        atomic_write_bytes(args.json, (json.dumps([r for r, _ in rows], indent=2) + "\n").encode(),
                           fsync=False)
    if failures:
        tqdm.write(f"{len(failures)} file(s) failed" + "".join(
            f"\n  failed: {line}" for line in failures if shard.distributed), file=sys.stderr)
    return 1 if failures else 0


def _estimating_model(models, gray):
    """The model for the network QF of a colour or gray file, or None when it cannot be had
    (warned about once per model: the header and dominant QF need no model)."""
    role = "gray" if gray else "color"
    warned = role in models.failed
    try:
        return models.get(role)
    except ModelUnavailable as exc:
        if not warned:
            LOG.warning("warning: no network QF for %s files: %s; --no-network leaves the "
                        "network out without trying", "gray" if gray else "colour", exc)
        return None


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
