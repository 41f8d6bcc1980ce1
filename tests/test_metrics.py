"""utils/metrics.py: the spec's golden values to 1e-6, plus analytic cases."""
import math
import os

import numpy as np
import pytest

from data.jpeg import double_jpeg, jpeg, shift_crop
from utils.image import imread_uint, rgb2y_matlab
from utils.metrics import psnr, psnrb, ssim


def _golden_cases(testsets):
    color = imread_uint(os.path.join(testsets, "LIVE1_color", "monarch.png"), 3)
    gray = imread_uint(os.path.join(testsets, "LIVE1_gray", "monarch.png"), 1)
    return {
        "color_qf10": (jpeg(color, 10), color, (26.852231, 0.822137, 25.291757)),
        "gray_qf10": (jpeg(gray, 10), gray, (30.117270, 0.873279, 26.861168)),
        "gray_double_10_30": (double_jpeg(gray, 10, 30, 4), shift_crop(gray, 4),
                              (29.946885, 0.869005, 28.655020)),
    }


@pytest.mark.parametrize("case", ["color_qf10", "gray_qf10", "gray_double_10_30"])
def test_golden_values(testsets_dir, case):
    img, ref, (p, s, pb) = _golden_cases(testsets_dir)[case]
    assert psnr(img, ref) == pytest.approx(p, abs=1e-6)
    assert ssim(img, ref) == pytest.approx(s, abs=1e-6)
    assert psnrb(img, ref) == pytest.approx(pb, abs=1e-6)


def test_psnr_analytic():
    ref = np.full((16, 16), 100, np.uint8)
    img = ref + np.uint8(5)  # MSE 25 everywhere
    assert psnr(img, ref) == pytest.approx(20 * math.log10(255 / 5), abs=1e-12)
    assert psnr(ref, ref) == math.inf


def test_ssim_of_identical_images_is_one():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)
    assert ssim(img, img) == pytest.approx(1.0, abs=1e-12)
    assert ssim(img, 255 - img) < 0.1


def test_border_trims_each_side():
    rng = np.random.default_rng(1)
    ref = rng.integers(0, 256, (20, 20), dtype=np.uint8)
    img = ref.copy()
    img[:2, :] = 0  # damage only the border rows
    assert psnr(img, ref, border=2) == math.inf
    assert psnr(img, ref) < math.inf


def test_psnrb_equals_psnr_without_blocking():
    """A smooth horizontal ramp has equal boundary and non-boundary differences: BEF is 0."""
    ramp = np.tile(np.arange(0, 64, dtype=np.uint8)[None, :] * 2, (64, 1))
    ref = ramp.copy()
    ref[0, 0] += 3
    assert psnrb(ramp, ref) == pytest.approx(psnr(ramp, ref), abs=1e-12)


def test_psnrb_penalises_steps_at_block_boundaries():
    blocky = np.repeat(np.repeat(np.arange(8, dtype=np.uint8)[:, None] * 20, 8, 0), 64, 1)
    ref = blocky.copy()
    ref[0, 0] += 1
    assert psnrb(blocky, ref) < psnr(blocky, ref)


def test_colour_psnrb_uses_y_of_image_for_bef():
    """The paper's quirk: BEF on the Y channel of the restored image, MSE over RGB."""
    rng = np.random.default_rng(2)
    ref = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    img = jpeg(ref, 10)
    y = rgb2y_matlab(img)
    mse_rgb = np.mean((img.astype(np.float64) - ref) ** 2)
    bef_y = 10 ** (-psnrb(y, y) / 10) * 255 ** 2  # psnrb(y, y) has MSE 0: only BEF remains
    assert psnrb(img, ref) == pytest.approx(10 * math.log10(255 ** 2 / (mse_rgb + bef_y)), abs=1e-9)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(np.zeros((8, 8), np.uint8), np.zeros((8, 9), np.uint8))
