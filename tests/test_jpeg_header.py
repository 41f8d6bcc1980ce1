"""utils/jpeg_header.py: DQT parsing and the inversion of IJG quality scaling."""
import struct

import cv2
import numpy as np
import pytest

from data.jpeg import jpeg_encode
from utils.jpeg_header import (STD_CHROMINANCE, STD_LUMINANCE, ZIGZAG, JpegHeaderError, header_qf,
                               ijg_table, iter_segments, parse_jpeg, qf_from_tables)


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(0)
    smooth = cv2.resize(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8), (40, 32),
                        interpolation=cv2.INTER_CUBIC)
    noise = rng.integers(-20, 21, smooth.shape)
    return np.clip(smooth.astype(int) + noise, 0, 255).astype(np.uint8)


def _replace_dqt(data, table_id, values, precision=0):
    """JPEG bytes whose DQT for `table_id` holds `values` (natural order) instead."""
    zigzag = np.asarray(values)[ZIGZAG]
    body = bytes([(precision << 4) | table_id]) + (
        struct.pack(">64H", *zigzag) if precision else bytes(int(v) for v in zigzag))
    out, pos = bytearray(data[:2]), 2
    while True:
        marker = data[pos + 1]
        length = struct.unpack_from(">H", data, pos + 2)[0]
        segment = data[pos:pos + 2 + length]
        if marker == 0xDB:
            payload, rebuilt, i = segment[4:], b"", 0
            while i < len(payload):
                size = 65 if payload[i] >> 4 == 0 else 129
                rebuilt += body if payload[i] & 0x0F == table_id else payload[i:i + size]
                i += size
            segment = b"\xff\xdb" + struct.pack(">H", len(rebuilt) + 2) + rebuilt
        out += segment
        pos += 2 + length
        if marker == 0xDA:
            return bytes(out) + data[pos:]


def test_every_qf_is_read_exactly_from_opencv_jpegs(image):
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    wrong = []
    for qf in range(1, 101):
        for img in (image, gray):
            found = header_qf(jpeg_encode(img, qf))
            if (found.qf, found.exact, found.rms) != (qf, True, 0.0):
                wrong.append((qf, img.ndim, found))
    assert wrong == []


def test_header_describes_the_frame(image):
    colour, gray = parse_jpeg(jpeg_encode(image, 50)), parse_jpeg(jpeg_encode(image[..., 0], 50))
    assert (colour.width, colour.height, colour.n_components) == (40, 32, 3)
    assert (gray.n_components, gray.chroma_table) == (1, None)
    # at QF 50 the scale is 100 %: the tables are Annex K's, so the zigzag order was undone
    np.testing.assert_array_equal(colour.luma_table, STD_LUMINANCE)
    np.testing.assert_array_equal(colour.chroma_table, STD_CHROMINANCE)


def test_progressive_jpeg(image):
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 63,
                                           cv2.IMWRITE_JPEG_PROGRESSIVE, 1])
    info = parse_jpeg(buf.tobytes())
    assert info.progressive and header_qf(info).qf == 63 and header_qf(info).exact


def test_ijg_scaling_known_values():
    assert ijg_table(STD_LUMINANCE, 100).tolist() == [1] * 64
    assert ijg_table(STD_LUMINANCE, 1).max() == 255  # clamped to baseline
    # QF 10: scale 500, so every entry is 5x the base, clamped
    np.testing.assert_array_equal(ijg_table(STD_LUMINANCE, 10), np.minimum(STD_LUMINANCE * 5, 255))


def test_sixteen_bit_tables_are_parsed(image):
    data = _replace_dqt(jpeg_encode(image, 30), 0, ijg_table(STD_LUMINANCE, 30), precision=1)
    found = header_qf(data)
    assert (found.qf, found.exact) == (30, True)


@pytest.mark.parametrize("qf", [1, 10, 23])
def test_full_range_tables_of_cjpeg_without_baseline_are_exact(image, qf):
    """`cjpeg -quality N` (force_baseline off) keeps entries above 255 in 16-bit tables."""
    luma, chroma = (ijg_table(base, qf, baseline=False) for base in (STD_LUMINANCE,
                                                                      STD_CHROMINANCE))
    assert luma.max() > 255
    data = _replace_dqt(_replace_dqt(jpeg_encode(image, qf), 0, luma, precision=1), 1, chroma,
                        precision=1)
    found = header_qf(data)
    assert (found.qf, found.exact, found.rms) == (qf, True, 0.0)


@pytest.mark.parametrize("qf", [10, 30, 50, 75, 90])
def test_cmyk_jpegs_read_their_one_table(image, qf, tmp_path):
    """libjpeg writes CMYK with the luminance table for all four components: no chroma table
    to compare (it once was compared with the chrominance tables and read as ~12 for QF 10)."""
    from PIL import Image
    path = tmp_path / "cmyk.jpg"
    Image.fromarray(image).convert("CMYK").save(path, quality=qf)
    info = parse_jpeg(path.read_bytes())
    assert info.n_components == 4 and info.chroma_table is None
    found = header_qf(info)
    assert (found.qf, found.exact) == (qf, True)


@pytest.mark.parametrize("qf", [50, 90])
def test_non_standard_table_gives_nearest_qf(image, qf):
    table = ijg_table(STD_LUMINANCE, qf).copy()
    table[[3, 17, 40]] += 1  # what another encoder's rounding might produce
    data = _replace_dqt(jpeg_encode(image, qf), 0, table)
    assert cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) is not None
    found = header_qf(data)
    assert found.qf == qf and not found.exact and found.rms > 0
    assert "non-standard" in str(found)


def test_flat_table_nearest_qf_is_least_squares():
    flat = np.full(64, 8)
    found = qf_from_tables(flat)
    errors = [((ijg_table(STD_LUMINANCE, q) - flat) ** 2).sum() for q in range(1, 101)]
    assert not found.exact and found.qf == 1 + int(np.argmin(errors))
    assert found.rms == pytest.approx(np.sqrt(min(errors) / 64))


def test_not_a_jpeg_and_truncated_headers():
    with pytest.raises(JpegHeaderError, match="not a JPEG"):
        parse_jpeg(b"\x89PNG\r\n\x1a\n")
    data = jpeg_encode(np.zeros((16, 16), np.uint8), 50)
    with pytest.raises(JpegHeaderError):
        parse_jpeg(data[:30])
    markers = [m for m, _ in iter_segments(data)]
    assert 0xDB in markers and markers[-1] == 0xDA
