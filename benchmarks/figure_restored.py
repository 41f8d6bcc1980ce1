"""The README's picture: crops of a JPEG, its restoration and the original, at two qualities.

    python -m benchmarks.figure_restored [--image testsets/LIVE1_color/parrots.png]
        [--qf 10 90] [--crop 150 0 192] [--model fbcnn_color_lite] [-o docs/restored.png]

The whole image is compressed at each QF (OpenCV, as the test scripts) and restored as
main_restore restores it by default (blind, made consistent with the file,
models/consistency.py, with main_restore's engine); a crop of the JPEG, of the restoration
and of the original is shown side by side, one row per QF, enlarged 2x, and each crop's PSNR
against the original's crop is printed (and written on the picture).
"""
import argparse
import os
import sys

import cv2
import numpy as np

from data.jpeg import jpeg_file
from models.consistency import file_coefficients, restore_consistent
from models.engines import fastest_options
from models.model_zoo import load_model
from runners.cli import quality_factor, run_cli
from utils import REPO_ROOT
from utils.image import imread_uint, imwrite
from utils.metrics import psnr


def _label(tile, text):
    """`text` in white on a dark band along the tile's top."""
    cv2.rectangle(tile, (0, 0), (tile.shape[1], 22), (0, 0, 0), thickness=-1)
    cv2.putText(tile, text, (6, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1,
                cv2.LINE_AA)
    return tile


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--image", default=os.path.join(REPO_ROOT, "testsets", "LIVE1_color",
                                                   "parrots.png"))
    p.add_argument("--qf", type=quality_factor, nargs="+", default=[10, 90])
    p.add_argument("--crop", type=int, nargs=3, default=[130, 196, 152], metavar=("TOP", "LEFT",
                                                                                "SIZE"))
    p.add_argument("--model", default="fbcnn_color_lite")
    p.add_argument("-o", "--output", default=os.path.join(REPO_ROOT, "docs", "restored.png"))
    args = p.parse_args(argv)
    model = load_model(args.model)
    clean = imread_uint(args.image)
    top, left, size = args.crop
    window = (slice(top, top + size), slice(left, left + size))
    rows = []
    for qf in args.qf:
        img_L, data = jpeg_file(clean, qf)
        coefficients = file_coefficients(data)[0]
        restored, _ = restore_consistent(model, img_L, coefficients,
                                         **fastest_options({}, "cpu"))
        crops = [np.ascontiguousarray(x[window]) for x in (img_L, restored, clean)]
        scores = [psnr(c, crops[2]) for c in crops[:2]]
        print(f"QF {qf}: JPEG {scores[0]:.2f} dB, restored {scores[1]:.2f} dB (crop)")
        big = [cv2.resize(c, None, fx=2, fy=2, interpolation=cv2.INTER_NEAREST) for c in crops]
        names = [f"JPEG, QF {qf}: {scores[0]:.2f} dB", f"restored: {scores[1]:.2f} dB",
                 "original"]
        rows.append(np.concatenate([_label(b, n) for b, n in zip(big, names)], axis=1))
    imwrite(args.output, np.concatenate(rows, axis=0))
    print(f"wrote {args.output} ({args.model}, {os.path.basename(args.image)}, crop {size} px "
          f"at ({top}, {left}), shown 2x)")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
