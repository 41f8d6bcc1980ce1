"""Image metadata that must survive restoration: EXIF orientation and ICC colour profiles.

This module owns reading the EXIF orientation and the ICC profile from JPEG (APP1 / APP2
segments) and PNG (eXIf / iCCP chunks) bytes, applying an orientation to pixels, and writing an
ICC profile into encoded PNG (iCCP chunk) or JPEG (APP2 segments) bytes. It is pure Python on
encoded bytes, so OpenCV stays the only image codec and Pillow is not needed.
"""
import struct
import zlib

import cv2
import numpy as np

from utils.jpeg_header import JpegHeaderError, is_jpeg, iter_segments

__all__ = ["PNG_SIGNATURE", "ICC_FORMATS", "read_orientation", "read_icc_profile",
           "icc_colour_space", "apply_orientation", "png_chunks", "embed_icc"]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_ICC_MARKER = b"ICC_PROFILE\x00"
_ICC_SEGMENT_DATA = 65533 - len(_ICC_MARKER) - 2  # APP2 payload limit less the ICC header
ICC_FORMATS = (".png", ".jpg", ".jpeg")  # output formats that can carry a profile here
MAX_ICC_BYTES = 16 << 20  # larger than any real profile; bounds a compressed iCCP chunk


def is_png(data):
    return bytes(data[:8]) == PNG_SIGNATURE


def png_chunks(data):
    """Yield `(type, payload)` of each PNG chunk (type as bytes); stops at IEND or the end."""
    pos = 8
    while pos + 8 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, pos)
        payload = bytes(data[pos + 8:pos + 8 + length])
        if len(payload) < length:
            return
        yield kind, payload
        if kind == b"IEND":
            return
        pos += 12 + length


def _tiff_orientation(tiff):
    """Orientation tag (0x0112) of IFD0 of a TIFF/EXIF block, or 1."""
    if len(tiff) < 8 or tiff[:2] not in (b"II", b"MM"):
        return 1
    order = "<" if tiff[:2] == b"II" else ">"
    offset = struct.unpack_from(order + "I", tiff, 4)[0]
    if offset + 2 > len(tiff):
        return 1
    count = struct.unpack_from(order + "H", tiff, offset)[0]
    for i in range(count):
        entry = offset + 2 + 12 * i
        if entry + 12 > len(tiff):
            break
        tag, kind, n = struct.unpack_from(order + "HHI", tiff, entry)
        if tag == 0x0112 and kind == 3 and n >= 1:
            value = struct.unpack_from(order + "H", tiff, entry + 8)[0]
            return value if 1 <= value <= 8 else 1
    return 1


def read_orientation(data):
    """The EXIF orientation (1..8, 1 = as stored) of JPEG or PNG bytes; 1 when absent."""
    try:
        if is_jpeg(data):
            for marker, payload in iter_segments(data):
                if marker == 0xE1 and payload.startswith(b"Exif\x00\x00"):
                    return _tiff_orientation(payload[6:])
        elif is_png(data):
            for kind, payload in png_chunks(data):
                if kind == b"eXIf":
                    return _tiff_orientation(payload)
    except (JpegHeaderError, struct.error):
        pass  # unreadable metadata: the pixels are still usable as stored
    return 1


def read_icc_profile(data):
    """The embedded ICC profile of JPEG or PNG bytes, or None."""
    try:
        if is_jpeg(data):
            parts = {}
            for marker, payload in iter_segments(data):
                if marker == 0xE2 and payload.startswith(_ICC_MARKER) and len(payload) > 14:
                    parts[payload[12]] = payload[14:]
            if parts:
                return b"".join(parts[k] for k in sorted(parts))
        elif is_png(data):
            for kind, payload in png_chunks(data):
                if kind == b"iCCP":
                    name_end = payload.index(b"\x00")
                    inflate = zlib.decompressobj()
                    profile = inflate.decompress(payload[name_end + 2:], MAX_ICC_BYTES)
                    return None if inflate.unconsumed_tail else profile  # a zip bomb
                if kind == b"IDAT":
                    break
    except (JpegHeaderError, struct.error, ValueError, zlib.error):
        pass
    return None


def icc_colour_space(profile):
    """The profile's data colour space ('RGB', 'GRAY', 'CMYK', ...), or None if too short."""
    if profile is None or len(profile) < 20:
        return None
    return profile[16:20].decode("latin-1").strip()


def apply_orientation(img, orientation):
    """Pixels as displayed: the EXIF orientation transform applied to an HxW(xC) array."""
    if orientation in (5, 6, 7, 8):
        img = cv2.transpose(img)  # also handles 2-D arrays, unlike np.swapaxes on views
        orientation = {5: 1, 6: 2, 7: 3, 8: 4}[orientation]
    if orientation == 2:
        img = img[:, ::-1]
    elif orientation == 3:
        img = img[::-1, ::-1]
    elif orientation == 4:
        img = img[::-1]
    return np.ascontiguousarray(img)


def _png_chunk(kind, payload):
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def _embed_icc_png(data, profile):
    out, pos = [data[:8]], 8
    for kind, payload in png_chunks(data):
        chunk = data[pos:pos + 12 + len(payload)]
        pos += 12 + len(payload)
        if kind in (b"iCCP", b"sRGB"):  # the PNG spec allows one colour-space chunk
            continue
        out.append(chunk)
        if kind == b"IHDR":
            out.append(_png_chunk(b"iCCP", b"ICC profile\x00\x00" + zlib.compress(profile, 9)))
    return b"".join(out)


def _embed_icc_jpeg(data, profile):
    chunks = [profile[i:i + _ICC_SEGMENT_DATA] for i in range(0, len(profile), _ICC_SEGMENT_DATA)]
    if len(chunks) > 255:
        raise ValueError("ICC profile too large for JPEG APP2 segments")
    segments = b"".join(
        b"\xff\xe2" + struct.pack(">H", 2 + len(_ICC_MARKER) + 2 + len(c)) + _ICC_MARKER
        + bytes([i + 1, len(chunks)]) + c for i, c in enumerate(chunks))
    pos = 2
    if data[2:4] == b"\xff\xe0":  # keep JFIF's APP0 first, as the JFIF standard asks
        pos = 4 + struct.unpack_from(">H", data, 4)[0]
    return data[:pos] + segments + data[pos:]


def embed_icc(data, ext, profile):
    """Encoded image bytes with `profile` embedded; `ext` is the output extension."""
    ext = ext.lower()
    if ext == ".png":
        return _embed_icc_png(data, profile)
    if ext in (".jpg", ".jpeg"):
        return _embed_icc_jpeg(data, profile)
    raise ValueError(f"cannot embed an ICC profile in {ext} files (only {', '.join(ICC_FORMATS)})")
