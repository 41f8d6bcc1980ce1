"""main_restore's files: which inputs a run takes, where their results go, and how they are
written.

This module owns expanding INPUT arguments (files, folders, globs) to jobs and saying what was
passed over; the models the inputs go to (`--model`, `--gray-model`), each loaded once; the
output plan (folder inputs keep their sub-folders; an input is never an output; two inputs
never share one); the output folder's lock and the encoding of results (ICC profiles, 16-bit
PNG and TIFF); the one line a failed file costs (`FILE_FAILURES` are the errors that fail one
file, not the run).
"""
import contextlib
import glob
import logging
import os
from dataclasses import dataclass

import cv2

from models.model_zoo import default_model, load_model
from utils.dist import all_gather_objects
from utils.errors import UserError
from utils.fileio import display_path, folder_lock
from utils.image import IMG_EXTENSIONS, ImageReadError, imencode
from utils.image_meta import embed_icc

__all__ = ["FORMATS", "DEFAULT_QUALITY", "FILE_FAILURES", "OptionError", "Job",
           "is_image_name", "collect_inputs", "log_passed_over", "ModelUnavailable", "ModelCache",
           "encode_image", "failure", "plan_outputs", "refusals", "output_lock", "warn_unused"]

LOG = logging.getLogger("fbcnn.runners.restore")
FORMATS = {"png": ".png", "jpg": ".jpg", "jpeg": ".jpg", "webp": ".webp", "tif": ".tif",
           "tiff": ".tif", "bmp": ".bmp"}
GLOB_CHARS = "*?["
DEFAULT_QUALITY = 95  # of jpg and webp outputs
LOCK_NAME = ".main_restore.lock"  # in -o OUTDIR while a run writes there
# what may go wrong with one file (reading, decoding, restoring, writing it): that file fails,
# the run goes on
FILE_FAILURES = (UserError, OSError, ValueError, cv2.error, RuntimeError, MemoryError)


class OptionError(UserError):
    """A problem with the options or a model that stops the whole run (exit 2)."""


@dataclass(frozen=True)
class Job:
    """One input file and where its result goes (`subdir` is relative to OUTDIR)."""
    path: str
    subdir: str = ""
    named: bool = True  # given by name, not found in a folder or by a glob


def is_image_name(name):
    """Whether a folder or glob takes `name` as an image: an image extension, not hidden."""
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
                    if is_image_name(name) and os.path.isfile(path):
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
                       if os.path.isfile(m) and is_image_name(os.path.basename(m))]
            if not matches:
                errors.append(f"{arg}: no image files match this pattern")
            for m in matches:
                add(m)
        else:
            errors.append(f"{arg}: no such file or folder")
    return jobs, errors, passed


def log_passed_over(passed):
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


def encode_image(img, ext, quality=95, icc=None):
    """Encoded bytes of a uint8 (or, for png and tif, uint16) RGB or gray image; `icc` embedded
    where the format allows."""
    params = {".jpg": [int(cv2.IMWRITE_JPEG_QUALITY), quality],
              ".webp": [int(cv2.IMWRITE_WEBP_QUALITY), quality]}.get(ext, [])
    data = imencode(img, ext, params)
    return embed_icc(data, ext, icc) if icc is not None else data


def failure(path, exc):
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
def output_lock(folder, shard):
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


def warn_unused(args, checks):
    """One warning per option given where it does nothing (`(flag, given, where)` triples)."""
    for flag, given, where in checks:
        if given:
            LOG.warning("warning: %s has no effect %s", flag, where)
