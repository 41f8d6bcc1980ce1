"""Consistency with the file: project a restored image onto its JPEG's quantization constraint set.

This module owns what a JPEG file says about the image it was made from. Each 8x8 DCT
coefficient of each component was stored as an integer k with step q (the file's quantization
table), so the true coefficient lay in [(k - 1/2) q, (k + 1/2) q]. The set of images whose
coefficients all lie in their intervals is convex and holds the true image, so projecting a
restored image onto it (clipping every coefficient into its interval) never moves the estimate
away from the truth in that component's DCT domain (jpeg2png and knusperli post-process
decoded JPEGs the same way). It is exact for the luma (Y) component and for gray files; chroma
is stored at the file's sampling (4:2:0, 4:2:2, ...), so the restored chroma is box-averaged to
it (as libjpeg's encoder downsamples), projected there, and the correction is brought back to
full size bilinearly (centred as libjpeg's "fancy" upsampling), which is close to, not exactly,
a projection. Edge blocks are padded by replicating the last row and column, as the encoder did.

Inside the intervals, three ways to pick the result. "clip" is the projection itself.
"posterior" (`METHODS`, no network needed) reads the restoration as a noisy measurement of each
coefficient, estimates that noise per frequency from the image, and takes the mean of the
measurement's distribution truncated to the interval. "calibrated" (what main_restore, the demo
and the test scripts' `--projection` use) asks the network itself how far to trust it: the
clipped restoration is compressed again with the file's own tables on a grid half a block off
the file's (`calibrate`), the same network and options restore that twin, and per component and
frequency the share of the departure from the file's value that best brought the twin back is
the share kept (least squares, in [0, 1]), then clipped. A small network that paints detail
flat at QF 90 to 100 is thus drawn back to the file's values, one that restores well keeps its
gains; it costs one more network pass over at most a `CALIBRATION_WINDOW` window of the image.
Every result is consistent with the file.

The coefficients and tables are read by jpeglib (libjpeg's own decoder, with wheels for Linux,
macOS and Windows, MPL-2.0; it reads progressive files and restart intervals as any decoder
does), not by a hand-written Huffman decoder. It is imported only when a projection is asked
for. Files it cannot use are named by `ProjectionUnavailable` with the reason (CMYK or YCCK,
12-bit samples, arithmetic coding, lossless or hierarchical JPEG, RGB components); callers keep
the unprojected restoration then.
"""
import os
import struct
import tempfile
from typing import NamedTuple

import cv2
import numpy as np
import torch

from utils.jpeg_header import JpegHeaderError, iter_segments

__all__ = ["ProjectionUnavailable", "Component", "JpegCoefficients", "read_coefficients",
           "project", "calibrate", "Twin", "make_twin", "twin_shares", "posterior_mean",
           "METHODS", "PROJECTION_METHODS", "rgb_to_ycbcr", "ycbcr_to_rgb", "block_dct",
           "block_idct"]

# SOF markers: the ones libjpeg decodes to 8x8 DCT coefficients, and why the others are not used
_DCT_HUFFMAN = {0xC0, 0xC1, 0xC2}
_SOF_REASONS = {0xC3: "lossless JPEG", 0xC5: "hierarchical JPEG", 0xC6: "hierarchical JPEG",
                0xC7: "hierarchical JPEG", 0xC9: "arithmetic coding", 0xCA: "arithmetic coding",
                0xCB: "lossless JPEG (arithmetic)", 0xCD: "hierarchical JPEG",
                0xCE: "hierarchical JPEG", 0xCF: "hierarchical JPEG"}


class ProjectionUnavailable(ValueError):
    """This JPEG's coefficients cannot be used for the projection; the message says why."""


class Component(NamedTuple):
    """One stored component: quantized coefficients (rows, cols, 8, 8) in natural order, its
    quantization table (8, 8), and how many full-size pixels one of its samples covers
    (rows, cols): (1, 1) for Y, (2, 2) for the chroma of a 4:2:0 file."""
    coefficients: np.ndarray
    table: np.ndarray
    factor: tuple


class JpegCoefficients(NamedTuple):
    """What the projection needs of a file: its size and its components (Y first)."""
    height: int
    width: int
    components: tuple


def _dct_matrix():
    n = np.arange(8)
    d = np.sqrt(2 / 8) * np.cos(np.pi * (2 * n[None, :] + 1) * n[:, None] / 16)
    d[0] /= np.sqrt(2)
    return d


_D = _dct_matrix()  # JPEG's 8x8 DCT is the orthonormal DCT-II


def block_dct(plane):
    """(8R, 8C) samples -> (R, C, 8, 8) DCT coefficients of each 8x8 block."""
    r, c = plane.shape[0] // 8, plane.shape[1] // 8
    return _D @ plane.reshape(r, 8, c, 8).transpose(0, 2, 1, 3) @ _D.T


def block_idct(coefficients):
    """(R, C, 8, 8) DCT coefficients -> (8R, 8C) samples."""
    r, c = coefficients.shape[:2]
    return (_D.T @ coefficients @ _D).transpose(0, 2, 1, 3).reshape(8 * r, 8 * c)


# JFIF's full-range YCbCr, the transform JPEG files use (ITU-T T.871)
_TO_YCBCR = np.array([[0.299, 0.587, 0.114],
                      [-0.168735892, -0.331264108, 0.5],
                      [0.5, -0.418687589, -0.081312411]])
_FROM_YCBCR = np.array([[1.0, 0.0, 1.402],
                        [1.0, -0.344136286, -0.714136286],
                        [1.0, 1.772, 0.0]])
_CHROMA_OFFSET = np.array([0.0, 128.0, 128.0])


def rgb_to_ycbcr(rgb):
    """JFIF's YCbCr planes (y, cb, cr) of float RGB (H, W, 3) in [0, 255]."""
    ycc = rgb @ _TO_YCBCR.T + _CHROMA_OFFSET
    return ycc[..., 0], ycc[..., 1], ycc[..., 2]


def ycbcr_to_rgb(y, cb, cr):
    """Inverse of `rgb_to_ycbcr`: float RGB (H, W, 3), not clipped."""
    return (np.stack([y, cb, cr], axis=-1) - _CHROMA_OFFSET) @ _FROM_YCBCR.T


def _frame_check(data):
    """ProjectionUnavailable unless the frame is 8-bit DCT with Huffman coding, 1 or 3
    components."""
    try:
        for marker, payload in iter_segments(data):
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
                if marker not in _DCT_HUFFMAN:
                    raise ProjectionUnavailable(_SOF_REASONS.get(marker, f"SOF marker {marker:#x}"))
                precision, n = payload[0], payload[5]
                if precision != 8:
                    raise ProjectionUnavailable(f"{precision}-bit samples")
                if n not in (1, 3):
                    raise ProjectionUnavailable(f"{n} components (CMYK or YCCK)" if n == 4
                                                else f"{n} components")
                return
    except (JpegHeaderError, IndexError, struct.error) as exc:
        raise ProjectionUnavailable(f"unreadable header ({exc})") from None
    raise ProjectionUnavailable("no frame (SOF) segment")


def read_coefficients(data):
    """The JpegCoefficients of JPEG bytes; ProjectionUnavailable (with the reason) if unusable."""
    _frame_check(data)
    import jpeglib  # only where a projection is asked for

    handle, path = tempfile.mkstemp(suffix=".jpg")  # jpeglib reads files
    try:
        with os.fdopen(handle, "wb") as f:
            f.write(data)
        try:
            jpeg = jpeglib.read_dct(path)
            planes = [jpeg.Y] + ([jpeg.Cb, jpeg.Cr] if jpeg.has_chrominance else [])
            space = str(jpeg.jpeg_color_space)
            height, width, tables = jpeg.height, jpeg.width, jpeg.qt
            table_ids, sampling = jpeg.quant_tbl_no, np.asarray(jpeg.samp_factor)
        except Exception as exc:  # libjpeg's errors arrive as several exception types
            raise ProjectionUnavailable(f"libjpeg cannot read its coefficients "
                                        f"({' '.join(str(exc).split())[:200]})") from None
    finally:
        os.unlink(path)
    if "RGB" in space:
        raise ProjectionUnavailable("RGB components (no YCbCr transform)")
    v_max, h_max = sampling[:, 0].max(), sampling[:, 1].max()
    components = []
    for i, plane in enumerate(planes):
        v, h = sampling[i]
        if v_max % v or h_max % h:
            raise ProjectionUnavailable(f"sampling factors {sampling.tolist()}")
        components.append(Component(np.asarray(plane, dtype=np.float64),
                                    np.asarray(tables[table_ids[i]], dtype=np.float64),
                                    (int(v_max // v), int(h_max // h))))
    return JpegCoefficients(int(height), int(width), tuple(components))


def _pad_to(plane, rows, cols):
    return np.pad(plane, ((0, max(0, rows - plane.shape[0])), (0, max(0, cols - plane.shape[1]))),
                  mode="edge")[:rows, :cols]


def posterior_mean(estimate, k, step):
    """Per coefficient, the mean of N(estimate, s^2) truncated to [(k - 1/2) q, (k + 1/2) q].

    The restoration is read as a noisy measurement of the true coefficient, whose noise variance
    s^2 is estimated per frequency from the image itself: the mean of (estimate - k q)^2 over
    its blocks, less the q^2 / 12 that the quantization alone explains (a network that returns
    the truth gives s = 0, and this is the projection). Where the restoration strays by more
    than the quantization step can explain, the result moves from it towards the file's own
    value k q; it always stays in the interval.
    """
    centre, low, high = k * step, (k - 0.5) * step, (k + 0.5) * step
    spread = ((estimate - centre) ** 2).reshape(-1, 64).mean(axis=0).reshape(8, 8)
    sigma = np.sqrt(np.maximum(spread - step ** 2 / 12.0, 0.0))
    clipped = np.clip(estimate, low, high)
    if not sigma.any():
        return clipped
    with np.errstate(divide="ignore", invalid="ignore"):
        a, b = (low - estimate) / sigma, (high - estimate) / sigma
        mass = (torch.special.ndtr(torch.from_numpy(b))
                - torch.special.ndtr(torch.from_numpy(a))).numpy()
        density = (np.exp(-0.5 * a * a) - np.exp(-0.5 * b * b)) / np.sqrt(2 * np.pi)
        mean = estimate + sigma * density / mass
    # sigma 0, or an interval so far in the tail that the ratio is lost: the nearest edge
    usable = (sigma > 0) & (mass > 1e-9) & np.isfinite(mean)
    return np.where(usable, np.clip(mean, low, high), clipped)


METHODS = {"clip": lambda estimate, k, step: np.clip(estimate, (k - 0.5) * step,
                                                      (k + 0.5) * step),
           "posterior": posterior_mean}
PROJECTION_METHODS = ("calibrated", *METHODS)


def _grid_dct(plane, factor, rows=None, cols=None):
    """The DCT coefficients (R, C, 8, 8) of a full-size float plane as an encoder stores it at
    sampling `factor`: edge-padded to `rows` x `cols` (default: whole blocks of the sampling),
    box-averaged to the sampling (libjpeg's downsampling), level-shifted."""
    (fy, fx), (height, width) = factor, plane.shape
    rows = rows or 8 * fy * -(-height // (8 * fy))
    cols = cols or 8 * fx * -(-width // (8 * fx))
    padded = _pad_to(plane, rows, cols)
    stored = padded.reshape(rows // fy, fy, cols // fx, fx).mean(axis=(1, 3))
    return block_dct(stored - 128)


def _stored_dct(plane, component):
    """`_grid_dct` on the file's own blocks of `component`."""
    (fy, fx), (r, c) = component.factor, component.coefficients.shape[:2]
    return _grid_dct(plane, component.factor, 8 * r * fy, 8 * c * fx)


def _to_full_size(samples, factor, height, width):
    """Samples at sampling `factor` brought to full size (bilinear, centred as libjpeg's fancy
    upsampling) and cropped to the image."""
    fy, fx = factor
    if (fy, fx) != (1, 1):
        samples = cv2.resize(samples, (samples.shape[1] * fx, samples.shape[0] * fy),
                             interpolation=cv2.INTER_LINEAR)
    return samples[:height, :width]


_LEVEL = {np.dtype(np.uint8): 1.0, np.dtype(np.uint16): 257.0}  # one 8-bit level, per dtype


def _planes(img):
    """Float planes on the 8-bit scale of a uint8 or uint16 image: [gray] or [Y, Cb, Cr]."""
    pixels = img.astype(np.float64) / _LEVEL[img.dtype]
    return [pixels] if img.ndim == 2 else list(rgb_to_ycbcr(pixels))


def _image(planes, dtype=np.uint8):
    out = (planes[0] if len(planes) == 1 else ycbcr_to_rgb(*planes)) * _LEVEL[np.dtype(dtype)]
    return np.clip(np.rint(out), 0, np.iinfo(dtype).max).astype(dtype)


TWIN_SHIFT = 4  # pixels: the twin's block grid sits half a block off the file's
CALIBRATION_WINDOW = 768  # pixels: the largest side of the window the shares are learned on


def _window(height, width, size=CALIBRATION_WINDOW):
    """The central window (slices) of at most `size` x `size` pixels, its corner on a multiple
    of 16 pixels so that it starts on a block (and MCU) corner of the file's grid."""
    def span(n):
        start = max(0, (n - size) // 2) // 16 * 16
        return slice(start, min(n, start + size))
    return span(height), span(width)


def calibrate(img, coefficients, restore):
    """Per component, per frequency (8, 8), the share of the restoration's departure from the
    file's value to keep, learned on a twin whose truth is known.

    The twin's truth is `img` clipped into the file's intervals (as detailed as the file allows
    at high QF, as clean as the network made it at low QF), moved by `TWIN_SHIFT` pixels down
    and right (edge-padded) and compressed with the file's own tables and sampling, so its
    blocks fall half a block off the ones the network already cleaned (on the file's own grid
    the compression would give back nearly the file, and teach nothing). `restore` (the
    network and options that made `img`) restores the twin, and the share that best brings
    that restoration back to its truth (least squares per frequency, in [0, 1]) is returned.
    The shares are statistics of the image, so they are learned on its central
    `CALIBRATION_WINDOW` window: on a large photo the second pass costs a fixed fraction of a
    megapixel, not a second restoration. A network that restores its twin well keeps its
    departures (1); one that paints detail flat or invents it, as a small network does at
    QF 90 to 100, is drawn back towards the file's values (towards 0).
    """
    twin = make_twin(img, coefficients)
    return twin_shares(twin, restore(twin.image))


class Twin(NamedTuple):
    """A calibration's twin JPEG (`image`, uint8, to be restored as the file was) and what its
    shares are measured against: per component, the truth's departure from the twin's stored
    values and those values."""
    image: np.ndarray
    truths: list
    components: tuple


def _window_coefficients(coefficients, rows, cols):
    """The file's coefficients of the blocks under a window that starts on a block corner of
    every component (a JpegCoefficients of the window's size), or None where it does not."""
    components = []
    for component in coefficients.components:
        fy, fx = component.factor
        if rows.start % (8 * fy) or cols.start % (8 * fx):
            return None
        r0, c0 = rows.start // (8 * fy), cols.start // (8 * fx)
        r1, c1 = -(-rows.stop // (8 * fy)), -(-cols.stop // (8 * fx))
        components.append(component._replace(coefficients=component.coefficients[r0:r1, c0:c1]))
    return JpegCoefficients(rows.stop - rows.start, cols.stop - cols.start, tuple(components))


def make_twin(img, coefficients):
    """The Twin of `calibrate` for the restoration `img` of the file with `coefficients`."""
    pad = ((TWIN_SHIFT, 0), (TWIN_SHIFT, 0)) + ((0, 0),) * (img.ndim - 2)
    rows, cols = _window(*img.shape[:2])
    window = _window_coefficients(coefficients, rows, cols)
    if window is None:  # a sampling whose blocks the window does not start on: clip it all
        clipped = project(img, coefficients, "clip")[rows, cols]
    else:  # the window alone: a large photo's second pass costs the window, not the photo
        clipped = project(np.ascontiguousarray(img[rows, cols]), window, "clip")
    source = np.pad(clipped, pad, mode="edge")
    height, width = source.shape[:2]
    planes = _planes(source)
    components = coefficients.components[:len(planes)]  # a gray image: the file's Y alone
    truths = []
    for i, component in enumerate(components):
        truth = _grid_dct(planes[i], component.factor)
        centre = np.round(truth / component.table) * component.table
        planes[i] = _to_full_size(block_idct(centre) + 128, component.factor, height, width)
        truths.append((truth - centre, centre))
    return Twin(_image(planes), truths, components)


def twin_shares(twin, restored):
    """The shares of `calibrate`, from the Twin and its restoration (uint8 or uint16)."""
    restored = _planes(restored)
    shares = []
    for i, component in enumerate(twin.components):
        departure, centre = twin.truths[i]
        estimate = _grid_dct(restored[i], component.factor) - centre
        num = (departure * estimate).sum(axis=(0, 1))
        den = (estimate * estimate).sum(axis=(0, 1))
        shares.append(np.clip(np.divide(num, den, out=np.ones_like(num), where=den > 1e-9),
                              0.0, 1.0))
    return shares


def _project_plane(plane, component, method="posterior", share=None):
    """Bring one full-size float plane (level-shifted by -128 inside) into a component's box;
    returns the corrected full-size plane."""
    coefficients = _stored_dct(plane, component)
    k, step = component.coefficients, component.table
    if share is not None:  # calibrated: the kept share of the departure from the file's value
        centre = k * step
        projected = np.clip(centre + share * (coefficients - centre), centre - step / 2,
                            centre + step / 2)
    else:
        projected = METHODS[method](coefficients, k, step)
    correction = block_idct(projected - coefficients)
    return plane + _to_full_size(correction, component.factor, *plane.shape)


def project(img, coefficients, method="posterior", restore=None, shares=None):
    """The restored image (RGB HxWx3, gray HxW or HxWx1; uint8, or uint16 whose levels are 257
    times the file's) made consistent with the file, in the same type.

    `method` "clip" is the projection onto the constraint set (each coefficient clipped into
    its interval); "posterior" takes, inside the same intervals, the posterior mean of
    `posterior_mean`, which equals the clip for a restoration the file cannot fault and leans
    towards the file's own values for one that strays by more than the quantization explains;
    "calibrated" keeps, per frequency, the share of the restoration's departure from the
    file's value that `calibrate` learns on a twin JPEG with `restore` (the network and options
    that made `img`, run once more; or the `shares` already learned, as `twin_shares` gives
    them for a batch of twins restored together), then clips. A gray image is brought
    to the file's Y component; a colour image from a gray file gets its Y done and its chroma
    kept. Raises ProjectionUnavailable when the sizes differ.
    """
    if method not in METHODS and method != "calibrated":
        raise ValueError(f"unknown projection method {method!r}: {', '.join(PROJECTION_METHODS)}")
    if img.shape[:2] != (coefficients.height, coefficients.width):
        raise ProjectionUnavailable(f"the image is {img.shape[1]}x{img.shape[0]}, the file "
                                    f"{coefficients.width}x{coefficients.height}")
    if img.ndim == 3 and img.shape[2] == 1:
        inner = None if restore is None else (lambda x: restore(x[:, :, None])[:, :, 0])
        return project(img[:, :, 0], coefficients, method, inner, shares)[:, :, None]
    if method != "calibrated":
        shares = [None] * len(coefficients.components)
    elif shares is None:
        if restore is None:
            raise ValueError("the calibrated projection needs the restore function")
        shares = calibrate(img, coefficients, restore)
    planes = _planes(img)
    for i, component in enumerate(coefficients.components[:len(planes)]):
        planes[i] = _project_plane(planes[i], component, method, shares[i])
    return _image(planes, img.dtype)
