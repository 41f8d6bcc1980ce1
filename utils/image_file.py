"""A user's image file as the network should see it.

This module owns reading one input file for restoring: its bytes, its JPEG header when it is
a JPEG (decoded as stored, so the network sees the file's own 8x8 grid, with the EXIF
orientation kept aside to turn the result), colour or gray (a one-component JPEG, or three
equal channels, is gray unless the caller says), and its ICC profile. Decoding refuses empty,
truncated and oversized files before OpenCV sees them (utils/image.py `decode_uint8`).
"""
from dataclasses import dataclass

import cv2
import numpy as np

from utils.image import decode_uint8, read_file_bytes
from utils.image_meta import read_icc_profile, read_orientation
from utils.jpeg_header import JpegHeaderError, is_jpeg, parse_jpeg

__all__ = ["Decoded", "read_image"]


@dataclass
class Decoded:
    """An input as the network sees it: pixels in stored orientation, RGB or gray."""
    img: np.ndarray
    gray: bool
    orientation: int  # EXIF orientation still to apply to the result (1 = none)
    icc: object  # bytes or None
    jpeg_info: object  # utils.jpeg_header.JpegInfo, or None for other formats
    data: bytes = b""  # the file's bytes (the projection reads a JPEG's coefficients from them)


def read_image(path, channels="auto"):
    """Read one input file; raises ImageReadError, naming the file, when it cannot be used.

    Decoding goes through utils/image.py's `decode_uint8`, which refuses empty, truncated and
    oversized files (decompression bombs) before OpenCV sees them and rounds 16-bit pixels.
    """
    data = read_file_bytes(path)
    info = None
    if is_jpeg(data):
        try:
            info = parse_jpeg(data)
        except JpegHeaderError:
            info = None  # let the decoder judge; only --qf header needs the tables
    flags = cv2.IMREAD_COLOR
    orientation = 1
    if info is not None:
        # decode as stored so the network sees the file's own 8x8 grid; turn the result after
        flags |= cv2.IMREAD_IGNORE_ORIENTATION
        orientation = read_orientation(data)
    gray = channels == "gray" or (channels == "auto" and info is not None
                                  and info.n_components == 1)
    if gray and info is not None:
        flags = (flags & ~cv2.IMREAD_COLOR) | cv2.IMREAD_GRAYSCALE
    img = decode_uint8(data, flags, path)
    if img.ndim == 3:
        if (channels == "auto" and info is None and np.array_equal(img[..., 0], img[..., 1])
                and np.array_equal(img[..., 1], img[..., 2])):
            gray = True
        if gray:
            img = img[..., 0] if channels == "auto" else cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
        else:
            img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    return Decoded(np.ascontiguousarray(img), gray, orientation, read_icc_profile(data), info,
                   data)
