"""A test set of graphics, the content photographs never show: dithers, posterized images,
one-pixel lines, stripes, text (`data/graphics.py`, the kinds `graphics_prob` trains on).

    python -m benchmarks.make_graphics_set OUT [--per-kind 3] [--size 256] [--seed 2026]
    python -m benchmarks.no_harm --testsets-root PARENT_OF_OUT --testset NAME_OF_OUT --qf 50 90 95

Each image is a `--size` square graphic of one kind, `KIND_I.png`, beside its neutral copy
(its luma in all three channels, `KIND_I_neutral.png`: documents and scans, whose JPEGs keep
pixel-level detail that 4:2:0 chroma blurs in colour ones); the dithered and posterized ones
are made from crops of LIVE1_color (the repository's testsets/). A pure function of the
seed, so the set is the same on every machine, and its seed differs from every training run's
draws. OUT must be new or empty.
"""
import argparse
import os

import numpy as np

from data.graphics import GRAPHIC_KINDS, graphic, neutral_copy
from data.testsets import resolve_testset
from runners.cli import run_cli
from utils.errors import UserError
from utils.image import imread_uint, imwrite, list_images

__all__ = ["make_set", "main"]


def make_set(out, per_kind=3, size=256, seed=2026, testsets_root=None):
    """Write the set to `out`; returns the file names written."""
    if os.path.isdir(out) and os.listdir(out):
        raise UserError(f"{out}: not empty; give a new folder")
    photos = list_images(resolve_testset("LIVE1_color", testsets_root))
    rng = np.random.default_rng(seed)
    os.makedirs(out, exist_ok=True)
    names = []
    for kind in GRAPHIC_KINDS:
        for i in range(per_kind):
            photo = imread_uint(photos[int(rng.integers(len(photos)))])
            h, w = photo.shape[:2]
            if min(h, w) < size:
                raise UserError(f"--size {size}: LIVE1_color has a {w}x{h} image; at most "
                                f"{min(h, w)}")
            top, left = int(rng.integers(h - size + 1)), int(rng.integers(w - size + 1))
            img = graphic(photo[top:top + size, left:left + size], rng, kind, neutral=False)
            for name, version in ((f"{kind}_{i}.png", img),
                                  (f"{kind}_{i}_neutral.png", neutral_copy(img))):
                imwrite(os.path.join(out, name), version)
                names.append(name)
    return names


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.make_graphics_set",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("out", metavar="OUT", help="a new (or empty) folder")
    p.add_argument("--per-kind", type=int, default=3)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--seed", type=int, default=2026)
    p.add_argument("--testsets-root", default=None,
                   help="folder holding LIVE1_color (default: the repository's testsets/)")
    args = p.parse_args(argv)

    def body():
        names = make_set(args.out, args.per_kind, args.size, args.seed, args.testsets_root)
        print(f"wrote {len(names)} graphics to {args.out}")

    return run_cli(body)


if __name__ == "__main__":
    raise SystemExit(main())
