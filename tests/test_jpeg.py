"""data/jpeg.py: the OpenCV JPEG protocol for colour, gray and shifted double JPEG."""
import os

import cv2
import numpy as np
import pytest

from data.jpeg import (double_jpeg, jpeg, jpeg_decode, jpeg_encode, label_to_qf, qf_to_label,
                       shift_crop)


@pytest.fixture
def rgb():
    rng = np.random.default_rng(0)
    base = cv2.resize(rng.integers(0, 256, (8, 10, 3), dtype=np.uint8), (40, 32))
    return base


def test_colour_is_rgb_encoded_as_bgr(rgb):
    """Our RGB path equals OpenCV's BGR path of the original scripts, channel-swapped."""
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    _, enc = cv2.imencode(".jpg", bgr, [int(cv2.IMWRITE_JPEG_QUALITY), 30])
    expected = cv2.cvtColor(cv2.imdecode(enc, 1), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(jpeg(rgb, 30), expected)


def test_gray_is_encoded_single_channel(rgb):
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    _, enc = cv2.imencode(".jpg", gray, [int(cv2.IMWRITE_JPEG_QUALITY), 10])
    out = jpeg(gray, 10)
    assert out.shape == gray.shape
    np.testing.assert_array_equal(out, cv2.imdecode(enc, 0))
    assert jpeg(gray[:, :, None], 10).shape == gray.shape + (1,)


def test_quality_changes_error(rgb):
    err = [np.abs(jpeg(rgb, q).astype(int) - rgb).mean() for q in (10, 50, 95)]
    assert err[0] > err[1] > err[2]


def test_encode_decode_round_trip(rgb):
    smooth = cv2.GaussianBlur(rgb, (0, 0), 3)  # smooth colour survives chroma subsampling
    data = jpeg_encode(smooth, 100)
    assert data[:2] == b"\xff\xd8"
    out = jpeg_decode(data, 3)
    assert np.abs(out.astype(int) - smooth).max() <= 6


def _opencv_double_jpeg_gray(gray, qf1, qf2, rows, cols):
    """The original double-JPEG test script's steps, straight from OpenCV."""
    _, enc = cv2.imencode(".jpg", gray, [int(cv2.IMWRITE_JPEG_QUALITY), qf1])
    shifted = cv2.imdecode(enc, 0)[rows:, cols:]
    _, enc = cv2.imencode(".jpg", shifted, [int(cv2.IMWRITE_JPEG_QUALITY), qf2])
    return cv2.imdecode(enc, 0)


@pytest.mark.parametrize("shift, rows, cols", [(4, 4, 4), ((1, 2), 1, 2), ((0, 5), 0, 5)])
def test_double_jpeg_is_the_original_scripts_opencv_steps(rgb, shift, rows, cols):
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    out = double_jpeg(gray, 10, 30, shift)
    assert out.shape == shift_crop(gray, shift).shape == (32 - rows, 40 - cols)
    np.testing.assert_array_equal(out, _opencv_double_jpeg_gray(gray, 10, 30, rows, cols))
    np.testing.assert_array_equal(shift_crop(gray, shift), gray[rows:, cols:])


def test_double_jpeg_golden_psnr(testsets_dir):
    """The spec's golden value: LIVE1_gray/monarch, QF1 10, shift (4, 4), QF2 30 against the
    ground truth cropped alike, PSNR 29.946885 (computed here, not by utils/metrics.py)."""
    gray = cv2.imread(os.path.join(testsets_dir, "LIVE1_gray", "monarch.png"),
                      cv2.IMREAD_GRAYSCALE)
    out, ground_truth = double_jpeg(gray, 10, 30, 4), shift_crop(gray, 4)
    mse = np.mean((out.astype(np.float64) - ground_truth) ** 2)
    assert 20 * np.log10(255 / np.sqrt(mse)) == pytest.approx(29.946885, abs=1e-6)


@pytest.mark.parametrize("bad", [-1, 101, 10.5])
def test_quality_out_of_range(rgb, bad):
    with pytest.raises(ValueError, match="quality factor"):
        jpeg(rgb, bad)


def test_rejects_non_uint8(rgb):
    with pytest.raises(TypeError, match="uint8"):
        jpeg(rgb.astype(np.float32), 10)


def test_labels_round_trip():
    for qf in range(0, 101):
        assert label_to_qf(qf_to_label(qf)) == qf
    assert qf_to_label(10) == pytest.approx(0.9)


@pytest.mark.parametrize("sampling, factors", [("444", (1, 1)), ("422", (2, 1)),
                                               ("420", (2, 2))])
def test_chroma_sampling_is_written_into_the_file(rgb, sampling, factors):
    """The SOF header's luma sampling factors (horizontal, vertical) say how the chroma was
    sampled; None is OpenCV's default, 4:2:0, byte for byte."""
    data = jpeg_encode(rgb, 50, sampling)
    sof = data.index(b"\xff\xc0")
    luma = data[sof + 11]  # the first component's sampling byte
    assert (luma >> 4, luma & 15) == factors
    if sampling == "420":
        assert data == jpeg_encode(rgb, 50)
    # a gray image has no chroma: the sampling changes nothing
    assert jpeg_encode(rgb[..., 0], 50, sampling) == jpeg_encode(rgb[..., 0], 50)
    out = jpeg(rgb, 50, sampling)
    assert out.shape == rgb.shape and out.dtype == np.uint8
    with pytest.raises(ValueError, match="chroma sampling '411'"):
        jpeg_encode(rgb, 50, "411")
