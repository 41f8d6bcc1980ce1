"""The test sets: where they are (a name under a root folder, default the repository's
testsets/, or a folder path; the paper's sets too large for the repository are named with where
to get them) and reading one (its readable images, the unreadable ones skipped by name).
"""
import logging
import os

from utils import REPO_ROOT
from utils.errors import UserError
from utils.image import IMG_EXTENSIONS, ImageReadError, imread_uint

__all__ = ["PUBLIC_TESTSETS", "resolve_testset", "read_testset"]

LOG = logging.getLogger(f"fbcnn.{__name__}")


# the paper's test sets that are too large for the repository, and where they come from
PUBLIC_TESTSETS = {
    "BSDS500_color": "the 500 images of BSDS500, www2.eecs.berkeley.edu/Research/Projects/CS/"
                     "vision/grouping/resources.html",
    "BSDS500_gray": "BSDS500 (www2.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/"
                    "resources.html) converted to gray",
    "McMaster": "the 18 McMaster images, www4.comp.polyu.edu.hk/~cslzhang/CDM_Dataset.htm",
}


def resolve_testset(testset, root):
    """A name under `root` (default: the repository's testsets/) first, else a folder path."""
    root = root or os.path.join(REPO_ROOT, "testsets")
    path = os.path.join(root, testset)
    if os.path.isdir(path):
        return os.path.abspath(path)
    if os.path.isdir(testset):
        return os.path.abspath(testset)
    known = (sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
             if os.path.isdir(root) else [])
    hint = f"; sets in {root}: {', '.join(known)}" if known else f"; {root} holds no test sets"
    if testset in PUBLIC_TESTSETS:
        hint += (f". {testset} is not in the repository: download {PUBLIC_TESTSETS[testset]}, "
                 f"put it in a folder named {testset} and give its parent as --testsets-root")
    raise UserError(f"--testset {testset!r}: no folder {path}{hint}")


def _read_image(path, n_channels):
    try:
        return imread_uint(path, n_channels), None
    except ImageReadError as exc:
        return None, exc


def read_testset(folder, n_channels, map_fn=map):
    """`(images, skipped)`: the readable images of `folder` as (name, uint8 array), read through
    `map_fn` (a thread pool's map, say), and the names of the unreadable files, skipped with a
    warning; UserError when none is readable."""
    names = sorted(n for n in os.listdir(folder) if not n.startswith(".") and (
        os.path.isfile(os.path.join(folder, n)) or n.lower().endswith(IMG_EXTENSIONS)))
    images, skipped = [], []
    read = map_fn(lambda name: _read_image(os.path.join(folder, name), n_channels), names)
    for name, (img, error) in zip(names, read):
        if error is None:
            images.append((name, img))
        else:
            LOG.warning("skipped %s", error)
            skipped.append(name)
    if not images:
        raise UserError(f"--testset {folder}: no readable images")
    return images, skipped
