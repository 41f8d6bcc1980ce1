"""What a JPEG file's header says: its quantization tables, components, and the QF behind them.

This module owns reading JPEG marker segments in pure Python (no decoder involved) and inverting
the IJG quality scaling that libjpeg, libjpeg-turbo and so OpenCV use to turn a quality factor
into quantization tables:

    scale = 5000 // QF if QF < 50 else 200 - 2 * QF
    table[i] = clip((base[i] * scale + 50) // 100, 1, 255)        (base: ITU-T T.81 Annex K)

(libjpeg's `cjpeg` without `-baseline` clips to 32767 instead, which changes the tables below
QF 24; both sets are matched). `header_qf` compares the file's luminance table (and
chrominance table, for colour files that have one) with the tables that scaling produces. A
match is exact; tables from another encoder (cameras, Photoshop, custom tables) match none of
them, and the nearest QF by least squares over all entries is reported with `exact=False`.

Tables are stored in files in zigzag order; this module converts them to natural (row-major)
order. `segment_spans` is the one walk over JPEG markers: utils/image_meta.py reads EXIF and ICC
segments through it and utils/image.py the frame size it checks before decoding.
"""
import struct
from typing import NamedTuple

import numpy as np

__all__ = ["JpegHeaderError", "JpegTruncatedError", "JpegInfo", "HeaderQF", "STD_LUMINANCE",
           "STD_CHROMINANCE", "ZIGZAG", "SOF_MARKERS", "is_jpeg", "segment_spans", "iter_segments",
           "parse_jpeg", "ijg_scale", "ijg_table",
           "ijg_tables", "qf_from_tables", "header_qf"]

# ITU-T T.81 Annex K, tables K.1 and K.2, natural order
STD_LUMINANCE = np.array([
    16, 11, 10, 16, 24, 40, 51, 61,
    12, 12, 14, 19, 26, 58, 60, 55,
    14, 13, 16, 24, 40, 57, 69, 56,
    14, 17, 22, 29, 51, 87, 80, 62,
    18, 22, 37, 56, 68, 109, 103, 77,
    24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101,
    72, 92, 95, 98, 112, 100, 103, 99], dtype=np.int64)
STD_CHROMINANCE = np.array([
    17, 18, 24, 47, 99, 99, 99, 99,
    18, 21, 26, 66, 99, 99, 99, 99,
    24, 26, 56, 99, 99, 99, 99, 99,
    47, 66, 99, 99, 99, 99, 99, 99,
    *[99] * 32], dtype=np.int64)
# ZIGZAG[k] is the natural-order index of the k-th coefficient in a file's zigzag order
ZIGZAG = np.array([
    0, 1, 8, 16, 9, 2, 3, 10, 17, 24, 32, 25, 18, 11, 4, 5,
    12, 19, 26, 33, 40, 48, 41, 34, 27, 20, 13, 6, 7, 14, 21, 28,
    35, 42, 49, 56, 57, 50, 43, 36, 29, 22, 15, 23, 30, 37, 44, 51,
    58, 59, 52, 45, 38, 31, 39, 46, 53, 60, 61, 54, 47, 55, 62, 63], dtype=np.int64)

SOF_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_PROGRESSIVE_SOF = {0xC2, 0xC6, 0xCA, 0xCE}
STANDALONE_MARKERS = {0x01, *range(0xD0, 0xD8)}  # TEM, RST0-7: no length field
QUALITIES = range(1, 101)


class JpegHeaderError(ValueError):
    """The bytes are not a JPEG, or its header is truncated or malformed."""


class JpegTruncatedError(JpegHeaderError):
    """The bytes end inside the JPEG header."""


class JpegInfo(NamedTuple):
    """The parts of a JPEG header this project uses."""
    width: int
    height: int
    n_components: int
    progressive: bool
    qtables: dict  # table id -> int64 array of 64 entries, natural order
    component_tables: tuple  # table id used by each frame component, in frame order

    @property
    def luma_table(self):
        return self.qtables.get(self.component_tables[0])

    @property
    def chroma_table(self):
        """The second component's table (Cb); None for grayscale files and where the second
        component shares the first one's table (libjpeg's CMYK: one table for all four)."""
        if self.n_components < 3 or self.component_tables[1] == self.component_tables[0]:
            return None
        return self.qtables.get(self.component_tables[1])


class HeaderQF(NamedTuple):
    """The QF read from quantization tables: `exact` when they are IJG tables at that QF."""
    qf: int
    exact: bool
    rms: float  # root mean square difference from the IJG tables at `qf` (0 when exact)

    def __str__(self):
        return str(self.qf) if self.exact else f"~{self.qf} (non-standard tables)"


def is_jpeg(data):
    return len(data) >= 3 and data[0] == 0xFF and data[1] == 0xD8 and data[2] == 0xFF


def segment_spans(data):
    """Yield `(marker, start, stop)` for each marker segment up to the first scan (SOS), its
    payload being `data[start:stop]` (after the marker and the length field).

    The one walk over JPEG markers: the QF reader, the EXIF/ICC reader and the image-size check
    before decoding all use it. Stops after SOS (its header is yielded) or at EOI. Raises
    JpegTruncatedError when the bytes end inside the header (more of the file may hold the
    rest), JpegHeaderError for bytes that are not a JPEG or a malformed segment length.
    """
    if not is_jpeg(data):
        raise JpegHeaderError("not a JPEG file (no SOI marker)")
    pos, end = 2, len(data)
    while True:
        while pos < end and data[pos] != 0xFF:  # tolerate junk between segments, as libjpeg does
            pos += 1
        while pos < end and data[pos] == 0xFF:  # fill bytes
            pos += 1
        if pos >= end:
            raise JpegTruncatedError("JPEG header ends before the first scan")
        marker = data[pos]
        pos += 1
        if marker == 0xD9:
            return
        if marker in STANDALONE_MARKERS:
            continue
        if pos + 2 > end:
            raise JpegTruncatedError(f"JPEG segment 0xFF{marker:02X} is truncated")
        length = struct.unpack_from(">H", data, pos)[0]
        if length < 2:
            raise JpegHeaderError(f"JPEG segment 0xFF{marker:02X} has a bad length {length}")
        if pos + length > end:
            raise JpegTruncatedError(f"JPEG segment 0xFF{marker:02X} is truncated")
        yield marker, pos + 2, pos + length
        pos += length
        if marker == 0xDA:
            return


def iter_segments(data):
    """Yield `(marker, payload bytes)` for each marker segment, as `segment_spans`."""
    for marker, start, stop in segment_spans(data):
        yield marker, bytes(data[start:stop])


def _parse_dqt(payload, qtables):
    pos = 0
    while pos < len(payload):
        precision, table_id = payload[pos] >> 4, payload[pos] & 0x0F
        pos += 1
        size = 128 if precision else 64
        if precision > 1 or table_id > 3 or pos + size > len(payload):
            raise JpegHeaderError("malformed DQT segment")
        values = struct.unpack_from(">64H" if precision else "64B", payload, pos)
        pos += size
        table = np.empty(64, dtype=np.int64)
        table[ZIGZAG] = values
        qtables[table_id] = table


def parse_jpeg(data):
    """Parse the header of JPEG bytes into a JpegInfo (tables in natural order)."""
    qtables, frame = {}, None
    for marker, payload in iter_segments(data):
        if marker == 0xDB:
            _parse_dqt(payload, qtables)
        elif marker in SOF_MARKERS and frame is None:
            if len(payload) < 6:
                raise JpegHeaderError("malformed SOF segment")
            height, width, n = struct.unpack_from(">HHB", payload, 1)
            if n < 1 or len(payload) < 6 + 3 * n:
                raise JpegHeaderError("malformed SOF segment")
            tables = tuple(payload[6 + 3 * i + 2] for i in range(n))
            frame = (width, height, n, marker in _PROGRESSIVE_SOF, tables)
    if frame is None:
        raise JpegHeaderError("JPEG header has no frame (SOF) segment")
    width, height, n, progressive, tables = frame
    if tables[0] not in qtables:
        raise JpegHeaderError(f"JPEG header does not define quantization table {tables[0]}")
    return JpegInfo(width, height, n, progressive, qtables, tables)


def ijg_scale(qf):
    """libjpeg's `jpeg_quality_scaling`: percentage applied to the base tables."""
    qf = min(max(int(qf), 1), 100)
    return 5000 // qf if qf < 50 else 200 - 2 * qf


def ijg_table(base, qf, baseline=True):
    """The quantization table libjpeg derives from `base` at quality `qf`: 8-bit (at most 255)
    with `baseline`, as OpenCV and most software write it, else up to 32767."""
    return np.clip((np.asarray(base, dtype=np.int64) * ijg_scale(qf) + 50) // 100, 1,
                   255 if baseline else 32767)


def ijg_tables(base, baseline=True):
    """All 100 IJG tables of `base`: an array (100, 64), row k for QF k + 1."""
    return np.stack([ijg_table(base, q, baseline) for q in QUALITIES])


# (baseline, not baseline) x (100, 64)
_LUMA_TABLES = np.stack([ijg_tables(STD_LUMINANCE, b) for b in (True, False)])
_CHROMA_TABLES = np.stack([ijg_tables(STD_CHROMINANCE, b) for b in (True, False)])


def qf_from_tables(luma, chroma=None):
    """The QF whose IJG tables (baseline or not) equal `luma` (and `chroma`), else the
    least-squares nearest one."""
    luma = np.asarray(luma, dtype=np.int64)
    sq = ((_LUMA_TABLES - luma) ** 2).sum(axis=2)
    n = 64
    if chroma is not None:
        sq = sq + ((_CHROMA_TABLES - np.asarray(chroma, dtype=np.int64)) ** 2).sum(axis=2)
        n = 128
    sq = sq.min(axis=0)  # the nearer of the baseline and the full-range tables, per QF
    # the 100 IJG luminance tables are all different, so an exact match names one QF
    best = int(np.argmin(sq))
    return HeaderQF(best + 1, bool(sq[best] == 0), float(np.sqrt(sq[best] / n)))


def header_qf(data):
    """HeaderQF of JPEG bytes (or a JpegInfo); raises JpegHeaderError for non-JPEG bytes."""
    info = data if isinstance(data, JpegInfo) else parse_jpeg(data)
    return qf_from_tables(info.luma_table, info.chroma_table)
