"""FBCNN-D: the dominant JPEG quality of an image, estimated from its pixels alone.

This module owns the paper's blind fix for non-aligned double JPEG (FBCNN-D, which the original
code does not ship): find the QF of the compression that dominates the artifacts, to feed it
to FBCNN as `qf_input`. It uses only re-compression with data/jpeg.py's encoder ("JPEG
ghosts": an image re-compressed on its own 8x8 grid at its own QF comes back almost exactly),
so it works on any decoded image (a PNG screenshot of a JPEG, a crop, a JPEG of a JPEG);
`estimate_dominant_qf` says how. The thresholds were chosen on LIVE1_gray
(benchmarks/eval_fbcnn_d.py prints the accuracy).
"""
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import cv2
import numpy as np

from data.jpeg import jpeg

__all__ = ["DominantQF", "analysis_window", "recompression_errors", "prior_threshold",
           "estimate_dominant_qf", "QUALITIES"]

QUALITIES = np.arange(1, 101)
TRACE_THRESHOLD = 0.5
PRIOR_THRESHOLD = 0.8  # for a 256x256 window; smaller windows are noisier, see prior_threshold()
TIE_TOLERANCE = 0.02
# A QF at which re-compression reproduces the window at most shifts (median MSE below this, in
# grey levels squared: flat content) carries no evidence; its ratios would be 0 / 0.
MIN_MEDIAN_MSE = 1e-3


@dataclass(frozen=True)
class DominantQF:
    """The estimate and its evidence; shifts are (rows, cols) in 0..7 relative to the image."""
    qf: object  # int, or None when no JPEG trace was found
    last_qf: object
    last_shift: object
    first_qf: object = None
    first_shift: object = None
    first_score: float = float("inf")  # normalised error of the earlier dip (lower: stronger)


def _luma(img):
    if img.ndim == 2:
        return img
    if img.ndim == 3 and img.shape[2] == 1:
        return img[:, :, 0]
    # libjpeg's Y (BT.601 full range), which is what its luminance table quantized
    return cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_RGB2YCrCb)[:, :, 0]


def analysis_window(shape, max_size=256):
    """(y0, x0, h, w): a centred window, origin on the image's 8x8 grid, sides multiples of 8,
    that stays inside the image at every shift of 0..7 rows and columns."""
    height, width = shape[:2]
    h, w = min(max_size, height - 7) // 8 * 8, min(max_size, width - 7) // 8 * 8
    if h < 8 or w < 8:
        raise ValueError(f"image of {height}x{width} pixels is too small to estimate its JPEG "
                         "quality (at least 15x15 needed)")
    return (height - 7 - h) // 16 * 8, (width - 7 - w) // 16 * 8, h, w


def recompression_errors(img, qualities=QUALITIES, max_size=256, workers=None):
    """E[s, k]: MSE between the window at shift s = 8 * rows + cols and its JPEG at qualities[k].

    The 64 shifted windows are tiled into one mosaic and compressed together: each tile's side
    is a multiple of 8, so every 8x8 block is coded exactly as if the tile were alone, and one
    encode per QF replaces 64. `workers` threads (default: up to 4, one per CPU) share the QFs;
    OpenCV and NumPy release the GIL, so they run in parallel.
    """
    y = _luma(img)
    y0, x0, h, w = analysis_window(y.shape, max_size)
    mosaic = np.empty((8, h, 8, w), dtype=np.uint8)
    for dy in range(8):
        for dx in range(8):
            mosaic[dy, :, dx, :] = y[y0 + dy:y0 + dy + h, x0 + dx:x0 + dx + w]
    mosaic = mosaic.reshape(8 * h, 8 * w)
    ref = mosaic.astype(np.float32)

    def tile_mse(q):
        diff = jpeg(mosaic, int(q)).astype(np.float32) - ref
        return np.square(diff).reshape(8, h, 8, w).mean(axis=(1, 3), dtype=np.float64).ravel()

    workers = workers or min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        columns = list(pool.map(tile_mse, qualities))
    return np.stack(columns, axis=1)


def prior_threshold(window_pixels):
    """The earlier-compression threshold for a window of that many pixels.

    A true earlier dip scores about the same at any window size (at most 0.75 on LIVE1_gray,
    for QF1 = 30 under QF2 = 50), while the best spurious dip on images without one moves away
    from 1 as the window shrinks: at least 0.84 with 256x256 windows, 0.76 with 128x128. So
    0.8 at 256x256, 0.025 less per halving of the pixel count (0.75 at 128x128).
    """
    return PRIOR_THRESHOLD - 0.025 * max(0.0, np.log2(256 * 256 / window_pixels))


def _dips(norm):
    """Local minima over q of each row of `norm` (interior q only); other entries are inf."""
    left, mid, right = norm[:, :-2], norm[:, 1:-1], norm[:, 2:]
    out = np.full(norm.shape, np.inf)
    out[:, 1:-1] = np.where((mid <= left) & (mid <= right) & np.isfinite(mid), mid, np.inf)
    return out


def _normalise(errors, rows):
    """errors[rows] divided, per QF, by their median over those rows; inf (no dip possible)
    where that median is below MIN_MEDIAN_MSE."""
    med = np.median(errors[rows], axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(med >= MIN_MEDIAN_MSE, errors[rows] / med, np.inf)


def estimate_dominant_qf(img, max_size=256, trace_threshold=TRACE_THRESHOLD, threshold=None):
    """FBCNN-D's estimate for a uint8 RGB or gray image.

    The observation ("JPEG ghosts"): re-compress an image at QF' on the 8x8 grid it was compressed
    on, and the error against it dips sharply at QF' = its QF, since its DCT coefficients are
    already multiples of that QF's quantization steps. On any other grid alignment no such dip
    appears. A non-aligned double JPEG (QF1, crop, QF2) shows two dips: QF2 on the last grid and
    a weaker one at QF1 on the first grid. So, on a window of the luma channel:

    1. `recompression_errors`: the MSE E[s, q] between the window at each of the 64 grid shifts s
       and its re-compression at each QF q in 1..100.
    2. Normalise each QF's column by its median over the shifts (A = E / median), so that the
       steady decrease of the error with q and the image content cancel out; a dip is a local
       minimum over q of one shift's row.
    3. The last compression is the deepest dip (A near 0: re-compressing a decoded JPEG on its
       own grid at its own QF reproduces it almost exactly). The lowest QF among that shift's
       near-equal dips is taken, since a QF-10 JPEG also re-compresses exactly at QF 20 and 50
       (their tables divide its table). No dip below `trace_threshold`: no JPEG trace, QF None.
    4. An earlier compression: on the other shifts, renormalised against the shifts that are
       aligned with the last grid in the same way (same row phase, same column phase, or
       neither), the deepest dip at a QF below the last one. The four shifts one pixel off the
       last grid along one axis are not candidates (smooth content fakes dips there). It is
       dominant when its normalised error is below `prior_threshold(window size)` (0.8 for the
       default 256x256 window); otherwise the last QF is.
    An aligned double JPEG (the same grid twice) is reported as its last QF.

    `threshold` overrides `prior_threshold(window pixels)`. An image under 15x15 pixels has no
    window to measure: like an image without a JPEG trace, it gets DominantQF(None, None, None).
    """
    if min(img.shape[:2]) < 15:
        return DominantQF(None, None, None)
    _, _, h, w = analysis_window(img.shape, max_size)
    errors = recompression_errors(img, QUALITIES, max_size)
    if threshold is None:
        threshold = prior_threshold(h * w)
    qs = QUALITIES
    all_rows = np.arange(64)
    dips = _dips(_normalise(errors, all_rows))
    s2 = int(np.unravel_index(np.argmin(dips), dips.shape)[0])
    best = dips[s2].min()
    if not best <= trace_threshold:
        return DominantQF(None, None, None)
    # the lowest QF among the last grid's near-deepest dips (divisor tables also dip to ~0)
    k2 = int(np.flatnonzero(dips[s2] <= 2 * best + TIE_TOLERANCE)[0])
    last_qf, last_shift = int(qs[k2]), divmod(s2, 8)

    dy2, dx2 = last_shift
    dy, dx = np.divmod(all_rows, 8)
    phase = (dy == dy2) + 2 * (dx == dx2)
    norm = np.full(errors.shape, np.inf)
    for cls in (0, 1, 2):  # misaligned in both, same rows, same columns; s2 itself excluded
        rows = all_rows[phase == cls]
        if len(rows) >= 3:
            norm[rows] = _normalise(errors, rows)
    prior = _dips(norm)
    prior[:, qs >= last_qf] = np.inf
    # one pixel off the last grid along one axis, smooth content still re-compresses almost as
    # well as on it: those four shifts produce pseudo-dips, so they are not candidates
    for dy, dx in ((1, 0), (7, 0), (0, 1), (0, 7)):
        prior[8 * ((dy2 + dy) % 8) + (dx2 + dx) % 8] = np.inf
    s1, k1 = (int(v) for v in np.unravel_index(np.argmin(prior), prior.shape))
    score = float(prior[s1, k1])
    if score < threshold:
        return DominantQF(int(qs[k1]), last_qf, last_shift, int(qs[k1]), divmod(s1, 8), score)
    return DominantQF(last_qf, last_qf, last_shift, first_score=score)
