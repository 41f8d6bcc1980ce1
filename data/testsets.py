"""Where the test sets are: a name under a root folder (default: the repository's testsets/),
or a folder path; the paper's sets too large for the repository are named with where to get them.
"""
import os

from utils import REPO_ROOT
from utils.errors import UserError

__all__ = ["PUBLIC_TESTSETS", "resolve_testset"]


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
