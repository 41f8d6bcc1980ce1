"""utils/image_meta.py: EXIF orientation and ICC profiles in JPEG and PNG bytes."""
import struct

import cv2
import numpy as np
import pytest

from data.jpeg import jpeg_encode
from utils.image_meta import (MAX_ICC_BYTES, apply_orientation, embed_icc, icc_colour_space,
                              read_icc_profile, read_orientation)


def _exif(orientation, order):
    fmt = "<" if order == b"II" else ">"
    tiff = (order + struct.pack(fmt + "HI", 42, 8) + struct.pack(fmt + "H", 2)
            + struct.pack(fmt + "HHII", 0x010F, 2, 4, 0)  # another tag first (Make)
            + struct.pack(fmt + "HHIHH", 0x0112, 3, 1, orientation, 0) + struct.pack(fmt + "I", 0))
    payload = b"Exif\x00\x00" + tiff
    return b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload


@pytest.fixture(scope="module")
def jpeg_bytes():
    return jpeg_encode(np.arange(24 * 16, dtype=np.uint8).reshape(16, 24), 90)


@pytest.mark.parametrize("order", [b"II", b"MM"])
def test_orientation_both_byte_orders(jpeg_bytes, order):
    for orientation in range(1, 9):
        data = jpeg_bytes[:2] + _exif(orientation, order) + jpeg_bytes[2:]
        assert read_orientation(data) == orientation
    assert read_orientation(jpeg_bytes) == 1
    assert read_orientation(jpeg_bytes[:2] + b"\xff\xe1\x00\x08Exif" + jpeg_bytes[2:]) == 1


def test_apply_orientation_matches_opencv(jpeg_bytes):
    colour = jpeg_encode(np.random.default_rng(0).integers(0, 256, (16, 24, 3), np.uint8), 95)
    for data in (jpeg_bytes, colour):
        flag = cv2.IMREAD_GRAYSCALE if data is jpeg_bytes else cv2.IMREAD_COLOR
        stored = cv2.imdecode(np.frombuffer(data, np.uint8), flag | cv2.IMREAD_IGNORE_ORIENTATION)
        for orientation in range(1, 9):
            tagged = data[:2] + _exif(orientation, b"MM") + data[2:]
            shown = cv2.imdecode(np.frombuffer(tagged, np.uint8), flag)
            np.testing.assert_array_equal(apply_orientation(stored, orientation), shown)


def test_large_icc_profile_round_trips_through_jpeg_segments(jpeg_bytes):
    profile = bytes(np.random.default_rng(1).integers(0, 256, 150_000, np.uint8))
    out = embed_icc(jpeg_bytes, ".jpg", profile)
    assert out.count(b"ICC_PROFILE\x00") == 3  # 65519 bytes per APP2 segment
    assert read_icc_profile(out) == profile
    assert cv2.imdecode(np.frombuffer(out, np.uint8), cv2.IMREAD_GRAYSCALE) is not None


def test_png_profile_replaces_srgb_and_bombs_are_ignored():
    ok, buf = cv2.imencode(".png", np.zeros((4, 4, 3), np.uint8))
    data = buf.tobytes()
    srgb = struct.pack(">I", 1) + b"sRGB\x00" + struct.pack(">I", 0)
    data = data[:33] + srgb + data[33:]  # after IHDR
    profile = b"\x00" * 16 + b"RGB " + b"\x01" * 200
    out = embed_icc(data, ".png", profile)
    assert b"sRGB" not in out and read_icc_profile(out) == profile
    assert icc_colour_space(profile) == "RGB"
    bomb = embed_icc(data, ".png", b"\x00" * (MAX_ICC_BYTES + 1))
    assert len(bomb) < 100_000 and read_icc_profile(bomb) is None
    with pytest.raises(ValueError, match="webp"):
        embed_icc(data, ".webp", profile)
