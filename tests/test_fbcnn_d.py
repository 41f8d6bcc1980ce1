"""data/dominant_qf.py: FBCNN-D's dominant-QF estimate by re-compression error."""
import os

import cv2
import numpy as np
import pytest

from data.dominant_qf import DominantQF, analysis_window, estimate_dominant_qf, recompression_errors
from data.jpeg import double_jpeg, jpeg


@pytest.fixture(scope="module")
def crop(testsets_dir):
    """A 75x75 piece of LIVE1_gray/monarch: a 64x64 analysis window at every shift."""
    img = cv2.imread(os.path.join(testsets_dir, "LIVE1_gray", "monarch.png"), cv2.IMREAD_GRAYSCALE)
    return np.ascontiguousarray(img[100:175, 200:275])


@pytest.mark.parametrize("qf", [10, 37, 75])
def test_single_jpeg_qf(crop, qf):
    estimate = estimate_dominant_qf(jpeg(crop, qf))
    assert (estimate.qf, estimate.last_qf, estimate.last_shift) == (qf, qf, (0, 0))
    assert estimate.first_qf is None


@pytest.mark.parametrize("qf1, qf2, shift, first_grid", [
    (10, 30, (4, 4), (4, 4)),   # the paper's protocol
    (10, 50, (1, 6), (7, 2)),   # the first grid now starts 8 - shift into the image
    (20, 60, (0, 3), (0, 5)),   # rows still aligned: compared with equally aligned shifts
])
def test_double_jpeg_finds_the_first_qf_and_grid(crop, qf1, qf2, shift, first_grid):
    estimate = estimate_dominant_qf(double_jpeg(crop, qf1, qf2, shift))
    assert (estimate.qf, estimate.first_qf, estimate.first_shift) == (qf1, qf1, first_grid)
    assert (estimate.last_qf, estimate.last_shift) == (qf2, (0, 0))


def test_lower_second_qf_dominates(crop):
    estimate = estimate_dominant_qf(double_jpeg(crop, 30, 10, 4))
    assert estimate.qf == 10 and estimate.first_qf is None


def test_shifted_single_jpeg_grid(crop):
    estimate = estimate_dominant_qf(jpeg(crop, 40)[3:, 5:])
    assert (estimate.qf, estimate.last_shift) == (40, (5, 3))


def test_colour_image_uses_its_luma(testsets_dir):
    img = cv2.imread(os.path.join(testsets_dir, "LIVE1_color", "monarch.png"))
    rgb = cv2.cvtColor(np.ascontiguousarray(img[100:175, 200:275]), cv2.COLOR_BGR2RGB)
    assert estimate_dominant_qf(jpeg(rgb, 45)).qf == 45


def test_uncompressed_image_has_no_trace(crop):
    assert estimate_dominant_qf(crop).qf is None


@pytest.mark.parametrize("level", [0, 37, 100, 128, 255])
@pytest.mark.parametrize("qf", [None, 90])
def test_flat_content_has_no_trace(level, qf):
    """Re-compressing a flat window is exact at most QFs on every grid: 0 / 0, no evidence
    (it once read as the deepest possible dip and gave QF 2, the strongest smoothing)."""
    page = np.full((160, 200), level, dtype=np.uint8)  # a page with a title, a blank middle
    cv2.putText(page, "Title", (20, 30), cv2.FONT_HERSHEY_SIMPLEX, 1, 255 - level, 2)
    y0, x0, h, w = analysis_window(page.shape, max_size=64)
    window = page[y0:y0 + h + 7, x0:x0 + w + 7]
    assert window.min() == window.max() and page.min() != page.max()
    assert estimate_dominant_qf(page if qf is None else jpeg(page, qf), max_size=64).qf is None


def test_mosaic_equals_separate_compressions(crop):
    """Compressing the 64 shifted windows as one mosaic gives each window's own error."""
    img = jpeg(crop, 25)
    qualities = [20, 25, 60]
    errors = recompression_errors(img, qualities)
    y0, x0, h, w = analysis_window(img.shape)
    for shift in (0, 9, 36, 63):
        dy, dx = divmod(shift, 8)
        window = np.ascontiguousarray(img[y0 + dy:y0 + dy + h, x0 + dx:x0 + dx + w])
        for k, q in enumerate(qualities):
            direct = np.mean((jpeg(window, q).astype(np.float64) - window) ** 2)
            assert errors[shift, k] == pytest.approx(direct, rel=1e-6, abs=1e-9)
    assert errors[0, 1] < 0.05 * np.median(errors[:, 1])  # the ghost at the file's own QF


def test_analysis_window_fits_every_shift():
    for shape in [(15, 15), (75, 90), (300, 1000)]:
        y0, x0, h, w = analysis_window(shape, max_size=256)
        assert y0 % 8 == 0 and x0 % 8 == 0 and h % 8 == 0 and w % 8 == 0
        assert y0 + 7 + h <= shape[0] and x0 + 7 + w <= shape[1] and h >= 8 and w >= 8
    with pytest.raises(ValueError, match="too small"):
        analysis_window((14, 100))


def test_images_too_small_to_measure_have_no_estimate():
    """Under 15x15 there is no analysis window: no estimate (the CLI then uses the network's
    QF, as for an image without a JPEG trace), not an error."""
    rng = np.random.default_rng(3)
    small = jpeg(rng.integers(0, 256, (12, 40), dtype=np.uint8), 30)
    assert estimate_dominant_qf(small) == DominantQF(None, None, None)
    with pytest.raises(ValueError, match="too small"):
        analysis_window(small.shape)
