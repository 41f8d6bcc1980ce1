"""Consistency with the file: project a restored image onto its JPEG's quantization constraint set.

This module owns what a JPEG file says about the image it was made from. Each 8x8 DCT
coefficient was stored as an integer k with step q, so the truth lay in [(k - 1/2) q,
(k + 1/2) q]; the set of such images is convex and holds the truth, so clipping a restoration's
coefficients into their intervals never moves it away from the truth (jpeg2png and knusperli do
the same). Exact for luma and gray files; chroma is box-averaged to the file's sampling,
projected there, and the correction brought back bilinearly (libjpeg's centred upsampling).
Inside the intervals: "clip"; "posterior" (the mean of the restoration read as a noisy
measurement, truncated to the interval); "calibrated" (main_restore's default): a twin JPEG,
the clipped restoration shifted half a block and compressed with the file's own tables
(`make_twin`), is restored by the same network, and per component and frequency the
least-squares share of the departure from the file's value that brought the twin back
(`twin_shares`, in [0, 1]) is the share kept, then clipped. The arithmetic is float32 on
torch tensors, every plane's blocks in two matrix products with the 8x8 DCT.
Coefficients and tables are read by jpeglib (libjpeg itself; wheels for Linux, macOS, Windows),
imported only when a projection runs; `ProjectionUnavailable` names files it cannot use (CMYK,
12-bit, arithmetic, lossless or hierarchical JPEG, RGB components).
"""
import os
import struct
import tempfile
from typing import NamedTuple

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from utils.jpeg_header import JpegHeaderError, iter_segments

__all__ = ["ProjectionUnavailable", "Component", "JpegCoefficients", "read_coefficients",
           "project", "Twin", "make_twin", "twin_shares", "PROJECTION_METHODS", "block_dct",
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


_D = {torch.float64: torch.from_numpy(_dct_matrix())}  # JPEG's DCT: the orthonormal DCT-II
_D[torch.float32] = _D[torch.float64].float()


# Coefficients are kept "planar", (R, 8, C, 8): coefficient (u, v) of block (r, c) at
# [r, u, c, v], which is the plane's own memory order, so a plane's DCT is two matrix products
# with no reordering, and a table (8, 8) broadcasts as (1, 8, 1, 8).
def _dct(plane):
    """(8R, 8C) tensor -> (R, 8, C, 8) DCT coefficients of its 8x8 blocks."""
    d = _D[plane.dtype]
    r, c = plane.shape[0] // 8, plane.shape[1] // 8
    return (d @ plane.reshape(r, 8, 8 * c)).reshape(r, 8, c, 8) @ d.T


def _idct(coefficients):
    """(R, 8, C, 8) tensor -> (8R, 8C) samples."""
    d = _D[coefficients.dtype]
    r, c = coefficients.shape[0], coefficients.shape[2]
    return (d.T @ (coefficients @ d).reshape(r, 8, 8 * c)).reshape(8 * r, 8 * c)


def _planar(table):
    """An (8, 8) array (a table, shares) as a (1, 8, 1, 8) float32 tensor."""
    return torch.from_numpy(np.asarray(table, dtype=np.float32)).reshape(1, 8, 1, 8)


def block_dct(plane):
    """(8R, 8C) samples -> (R, C, 8, 8) DCT coefficients of each 8x8 block (numpy)."""
    return _dct(torch.from_numpy(np.asarray(plane, dtype=np.float64))).permute(0, 2, 1, 3).numpy()


def block_idct(coefficients):
    """(R, C, 8, 8) DCT coefficients -> (8R, 8C) samples (numpy)."""
    coefficients = torch.from_numpy(np.asarray(coefficients, dtype=np.float64))
    return _idct(coefficients.permute(0, 2, 1, 3).contiguous()).numpy()


# JFIF's full-range YCbCr, the transform JPEG files use (ITU-T T.871)
_TO_YCBCR = np.array([[0.299, 0.587, 0.114],
                      [-0.168735892, -0.331264108, 0.5],
                      [0.5, -0.418687589, -0.081312411]])
_FROM_YCBCR = np.array([[1.0, 0.0, 1.402],
                        [1.0, -0.344136286, -0.714136286],
                        [1.0, 1.772, 0.0]])
_CHROMA_OFFSET = np.array([0.0, 128.0, 128.0])


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
        components.append(Component(np.asarray(plane, dtype=np.float32),
                                    np.asarray(tables[table_ids[i]], dtype=np.float32),
                                    (int(v_max // v), int(h_max // h))))
    return JpegCoefficients(int(height), int(width), tuple(components))


def _posterior(estimate, k, step):
    """Per coefficient (planar tensors (R, 8, C, 8), `step` (1, 8, 1, 8)), the mean of
    N(estimate, s^2) truncated to [(k - 1/2) q, (k + 1/2) q]. The restoration is read as a noisy
    measurement of the true coefficient, whose noise variance s^2 is estimated per frequency
    from the image itself: the mean of (estimate - k q)^2 over its blocks, less the q^2 / 12
    that the quantization alone explains (a network that returns the truth gives s = 0, and
    this is the clip). Where the restoration strays by more than the quantization can explain,
    the result moves towards the file's own value k q; it always stays in the interval."""
    centre, low, high = k * step, (k - 0.5) * step, (k + 0.5) * step
    spread = ((estimate - centre) ** 2).mean(dim=(0, 2), keepdim=True)
    sigma = torch.sqrt(torch.clamp(spread - step ** 2 / 12.0, min=0.0))
    clipped = torch.minimum(torch.maximum(estimate, low), high)
    if not sigma.any():
        return clipped
    a, b = (low - estimate) / sigma, (high - estimate) / sigma
    mass = torch.special.ndtr(b) - torch.special.ndtr(a)
    density = (torch.exp(-0.5 * a * a) - torch.exp(-0.5 * b * b)) / np.sqrt(2 * np.pi)
    mean = estimate + sigma * density / mass
    # sigma 0, or an interval so far in the tail that the ratio is lost: the nearest edge
    usable = (sigma > 0) & (mass > 1e-9) & torch.isfinite(mean)
    return torch.where(usable, torch.minimum(torch.maximum(mean, low), high), clipped)


def _kept(departure, step, share):
    """The kept departure from the file's value: `share` of it (None: all of it), clipped to
    the interval of half a step either side."""
    kept = departure.clone() if share is None else departure * share
    return kept.clamp_(min=-step / 2, max=step / 2)


PROJECTION_METHODS = ("calibrated", "clip", "posterior")


def _grid_dct(plane, factor, rows=None, cols=None):
    """The planar DCT coefficients (R, 8, C, 8) of a full-size float plane (tensor) as an encoder
    stores it at sampling `factor`: edge-padded to `rows` x `cols` (default: whole blocks of the
    sampling), box-averaged to the sampling (libjpeg's downsampling), level-shifted."""
    (fy, fx), (height, width) = factor, plane.shape
    rows = rows or 8 * fy * -(-height // (8 * fy))
    cols = cols or 8 * fx * -(-width // (8 * fx))
    padded = plane[:rows, :cols]
    if padded.shape != (rows, cols):
        padded = F.pad(padded[None, None], (0, cols - padded.shape[1], 0, rows - padded.shape[0]),
                       mode="replicate")[0, 0]
    if (fy, fx) != (1, 1):
        padded = F.avg_pool2d(padded[None, None], (fy, fx))[0, 0]
    return _dct(padded - 128)


def _stored_dct(plane, component):
    """`_grid_dct` on the file's own blocks of `component`."""
    (fy, fx), (r, c) = component.factor, component.coefficients.shape[:2]
    return _grid_dct(plane, component.factor, 8 * r * fy, 8 * c * fx)


def _to_full_size(samples, factor, height, width):
    """Samples at sampling `factor` brought to full size (bilinear, centred as libjpeg's fancy
    upsampling) and cropped to the image."""
    fy, fx = factor
    if (fy, fx) != (1, 1):
        samples = torch.from_numpy(cv2.resize(samples.numpy(), (samples.shape[1] * fx,
                                                                samples.shape[0] * fy),
                                              interpolation=cv2.INTER_LINEAR))
    return samples[:height, :width]


_LEVEL = {np.dtype(np.uint8): 1.0, np.dtype(np.uint16): 257.0}  # one 8-bit level, per dtype
_TO_YCBCR_T = torch.from_numpy(_TO_YCBCR).float()
_FROM_YCBCR_T = torch.from_numpy(_FROM_YCBCR).float()
_CHROMA_OFFSET_T = torch.from_numpy(_CHROMA_OFFSET).float()[:, None]


def _planes(img):
    """float32 tensor planes on the 8-bit scale of a uint8 or uint16 image: [gray] or
    [Y, Cb, Cr]."""
    if img.ndim == 2:
        pixels = torch.from_numpy(img.astype(np.float32))
        return [pixels / _LEVEL[img.dtype] if img.dtype != np.uint8 else pixels]
    rgb = torch.from_numpy(img).permute(2, 0, 1).reshape(3, -1).float()
    scale = _TO_YCBCR_T / _LEVEL[img.dtype]
    return list(torch.addmm(_CHROMA_OFFSET_T, scale, rgb).reshape(3, *img.shape[:2]).unbind(0))


def _image(planes, dtype=np.uint8):
    level = _LEVEL[np.dtype(dtype)]
    if len(planes) == 1:
        out = planes[0] * level if level != 1 else planes[0].clone()
    else:
        ycc = torch.stack(planes).reshape(3, -1) - _CHROMA_OFFSET_T
        out = (_FROM_YCBCR_T * level) @ ycc
        out = out.reshape(3, *planes[0].shape).permute(1, 2, 0)
    out = out.round_().clamp_(0, np.iinfo(dtype).max)
    if np.dtype(dtype) == np.uint8:
        return out.to(torch.uint8).contiguous().numpy()
    return out.to(torch.int32).contiguous().numpy().astype(dtype)


TWIN_SHIFT = 4  # pixels: the twin's block grid sits half a block off the file's
CALIBRATION_WINDOW = 768  # pixels: the largest side of the window the shares are learned on


def _window(height, width, size=CALIBRATION_WINDOW):
    """The central window (slices) of at most `size` x `size` pixels, its corner on a multiple
    of 16 pixels so that it starts on a block (and MCU) corner of the file's grid."""
    def span(n):
        start = max(0, (n - size) // 2) // 16 * 16
        return slice(start, min(n, start + size))
    return span(height), span(width)


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


def _k_and_step(component):
    """A component's quantized coefficients (planar, R x 8 x C x 8) and table (1, 8, 1, 8)."""
    k = torch.from_numpy(component.coefficients).permute(0, 2, 1, 3).float().contiguous()
    return k, _planar(component.table)


def make_twin(img, coefficients):
    """The calibration's twin of the restoration `img` of the file with `coefficients`.

    The twin's truth is `img` clipped into the file's intervals (as detailed as the file allows
    at high QF, as clean as the network made it at low QF), moved by `TWIN_SHIFT` pixels down
    and right (edge-padded) and compressed with the file's own tables and sampling, so its
    blocks fall half a block off the ones the network already cleaned. Only the central
    `CALIBRATION_WINDOW` window is used: the shares are statistics of the image, and a large
    photo's second pass then costs a fixed fraction of a megapixel."""
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
        step = _planar(component.table)
        truth = _grid_dct(planes[i], component.factor)
        centre = torch.round(truth / step) * step
        planes[i] = _to_full_size(_idct(centre) + 128, component.factor, height, width)
        truths.append((truth - centre, centre))
    return Twin(_image(planes), truths, components)


def twin_shares(twin, restored):
    """Per component, per frequency (8, 8), the share of the restoration's departure from the
    file's value to keep: the least-squares share, in [0, 1], that brings the twin's
    restoration (uint8 or uint16; made by the network and options that made the image) back
    to the twin's truth. A network that restores its twin well keeps its departures (1); one
    that paints detail flat or invents it is drawn back towards the file's values (0)."""
    restored = _planes(restored)
    shares = []
    for i, component in enumerate(twin.components):
        departure, centre = twin.truths[i]
        estimate = (_grid_dct(restored[i], component.factor) - centre).double()
        num = (departure.double() * estimate).sum(dim=(0, 2))
        den = (estimate * estimate).sum(dim=(0, 2))
        share = torch.where(den > 1e-9, num / den.clamp(min=1e-9), torch.ones_like(num))
        shares.append(share.clamp(0.0, 1.0).numpy())
    return shares


def _project_plane(plane, component, method="calibrated", share=None):
    """Bring one full-size float plane (a tensor, level-shifted by -128 inside) into a
    component's box; returns the corrected full-size plane. `share`: the calibrated shares
    (8, 8); None with "calibrated" keeps every departure (the clip)."""
    coefficients = _stored_dct(plane, component)
    k, step = _k_and_step(component)
    if method == "posterior":
        correction = _posterior(coefficients, k, step) - coefficients
    else:  # the clip, and the calibrated share of the departure from the file's value
        # in place on the plane's own coefficients (12 MP planes are large); `k` may share the
        # file's memory (a one-block-wide plane needs no copy to be planar): never written
        departure = coefficients.sub_(k * step)
        correction = _kept(departure, step, None if share is None else _planar(share))
        correction -= departure
    return plane.add_(_to_full_size(_idct(correction), component.factor, *plane.shape))


def project(img, coefficients, method, shares=None):
    """The restored image (RGB HxWx3, gray HxW or HxWx1; uint8, or uint16 whose levels are 257
    times the file's) made consistent with the file, in the same type.

    `method` "clip" is the projection onto the constraint set (each coefficient clipped into
    its interval); "posterior" takes, inside the same intervals, the posterior mean of
    `_posterior`; "calibrated" keeps, per frequency, the `shares` of the departure from
    the file's value that a twin taught (`make_twin`, `twin_shares`), then clips. A gray image
    is brought to the file's Y component; a colour image from a gray file gets its Y done and
    its chroma kept. Raises ProjectionUnavailable when the sizes differ.
    """
    if method not in PROJECTION_METHODS:
        raise ValueError(f"unknown projection method {method!r}: {', '.join(PROJECTION_METHODS)}")
    if method == "calibrated" and shares is None:
        raise ValueError("the calibrated projection needs the shares its twin taught")
    if img.shape[:2] != (coefficients.height, coefficients.width):
        raise ProjectionUnavailable(f"the image is {img.shape[1]}x{img.shape[0]}, the file "
                                    f"{coefficients.width}x{coefficients.height}")
    if img.ndim == 3 and img.shape[2] == 1:
        return project(img[:, :, 0], coefficients, method, shares)[:, :, None]
    if method != "calibrated":
        shares = [None] * len(coefficients.components)
    planes = _planes(img)
    for i, component in enumerate(coefficients.components[:len(planes)]):
        planes[i] = _project_plane(planes[i], component, method, shares[i])
    return _image(planes, img.dtype)
