"""utils/metrics.py: the spec's golden values to 1e-6, analytic cases, and equality with a
line-by-line float64 copy of the original code (the oracle below) on real and odd-sized images."""
import math
import os

import cv2
import numpy as np
import pytest
import torch

from data.jpeg import double_jpeg, jpeg, shift_crop
from utils.image import imread_uint, rgb2y_matlab
from utils.metrics import psnr, psnrb, scores, ssim


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


# --- the oracle: spec section 3 as the original computed it (float64, 2-D filter2D) ---------

def _ref_prepare(img, ref, border):
    h, w = img.shape[:2]
    return (img[border:h - border, border:w - border].astype(np.float64),
            ref[border:h - border, border:w - border].astype(np.float64))


def _ref_mse(img, ref, border):
    img, ref = _ref_prepare(img, ref, border)
    return np.mean((img - ref) ** 2)


def _ref_psnr(img, ref, border):
    mse = _ref_mse(img, ref, border)
    return math.inf if mse == 0 else 20 * math.log10(255.0 / math.sqrt(mse))


def _ref_ssim_channel(img, ref):
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    kernel = cv2.getGaussianKernel(11, 1.5)
    window = np.outer(kernel, kernel.transpose())
    mu1 = cv2.filter2D(img, -1, window)[5:-5, 5:-5]
    mu2 = cv2.filter2D(ref, -1, window)[5:-5, 5:-5]
    mu1_sq, mu2_sq, mu1_mu2 = mu1 ** 2, mu2 ** 2, mu1 * mu2
    sigma1_sq = cv2.filter2D(img ** 2, -1, window)[5:-5, 5:-5] - mu1_sq
    sigma2_sq = cv2.filter2D(ref ** 2, -1, window)[5:-5, 5:-5] - mu2_sq
    sigma12 = cv2.filter2D(img * ref, -1, window)[5:-5, 5:-5] - mu1_mu2
    ssim_map = ((2 * mu1_mu2 + c1) * (2 * sigma12 + c2)) / (
        (mu1_sq + mu2_sq + c1) * (sigma1_sq + sigma2_sq + c2))
    return ssim_map.mean()


def _ref_ssim(img, ref, border):
    img, ref = _ref_prepare(img, ref, border)
    if min(img.shape[:2]) < 11:
        return math.nan
    if img.ndim == 2:
        return _ref_ssim_channel(img, ref)
    return np.mean([_ref_ssim_channel(img[..., c], ref[..., c]) for c in range(img.shape[2])])


def _ref_bef(img, block=8):
    h, w = img.shape
    col_diff = (img[:, :-1] - img[:, 1:]) ** 2
    row_diff = (img[:-1, :] - img[1:, :]) ** 2
    col_boundary = np.zeros(w - 1, dtype=bool)
    col_boundary[block - 1::block] = True
    row_boundary = np.zeros(h - 1, dtype=bool)
    row_boundary[block - 1::block] = True
    n_hb, n_vb = h * (w / block - 1), w * (h / block - 1)
    n_hbc, n_vbc = h * (w - 1) - n_hb, w * (h - 1) - n_vb
    if min(h, w) < block or n_hb + n_vb <= 0:
        return 0.0
    d_b = (col_diff[:, col_boundary].sum() + row_diff[row_boundary, :].sum()) / (n_hb + n_vb)
    d_bc = (col_diff[:, ~col_boundary].sum() + row_diff[~row_boundary, :].sum()) / (n_hbc + n_vbc)
    eta = math.log2(block) / math.log2(min(h, w)) if d_b > d_bc else 0.0
    return eta * (d_b - d_bc)


def _ref_psnrb(img, ref, border):
    mse = _ref_mse(img, ref, border)
    y = rgb2y_matlab(img) if img.ndim == 3 and img.shape[2] == 3 else img.reshape(img.shape[:2])
    total = mse + _ref_bef(_ref_prepare(y, y, border)[0])
    return math.inf if total == 0 else 20 * math.log10(255.0 / math.sqrt(total))


def _assert_matches_oracle(img, ref, border, device=None):
    got = scores(img, ref, border, device=device)
    if device is None:  # one call for three: the same numbers as the three functions
        one_by_one = (psnr(img, ref, border), ssim(img, ref, border), psnrb(img, ref, border))
        assert got[0::2] == one_by_one[0::2]
        assert got[1] == one_by_one[1] or math.isnan(got[1]) and math.isnan(one_by_one[1])
    # PSNR and PSNR-B: the same exact sums, so the same bits; SSIM: the same filter sums in
    # another order (two 1-D passes), within 1e-13
    assert got[0] == _ref_psnr(img, ref, border)
    assert got[2] == _ref_psnrb(img, ref, border)
    want = _ref_ssim(img, ref, border)
    assert (math.isnan(got[1]) and math.isnan(want)) or abs(got[1] - want) < 1e-13


@pytest.mark.parametrize("folder, n_channels", [("LIVE1_color", 3), ("Classic5", 1)])
@pytest.mark.parametrize("border", [0, 4])
def test_fast_metrics_equal_the_original_on_testsets(testsets_dir, folder, n_channels, border):
    names = sorted(os.listdir(os.path.join(testsets_dir, folder)))[:4]
    for name in names:
        ref = imread_uint(os.path.join(testsets_dir, folder, name), n_channels)
        for qf in (10, 40):
            _assert_matches_oracle(jpeg(ref, qf), ref, border)


@pytest.mark.parametrize("shape", [(7, 9), (8, 8), (11, 11), (12, 30, 3), (9, 64, 3),
                                   (33, 17), (64, 48, 1), (101, 75, 3)])
def test_fast_metrics_equal_the_original_on_odd_shapes(shape):
    rng = np.random.default_rng(sum(shape))
    ref = rng.integers(0, 256, shape, dtype=np.uint8)
    noise = rng.integers(-20, 21, shape)
    img = np.clip(ref.astype(np.int64) + noise, 0, 255).astype(np.uint8)
    for border in (0, 1):
        _assert_matches_oracle(img, ref, border)
        _assert_matches_oracle(ref, ref, border)  # equal images: inf PSNR, SSIM 1


@pytest.mark.parametrize("shape", [(7, 9), (11, 11), (12, 30, 3), (33, 17), (64, 48, 1)])
def test_torch_metrics_equal_the_original_on_odd_shapes(shape):
    """The device path (used on CUDA), run here on the CPU: the same values."""
    rng = np.random.default_rng(sum(shape) + 1)
    ref = rng.integers(0, 256, shape, dtype=np.uint8)
    img = np.clip(ref.astype(np.int64) + rng.integers(-20, 21, shape), 0, 255).astype(np.uint8)
    for border in (0, 1):
        _assert_matches_oracle(img, ref, border, device="cpu")
        _assert_matches_oracle(ref, ref, border, device="cpu")


@pytest.mark.parametrize("folder, n_channels", [("LIVE1_color", 3), ("Classic5", 1)])
def test_torch_metrics_equal_the_original_on_testset_crops(testsets_dir, folder, n_channels):
    name = sorted(os.listdir(os.path.join(testsets_dir, folder)))[0]
    ref = imread_uint(os.path.join(testsets_dir, folder, name), n_channels)[:100, :132]
    for qf in (10, 40):
        for border in (0, 4):
            _assert_matches_oracle(jpeg(ref, qf), ref, border, device="cpu")


def test_device_out_of_memory_falls_back_to_numpy(monkeypatch):
    import utils.metrics as metrics

    def no_memory(*args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
    monkeypatch.setattr(metrics, "_scores_torch", no_memory)
    rng = np.random.default_rng(5)
    ref = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
    img = jpeg(ref, 20)
    assert scores(img, ref, device="cuda") == scores(img, ref)


@pytest.mark.parametrize("img, ref, message", [
    (np.zeros((8, 8), np.float64), np.zeros((8, 8), np.float64), "expected uint8 images"),
    (np.zeros((8, 8), np.uint8), np.zeros((8, 8), np.uint16), "expected uint8 images"),
])
def test_non_uint8_images_are_refused(img, ref, message):
    for fn in (psnr, ssim, psnrb, scores):
        with pytest.raises(ValueError, match=message):
            fn(img, ref)


def test_a_border_that_leaves_no_pixels_is_refused():
    img = np.zeros((10, 30), np.uint8)
    assert psnr(img, img, border=4) == math.inf  # 2x22 pixels remain
    for fn in (psnr, ssim, psnrb, scores):
        with pytest.raises(ValueError, match="border=5 leaves no pixels of a 10x30 image"):
            fn(img, img, border=5)


@pytest.mark.gpu
def test_cuda_metrics_equal_the_numpy_ones(testsets_dir):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    for folder, n_channels in (("LIVE1_color", 3), ("LIVE1_gray", 1)):
        for name in sorted(os.listdir(os.path.join(testsets_dir, folder)))[:5]:
            ref = imread_uint(os.path.join(testsets_dir, folder, name), n_channels)
            _assert_matches_oracle(jpeg(ref, 10), ref, 0, device="cuda")
