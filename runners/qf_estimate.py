"""`main_restore.py --qf-estimate`: each file's JPEG quality, without restoring it.

This module owns the report of each input's QF three ways: the file's quantization tables
(header, utils/jpeg_header.py), the network's QF head (models/inference.py `predict_qf`) and
FBCNN-D's dominant QF (data/dominant_qf.py), as a table and optionally as JSON. A model that
cannot be had (offline, say) leaves the network column empty with one warning. Under torchrun
(or srun) each process estimates its share and rank 0 prints them all in the inputs' order.
"""
import json
import logging
import os
import sys

from tqdm import tqdm

from data.dominant_qf import estimate_dominant_qf
from models.inference import predict_qf, resolve_device
from runners.cli import shard_device, speed_options
from runners.restore_io import (FILE_FAILURES, ModelCache, ModelUnavailable, OptionError,
                                collect_inputs, failure, is_image_name, log_passed_over,
                                warn_unused)
from utils.dist import all_gather_objects, join_shards, leave_shards
from utils.fileio import atomic_write_bytes, display_path
from utils.image_file import read_image
from utils.jpeg_header import header_qf
from utils.logger import rank_logging

__all__ = ["run_qf_estimate"]

LOG = logging.getLogger("fbcnn.runners.restore")


def _check_json_path(path, jobs, overwrite):
    """UserError unless `path` may receive --qf-estimate's JSON: never an image or an input
    (`--json *.jpg` unquoted makes the first image the JSON path), an existing file only with
    --overwrite."""
    if is_image_name(os.path.basename(path)) or any(
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
        with rank_logging(shard.is_main):
            return _estimate_all(args, shard)
    finally:
        leave_shards()


def _estimate_all(args, shard):
    device = None if args.no_network else shard_device(shard, resolve_device(args.device))
    options = {} if args.no_network else speed_options(args)
    options.pop("tile_cache_gib", None)  # the QF pass alone caches nothing
    options.pop("x8", None)  # x8 reports the QF of its unturned pass: the plain one
    warn_unused(args, [(flag, given, "with --qf-estimate (nothing is restored)")
                        for flag, given in (("-o", args.output), ("--format", args.format != "png"),
                                            ("--quality", args.quality is not None),
                                            ("--suffix", args.suffix),
                                            ("--no-projection", not args.projection))])
    jobs, failures, passed = collect_inputs(args.inputs, args.recursive)
    if args.json:
        _check_json_path(args.json, jobs, args.overwrite)
    if shard.is_main:
        log_passed_over(passed)
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
        except FILE_FAILURES as exc:
            failed.append(failure(job.path, exc))
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
