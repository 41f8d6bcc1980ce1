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

Inside the intervals, two ways to pick the result (`METHODS`): "clip", the projection itself,
and "posterior" (the default), which reads the restoration as a noisy measurement of each
coefficient, estimates that noise per frequency from the image, and takes the mean of the
measurement's distribution truncated to the interval: the clip when the file cannot fault the
restoration, nearer the file's own value where the restoration strays by more than the
quantization explains (a lite network at QF 95 to 100, whose clipped output sits at the
intervals' edges). Both results are consistent with the file.

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
           "project", "posterior_mean", "METHODS", "rgb_to_ycbcr", "ycbcr_to_rgb", "block_dct",
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


def _project_plane(plane, component, method="posterior"):
    """Bring one full-size float plane (level-shifted by -128 inside) into a component's box;
    returns the corrected full-size plane."""
    height, width = plane.shape
    (fy, fx), (r, c) = component.factor, component.coefficients.shape[:2]
    padded = _pad_to(plane, 8 * r * fy, 8 * c * fx)
    stored = padded.reshape(8 * r, fy, 8 * c, fx).mean(axis=(1, 3))  # the encoder's box filter
    coefficients = block_dct(stored - 128)
    projected = METHODS[method](coefficients, component.coefficients, component.table)
    correction = block_idct(projected - coefficients)
    if (fy, fx) != (1, 1):
        correction = cv2.resize(correction, (8 * c * fx, 8 * r * fy),
                                interpolation=cv2.INTER_LINEAR)
    return plane + correction[:height, :width]


def project(img, coefficients, method="posterior"):
    """The restored uint8 image (RGB HxWx3, gray HxW or HxWx1) made consistent with the file.

    `method` "clip" is the projection onto the constraint set (each coefficient clipped into
    its interval); "posterior" (the default) takes, inside the same intervals, the posterior
    mean of `posterior_mean`, which equals the clip for a restoration the file cannot fault and
    leans towards the file's own values for one that strays by more than the quantization
    explains. A gray image is brought to the file's Y component; a colour image from a gray
    file gets its Y done and its chroma kept. Raises ProjectionUnavailable when the sizes
    differ.
    """
    if img.shape[:2] != (coefficients.height, coefficients.width):
        raise ProjectionUnavailable(f"the image is {img.shape[1]}x{img.shape[0]}, the file "
                                    f"{coefficients.width}x{coefficients.height}")
    if img.ndim == 3 and img.shape[2] == 1:
        return project(img[:, :, 0], coefficients, method)[:, :, None]
    pixels = img.astype(np.float64)
    if img.ndim == 2:
        out = _project_plane(pixels, coefficients.components[0], method)
    else:
        planes = list(rgb_to_ycbcr(pixels))
        for i, component in enumerate(coefficients.components):
            planes[i] = _project_plane(planes[i], component, method)
        out = ycbcr_to_rgb(*planes)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
