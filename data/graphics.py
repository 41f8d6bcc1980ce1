"""Graphics in place of photographs: the content natural training tiles never show.

This module owns how a clean photo patch becomes a graphic of the kinds people's JPEGs also
hold, where the lite models trained on photographs alone harm high-quality files (docs/
lite_trials.md 8.14): pixel-level detail that a network reads as JPEG artifacts.
`graphic(patch, rng)` returns a uint8 image of the patch's shape, one kind drawn uniformly:
- `dither`: the patch's luma (or each channel, a colour dither) reduced to two levels by
  Floyd-Steinberg error diffusion, as halftones, scanned prints and GIF-like images are;
- `posterize`: each channel quantized to 2 to 4 levels with an ordered (Bayer) dither;
- `lines`: one-pixel lines every 4 to 16 pixels (grids, tables, charts) over a flat colour;
- `stripes`: stripes or checkerboards of period 2 to 4 pixels in two colours;
- `text`: strings of OpenCV's Hershey fonts, anti-aliased or not, over a flat colour.
Every random draw comes from the explicit `numpy.random.Generator`, so a sample stays a pure
function of the run's seed and its position.
"""
import cv2
import numpy as np

__all__ = ["GRAPHIC_KINDS", "graphic", "neutral_copy"]

GRAPHIC_KINDS = ("dither", "posterize", "lines", "stripes", "text")
_BAYER4 = (np.array([[0, 8, 2, 10], [12, 4, 14, 6], [3, 11, 1, 9], [15, 7, 13, 5]]) + 0.5) / 16
_LUMA = np.array([0.299, 0.587, 0.114])
_GLYPHS = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789 .,:%"))


def _colour(rng, n_channels):
    return rng.integers(0, 256, n_channels).astype(np.float64)


def _error_diffusion(plane):
    """Two levels, 0 and 255, by Floyd-Steinberg error diffusion. Pixel (y, x) waits only for
    pixels of earlier `x + 2y`, so each such anti-diagonal is one vector step."""
    h, w = plane.shape
    error = np.zeros((h + 1, w + 2))  # a row below and a column either side catch the spill
    out = np.empty_like(plane)
    for t in range(w + 2 * (h - 1)):
        y = np.arange(max(0, (t - w + 2) // 2), min(h - 1, t // 2) + 1)
        x = t - 2 * y
        value = plane[y, x] + error[y, x + 1]
        out[y, x] = np.where(value >= 128, 255.0, 0.0)
        e = value - out[y, x]
        for dy, dx, weight in ((0, 1, 7), (1, -1, 3), (1, 0, 5), (1, 1, 1)):
            np.add.at(error, (y + dy, x + 1 + dx), e * weight / 16)
    return out


def _dither(patch, rng):
    if patch.ndim == 3 and rng.random() < 0.5:  # a colour dither: eight colours
        return np.stack([_error_diffusion(patch[..., c]) for c in range(3)], -1)
    luma = patch if patch.ndim == 2 else patch @ _LUMA
    plane = _error_diffusion(luma)
    return plane if patch.ndim == 2 else np.repeat(plane[..., None], 3, -1)


def _posterize(patch, rng):
    levels = int(rng.integers(2, 5))
    h, w = patch.shape[:2]
    threshold = np.tile(_BAYER4, (-(-h // 4), -(-w // 4)))[:h, :w]
    if patch.ndim == 3:
        threshold = threshold[..., None]
    step = 255.0 / (levels - 1)
    return np.floor(patch / step + threshold).clip(0, levels - 1) * step


def _two_colours(rng, n_channels):
    a, b = _colour(rng, n_channels), _colour(rng, n_channels)
    if np.abs(a - b).max() < 64:  # keep the pattern visible: 128 levels apart
        b = (a + 128) % 256
    return a, b


def _lines(shape, rng):
    n_channels = shape[2] if len(shape) == 3 else 1
    background, ink = _two_colours(rng, n_channels)
    out = np.empty(shape[:2] + (n_channels,))
    out[:] = background
    period = int(rng.integers(4, 17))
    phase = int(rng.integers(period))
    if rng.random() < 0.8:
        out[phase::period] = ink
    if rng.random() < 0.8:
        out[:, phase::period] = ink
    return out


def _stripes(shape, rng):
    n_channels = shape[2] if len(shape) == 3 else 1
    a, b = _two_colours(rng, n_channels)
    width = int(rng.integers(1, 3))  # stripes of 1 or 2 pixels: periods 2 and 4
    rows, cols = np.indices(shape[:2]) // width
    pattern = {0: cols, 1: rows, 2: rows + cols}[int(rng.integers(3))] % 2
    return np.where(pattern[..., None] == 1, b, a)


def _text(shape, rng):
    n_channels = shape[2] if len(shape) == 3 else 1
    background, ink = _two_colours(rng, n_channels)
    out = np.empty(shape[:2] + (n_channels,), np.uint8)
    out[:] = background.astype(np.uint8)
    line = cv2.LINE_AA if rng.random() < 0.5 else cv2.LINE_8
    scale = rng.uniform(0.3, 0.9)
    step = max(8, int(30 * scale))
    for y in range(int(rng.integers(step // 2, step)), shape[0] + step, step):
        text = "".join(rng.choice(_GLYPHS, int(rng.integers(8, 30))))
        cv2.putText(out, text, (int(rng.integers(-20, 4)), y), int(rng.integers(0, 4)), scale,
                    tuple(float(v) for v in ink), 1, line)
    return out.astype(np.float64)


def graphic(patch, rng, kind=None, neutral=None):
    """A graphic of `patch`'s shape and dtype (uint8, HxW or HxWx3) of `kind` (None: drawn);
    `dither` and `posterize` are made from the patch itself, the other kinds replace it. A
    colour graphic is `neutral` (None: drawn, one in two) when its luma fills all three
    channels: documents, line art and scans mostly are, and their JPEGs keep such detail."""
    if kind is None:
        kind = GRAPHIC_KINDS[int(rng.integers(len(GRAPHIC_KINDS)))]
    elif kind not in GRAPHIC_KINDS:
        raise ValueError(f"graphic kind {kind!r}: choose one of {', '.join(GRAPHIC_KINDS)}")
    if neutral is None:
        neutral = patch.ndim == 3 and rng.random() < 0.5
    if kind in ("dither", "posterize"):
        out = {"dither": _dither, "posterize": _posterize}[kind](patch.astype(np.float64), rng)
    else:
        out = {"lines": _lines, "stripes": _stripes, "text": _text}[kind](patch.shape, rng)
        out = out.reshape(patch.shape)
    out = np.round(out).clip(0, 255).astype(np.uint8)
    return neutral_copy(out) if neutral and out.ndim == 3 else out


def neutral_copy(img):
    """A uint8 RGB image's luma (JPEG's weights, rounded) in all three channels."""
    luma = np.round(img.astype(np.float64) @ _LUMA).clip(0, 255).astype(np.uint8)
    return np.repeat(luma[..., None], 3, -1)
