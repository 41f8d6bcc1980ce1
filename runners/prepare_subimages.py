"""One-off preparation of a training set: cut large clean images into overlapping sub-images.

Decoding a whole 2K PNG (about 2040x1400 pixels) for every 96-pixel patch starves a GPU; a 480x480
sub-image has 12 times fewer pixels to decode and still leaves room for the random 112x112 crops
of the double-JPEG presets.
Usage (from the repository root):

    python -m runners.prepare_subimages ../trainsets/Data_DIV2K_Flickr2K ../trainsets/DF2K_sub480 \
        --size 480 --step 240 --workers 8

Windows start every `step` pixels; a last window is added flush with the right/bottom edge when
the remainder exceeds `thresh`, so nothing large is lost. Images smaller than `size` are kept
whole. Outputs are PNG (lossless) named `<stem>_s<row>_<col>.png`, written atomically; files that
already exist are skipped, so an interrupted run can simply be restarted. The output folder
records its --size/--step/--thresh in `.prepare.json`, and a restart with other values is
refused (it would mix sub-images of two sizes). An output folder inside the input folder is
not read as input.
"""
import argparse
import json
import logging
import os
import sys
from concurrent.futures import ProcessPoolExecutor

import cv2
from tqdm import tqdm

from data.dataset_jpeg import list_images_recursive
from runners.cli import run_cli
from utils.errors import UserError
from utils.fileio import atomic_write_bytes, make_folder
from utils.image import imread_uint, imwrite, read_image_header
from utils.logger import setup_logging

__all__ = ["window_starts", "cut_image", "prepare", "main"]

logger = logging.getLogger(f"fbcnn.{__name__}")


def window_starts(length, size, step, thresh):
    """Start offsets of the windows along one axis (a single 0 when length <= size)."""
    if length <= size:
        return [0]
    starts = list(range(0, length - size + 1, step))
    if length - (starts[-1] + size) > thresh:
        starts.append(length - size)
    return starts


def cut_image(path, dst, size, step, thresh, compression=3):
    """Cut one image into sub-images in `dst`; returns (written, skipped)."""
    header = read_image_header(path)  # the size, without decoding: a restart skips done images
    stem = os.path.splitext(os.path.basename(path))[0]
    windows = [(os.path.join(dst, f"{stem}_s{i:03d}_{j:03d}.png"), top, left)
               for i, top in enumerate(window_starts(header.height, size, step, thresh))
               for j, left in enumerate(window_starts(header.width, size, step, thresh))]
    todo = [w for w in windows if not os.path.exists(w[0])]
    if todo:
        img = imread_uint(path, 3)
        for out, top, left in todo:
            imwrite(out, img[top:top + size, left:left + size],
                    [int(cv2.IMWRITE_PNG_COMPRESSION), compression])
    return len(todo), len(windows) - len(todo)


def _cut(args):
    return cut_image(*args)


def _record_settings(dst, settings):
    """Write `dst/.prepare.json`, or check that an earlier run wrote the same settings."""
    path = os.path.join(dst, ".prepare.json")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            earlier = json.load(f)
        if earlier != settings:
            shown = ", ".join(f"--{k} {v}" for k, v in earlier.items())
            raise UserError(f"{dst}: holds sub-images cut with {shown}; use another output "
                            "folder for other values (or delete it)")
        return
    atomic_write_bytes(path, (json.dumps(settings) + "\n").encode(), fsync=False)


def prepare(src, dst, size=480, step=240, thresh=48, workers=4, compression=3, progress=True):
    """Cut every image below `src` into `dst`; returns (images, sub-images written, skipped)."""
    if not os.path.isdir(src):
        raise UserError(f"{src}: no such folder")
    if size < 1 or step < 1 or thresh < 0:
        raise UserError(f"--size and --step must be positive and --thresh >= 0 "
                        f"(got {size}, {step}, {thresh})")
    if os.path.realpath(dst) == os.path.realpath(src):
        raise UserError(f"{dst}: the output folder is the input folder; the sub-images would "
                        "be read as training images of the next run; choose another folder")
    inside = os.path.realpath(dst) + os.sep
    paths = [p for p in list_images_recursive(src) if not os.path.realpath(p).startswith(inside)]
    if not paths:
        raise UserError(f"{src}: no images found")
    seen = {}
    for path in paths:  # sub-images are named by stem: two images must not share one
        stem = os.path.splitext(os.path.basename(path))[0]
        if stem in seen:
            raise UserError(f"{path} and {seen[stem]} would both be cut into {stem}_s*.png; "
                            f"rename one of them")
        seen[stem] = path
    make_folder(dst)
    _record_settings(dst, {"size": size, "step": step, "thresh": thresh})
    jobs = [(p, dst, size, step, thresh, compression) for p in paths]
    written = skipped = 0
    bar = tqdm(total=len(jobs), unit="img", desc="sub-images", disable=not progress or None)
    try:
        if workers > 1:
            with ProcessPoolExecutor(workers) as pool:
                for w, s in pool.map(_cut, jobs, chunksize=4):
                    written, skipped = written + w, skipped + s
                    bar.update(1)
        else:
            for job in jobs:
                w, s = _cut(job)
                written, skipped = written + w, skipped + s
                bar.update(1)
    finally:
        bar.close()
    return len(paths), written, skipped


def main(argv=None):
    parser = argparse.ArgumentParser(description="Cut training images into sub-images.")
    parser.add_argument("src", help="folder of clean images (searched recursively)")
    parser.add_argument("dst", help="output folder")
    parser.add_argument("--size", type=int, default=480, help="sub-image side (default 480)")
    parser.add_argument("--step", type=int, default=240, help="window stride (default 240)")
    parser.add_argument("--thresh", type=int, default=48,
                        help="add an edge-aligned window when more than this many pixels "
                             "remain (default 48)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="processes (default: one per CPU)")
    parser.add_argument("--compression", type=int, default=3,
                        help="PNG compression 0-9 (default 3)")
    args = parser.parse_args(argv)
    undo_logging = setup_logging()

    def body():
        n, written, skipped = prepare(args.src, args.dst, args.size, args.step, args.thresh,
                                      args.workers, args.compression)
        logger.info("%d images -> %d sub-images written, %d already there, in %s", n, written,
                    skipped, args.dst)
    try:
        return run_cli(body)
    finally:
        undo_logging()


if __name__ == "__main__":
    sys.exit(main())
