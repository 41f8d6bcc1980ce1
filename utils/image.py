"""Image files and pixel layouts: reading, writing, colour conversion, uint8 <-> tensor.

This module owns how an image file becomes the uint8 array every other module works on: RGB
order for colour (HxWx3), plain HxW for grayscale, decoded by OpenCV exactly as the original
scripts read them. It is the one reader of the test runner, the training datasets and the data
preparation, and refuses a bad file with an `ImageReadError` naming it, so a batch can skip it:
empty, unreadable or truncated files, bytes OpenCV cannot decode, float pixels, and
decompression bombs (width and height read from the header in pure Python, `read_header`,
against `max_pixels()`: FBCNN_MAX_PIXELS, default 100 megapixels; OpenCV's own limit is set to
the same as a backstop). Converted rather than refused: 16-bit pixels, rounded as
round(v / 257); alpha, dropped with the colour kept as stored (as the original scripts do);
palette and gray files read as colour, expanded to RGB. Paths may be str (surrogate-escaped
names included), bytes or path-like, shown through `display_path`. `imwrite` writes atomically:
a failed write leaves no partial image and names the file.
"""
import logging
import os
import struct
from typing import NamedTuple

import cv2
import numpy as np
import torch

from utils import parse_pixel_count
from utils.errors import UserError
from utils.fileio import WriteError, atomic_write_bytes, display_path
from utils.jpeg_header import SOF_MARKERS, JpegHeaderError, JpegTruncatedError, segment_spans

__all__ = ["IMG_EXTENSIONS", "read_file_bytes", "imencode", "ImageReadError", "ImageHeader",
           "MAX_PIXELS_ENV", "DEFAULT_MAX_PIXELS", "max_pixels", "read_header",
           "check_image_bytes", "read_image_header", "decode_uint8", "list_images", "imread_uint",
           "imwrite", "rgb2y_matlab", "uint2tensor", "tensor2uint"]

LOG = logging.getLogger(f"fbcnn.{__name__}")

IMG_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")

MAX_PIXELS_ENV = "FBCNN_MAX_PIXELS"
DEFAULT_MAX_PIXELS = 100_000_000
_HEADER_BYTES = 1 << 12  # enough for every sniffed header but a JPEG with large APP segments


class ImageReadError(UserError):
    """An image file that cannot be used; the message names the file and the reason."""


def max_pixels():
    """The largest width x height accepted: $FBCNN_MAX_PIXELS, else DEFAULT_MAX_PIXELS."""
    text = os.environ.get(MAX_PIXELS_ENV)
    if text is None or not text.strip():
        return DEFAULT_MAX_PIXELS
    value = parse_pixel_count(text)
    if value < 1:
        raise UserError(f"{MAX_PIXELS_ENV}={text!r}: expected a positive number of pixels, "
                        f"e.g. {DEFAULT_MAX_PIXELS}")
    return value


class ImageHeader(NamedTuple):
    """What a file's header says: the format and the stored size (before any EXIF rotation).

    `complete` is False when the file is a JPEG or PNG whose end marker is missing (a truncated
    file); it is only meaningful when the whole file was examined.
    """
    format: str
    width: int
    height: int
    complete: bool = True

    @property
    def pixels(self):
        return self.width * self.height


class _HeaderError(ValueError):
    """A recognised format whose header is cut short or malformed."""


class _NeedMore(_HeaderError):
    """The bytes examined end before the header does (the file may hold the rest)."""


def _unpack(fmt, data, offset):
    if offset + struct.calcsize(fmt) > len(data):
        raise _NeedMore("header ends early")
    return struct.unpack_from(fmt, data, offset)


def _jpeg(data, whole):
    size = None
    try:
        for marker, start, stop in segment_spans(data):
            if marker in SOF_MARKERS:
                height, width = _unpack(">HH", data, start + 1)
                size = (width, height)
            elif marker == 0xDA:  # SOS: the entropy-coded data follows
                if size is None:
                    raise _HeaderError("JPEG scan before any frame header (SOF)")
                complete = True
                if whole:  # no 0xFFD9 can occur inside entropy-coded data (0xFF is stuffed)
                    complete = data.find(b"\xff\xd9", stop) >= 0
                return ImageHeader("JPEG", size[0], size[1], complete)
    except JpegTruncatedError as exc:
        raise _NeedMore(str(exc)) from None
    except JpegHeaderError as exc:
        raise _HeaderError(str(exc)) from None
    raise _HeaderError("JPEG ends (EOI) before any image data")


def _png(data, whole):
    length, kind, width, height = _unpack(">I4sII", data, 8)
    if kind != b"IHDR" or length != 13:
        raise _HeaderError("PNG does not start with an IHDR chunk")
    complete = data.rfind(b"IEND") > 8 if whole else True
    return ImageHeader("PNG", width, height, complete)


def _bmp(data, whole):
    (dib_size,) = _unpack("<I", data, 14)
    if dib_size == 12:  # OS/2 BITMAPCOREHEADER
        width, height = _unpack("<HH", data, 18)
    else:
        width, height = _unpack("<ii", data, 18)
    return ImageHeader("BMP", abs(width), abs(height))  # negative height: stored top-down


def _gif(data, whole):
    width, height = _unpack("<HH", data, 6)
    return ImageHeader("GIF", width, height)


def _webp(data, whole):
    (chunk,) = _unpack("4s", data, 12)
    if chunk == b"VP8 ":
        width, height = _unpack("<HH", data, 26)
        return ImageHeader("WebP", width & 0x3FFF, height & 0x3FFF)
    if chunk == b"VP8L":
        (bits,) = _unpack("<I", data, 21)
        return ImageHeader("WebP", (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1)
    if chunk == b"VP8X":
        w0, w1, w2, h0, h1, h2 = _unpack("6B", data, 24)
        return ImageHeader("WebP", (w0 | w1 << 8 | w2 << 16) + 1, (h0 | h1 << 8 | h2 << 16) + 1)
    raise _HeaderError(f"unknown WebP chunk {chunk!r}")


def _tiff(data, whole):
    order = "<" if data[:2] == b"II" else ">"
    (ifd,) = _unpack(order + "I", data, 4)
    (count,) = _unpack(order + "H", data, ifd)
    values = {}
    for i in range(count):
        tag, kind, n = _unpack(order + "HHI", data, ifd + 2 + 12 * i)
        if tag in (256, 257) and n == 1:
            fmt = order + ("H" if kind == 3 else "I")
            (values[tag],) = _unpack(fmt, data, ifd + 2 + 12 * i + 8)
    if 256 not in values or 257 not in values:
        raise _HeaderError("TIFF without ImageWidth/ImageLength")
    return ImageHeader("TIFF", values[256], values[257])


def _pnm(data, whole):
    tokens, pos, end = [], 2, min(len(data), 4096)
    while len(tokens) < 2:
        while pos < end and data[pos:pos + 1].isspace():
            pos += 1
        if pos < end and data[pos] == ord("#"):
            while pos < end and data[pos] not in b"\r\n":
                pos += 1
            continue
        start = pos
        while pos < end and data[pos:pos + 1].isdigit():
            pos += 1
        if pos == start:
            raise _NeedMore("PNM header ends before its width and height")
        tokens.append(int(data[start:pos]))
    return ImageHeader("PNM", tokens[0], tokens[1])


_SIGNATURES = (
    (b"\xff\xd8\xff", _jpeg), (b"\x89PNG\r\n\x1a\n", _png), (b"BM", _bmp),
    (b"GIF87a", _gif), (b"GIF89a", _gif), (b"II*\x00", _tiff), (b"MM\x00*", _tiff),
    *((b"P" + bytes([c]), _pnm) for c in b"123456"),
)


def read_header(data, whole=True):
    """The ImageHeader of encoded bytes, or None for a format the sniffer does not know.

    `whole` says `data` is the entire file (needed to tell a truncated JPEG or PNG). Raises
    ValueError for a recognised format whose header is cut short or malformed.
    """
    data = bytes(data[:]) if not isinstance(data, bytes) else data
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return _webp(data, whole)
    for signature, parse in _SIGNATURES:
        if data.startswith(signature):
            return parse(data, whole)
    return None


def check_image_bytes(data, path):
    """Refuse, naming `path`, what must not reach the decoder; returns the header or None.

    Checks: empty, header cut short, zero or too many pixels (`max_pixels()`), truncated JPEG
    or PNG. None means a format the sniffer does not know; OpenCV's own limit still applies.
    """
    shown = display_path(path)
    if len(data) == 0:
        raise ImageReadError(f"{shown}: empty file (0 bytes)")
    try:
        header = read_header(data)
    except ValueError as exc:
        raise ImageReadError(f"{shown}: corrupt or truncated image header ({exc})") from None
    if header is None:
        return None
    _check_size(header, shown)
    if not header.complete:
        end = "EOI marker" if header.format == "JPEG" else "IEND chunk"
        raise ImageReadError(f"{shown}: truncated {header.format} file (no {end}); it would "
                             f"decode only partly")
    return header


def _check_size(header, shown):
    if header.width == 0 or header.height == 0:
        raise ImageReadError(f"{shown}: the {header.format} header gives a size of "
                             f"{header.width}x{header.height} pixels")
    limit = max_pixels()
    if header.pixels > limit:
        raise ImageReadError(f"{shown}: the {header.format} header claims {header.width}x"
                             f"{header.height} = {header.pixels:,} pixels, over the limit of "
                             f"{limit:,} (set {MAX_PIXELS_ENV} to allow more); not decoded")


def read_image_header(path):
    """The ImageHeader of the file at `path`, reading only its first bytes (a size check for
    whole folders); raises ImageReadError for what `check_image_bytes` refuses, except
    truncation, and for unknown formats."""
    shown = display_path(path)
    if os.path.isdir(path):
        raise ImageReadError(f"{shown}: a folder, not an image file")
    try:
        with open(path, "rb") as f:
            data = f.read(_HEADER_BYTES)
            if not data:
                raise ImageReadError(f"{shown}: empty file (0 bytes)")
            try:
                header = read_header(data, whole=False)
            except _NeedMore:
                data += f.read()  # a JPEG whose APP segments fill the first block
                header = read_header(data, whole=False)
    except ValueError as exc:
        raise ImageReadError(f"{shown}: corrupt or truncated image header ({exc})") from None
    except OSError as exc:
        raise ImageReadError(f"{shown}: cannot read file ({exc.strerror or exc})") from None
    if header is None:
        raise ImageReadError(f"{shown}: not a PNG, JPEG, BMP, GIF, WebP, TIFF or PNM file "
                             f"(it starts with {data[:8]!r})")
    _check_size(header, shown)
    return header


_warned_16bit = []


def decode_uint8(data, flags, path):
    """`cv2.imdecode(data, flags)` after `check_image_bytes`, always uint8 (BGR or gray).

    16-bit pixels are rounded to 8 bits (round(v / 257)); float pixels are refused. Raises
    ImageReadError naming `path` whenever no image comes out.
    """
    shown = display_path(path)
    header = check_image_bytes(data, path)
    try:
        img = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flags | cv2.IMREAD_ANYDEPTH)
    except cv2.error as exc:  # e.g. over OPENCV_IO_MAX_IMAGE_PIXELS
        detail = " ".join(str(exc).split())[-160:]
        raise ImageReadError(f"{shown}: OpenCV refused to decode it ({detail})") from None
    if img is None or img.size == 0:
        if header is not None and header.format == "TIFF":
            # float TIFFs decode only with their own channel count: say why, not "corrupt"
            raw = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
            if raw is not None and raw.dtype not in (np.uint8, np.uint16):
                raise ImageReadError(f"{shown}: {raw.dtype} pixels are not supported; convert "
                                     f"the file to 8 or 16 bits per channel")
        if header is not None:
            raise ImageReadError(f"{shown}: corrupt {header.format} file (OpenCV could not "
                                 f"decode it)")
        raise ImageReadError(f"{shown}: not an image OpenCV can decode (unknown format; it "
                             f"starts with {bytes(data[:8])!r})")
    if img.dtype == np.uint16:
        if not _warned_16bit:
            _warned_16bit.append(shown)
            LOG.warning("%s: 16-bit pixels rounded to 8 bits (round(v / 257)); the output is "
                        "8-bit (logged once)", shown)
        img = ((img.astype(np.uint32) + 128) // 257).astype(np.uint8)
    elif img.dtype != np.uint8:
        raise ImageReadError(f"{shown}: {img.dtype} pixels are not supported; convert the file "
                             f"to 8 or 16 bits per channel")
    if img.shape[0] * img.shape[1] > max_pixels():  # formats the sniffer did not know
        raise ImageReadError(f"{shown}: {img.shape[1]}x{img.shape[0]} pixels is over the limit "
                             f"of {max_pixels():,} (set {MAX_PIXELS_ENV} to allow more)")
    return img


def list_images(folder):
    """Sorted paths of the image files directly inside `folder` (by extension, case-insensitive)."""
    return sorted(os.path.join(folder, name) for name in os.listdir(folder)
                  if name.lower().endswith(IMG_EXTENSIONS)
                  and os.path.isfile(os.path.join(folder, name)))


def read_file_bytes(path):
    """The bytes of an image file; ImageReadError naming it for a folder or an unreadable file."""
    if os.path.isdir(path):
        raise ImageReadError(f"{display_path(path)}: a folder, not an image file")
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise ImageReadError(f"{display_path(path)}: cannot read file "
                             f"({exc.strerror or exc})") from None


def imread_uint(path, n_channels=3):
    """Read `path` as uint8: HxWx3 RGB when n_channels is 3, HxW grayscale when it is 1.

    Colour is OpenCV's BGR read converted to RGB (a grayscale file becomes three equal channels);
    grayscale is OpenCV's grayscale read, as in the original test scripts. Bad files raise
    ImageReadError naming the file; 16-bit files are rounded to 8 bits and alpha is dropped
    (see the module docstring).
    """
    if n_channels not in (1, 3):
        raise ValueError(f"n_channels must be 1 or 3, got {n_channels}")
    data = read_file_bytes(path)
    img = decode_uint8(data, cv2.IMREAD_GRAYSCALE if n_channels == 1 else cv2.IMREAD_COLOR, path)
    if n_channels == 3:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    return img


def imencode(img, ext, params=()):
    """The bytes of a uint8 HxW or HxWx3 RGB image encoded as `ext` (".png", ".jpg", ...).

    `params` are OpenCV's encoder parameters; raises UserError when OpenCV cannot encode it.
    """
    if img.ndim == 3 and img.shape[2] == 3:
        img = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
    try:
        ok, buf = cv2.imencode(ext, img, list(params))
    except cv2.error:
        ok = False
    if not ok:
        raise UserError(f"OpenCV could not encode a {img.dtype} image of shape {img.shape} as "
                        f"{ext}")
    return buf.tobytes()


def imwrite(path, img, params=()):
    """Write a uint8 HxW or HxWx3 RGB image atomically; the format follows the extension.

    Raises WriteError naming the file when it cannot be encoded or written (a full disk leaves
    no partial file). `params` are OpenCV's encoder parameters.
    """
    ext = os.path.splitext(os.fsdecode(path))[1] or ".png"
    try:
        data = imencode(img, ext, params)
    except UserError as exc:
        raise WriteError(f"{display_path(path)}: {exc}") from None
    atomic_write_bytes(path, data, fsync=False)


def rgb2y_matlab(img):
    """MATLAB-style Y (BT.601, range 16-235) of an RGB uint8 image, rounded to uint8.

    `round((65.481*R + 128.553*G + 24.966*B) / 255 + 16)` in float64: the weighted sum first,
    then one division, as KAIR's `rgb2ycbcr(img, only_y=True)` (utils/utils_image.py) computes
    it. The one Y of the project: the gray training datasets and PSNR-B's colour quirk use it.
    (Dividing each term separately rounds 42 of the 2^24 RGB triples differently; KAIR writes
    the sum as `np.dot`, whose BLAS may order or fuse it otherwise on some machines: 22 triples
    on this project's machine, so the sum here is spelled out.)
    """
    rgb = img.astype(np.float64)
    y = (65.481 * rgb[..., 0] + 128.553 * rgb[..., 1] + 24.966 * rgb[..., 2]) / 255 + 16
    return np.round(y).astype(np.uint8)


def uint2tensor(img):
    """uint8 HxW or HxWxC -> float32 tensor (1, C, H, W) in [0, 1]."""
    if img.ndim == 2:
        img = img[:, :, None]
    tensor = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)
    return tensor.float().div(255.0).unsqueeze(0)


def tensor2uint16(tensor):
    """Tensor (1, C, H, W) or (C, H, W) -> uint16 HxW or HxWx3: clip to [0, 1], x65535, round
    (the network's output at 16 bits, keeping the precision between 8-bit levels)."""
    img = tensor.detach().squeeze(0).float().clamp(0, 1).mul(65535.0).round()
    img = img.to(torch.int32).cpu().permute(1, 2, 0).numpy().astype(np.uint16)
    return img[:, :, 0] if img.shape[2] == 1 else img


def tensor2uint(tensor):
    """Tensor (1, C, H, W) or (C, H, W) -> uint8 HxW or HxWx3: clip to [0, 1], x255, round."""
    img = tensor.detach().squeeze(0).float().clamp(0, 1).mul(255.0).round().byte().cpu()
    img = img.permute(1, 2, 0).numpy()
    return img[:, :, 0] if img.shape[2] == 1 else img
