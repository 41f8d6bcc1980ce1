"""Image quality metrics exactly as the FBCNN paper computed them: PSNR, SSIM and PSNR-B.

This module owns the numbers in every results table. All functions take uint8 images
(HxW or HxWx3), `img` the restored or compressed image and `ref` the ground truth, convert
them to float64 and trim `border` pixels from each side before measuring.

Colour PSNR-B quirk (kept on purpose, as in the paper's code): the MSE term is taken over
the RGB channels, while the blocking effect factor (BEF) is measured on the MATLAB-style Y
channel of `img` only, rounded to uint8.
"""
import math

import cv2
import numpy as np

from utils.image import rgb2y_matlab

__all__ = ["psnr", "ssim", "psnrb"]


def _prepare(img, ref, border):
    if img.shape != ref.shape:
        raise ValueError(f"image shapes differ: {img.shape} vs {ref.shape}")
    if img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] not in (1, 3)):
        raise ValueError(f"expected HxW or HxWx3 images, got shape {img.shape}")
    h, w = img.shape[:2]
    img = img[border:h - border, border:w - border].astype(np.float64)
    ref = ref[border:h - border, border:w - border].astype(np.float64)
    return img, ref


def psnr(img, ref, border=0):
    """PSNR in dB over all pixels and channels; inf when the images are equal."""
    img, ref = _prepare(img, ref, border)
    mse = np.mean((img - ref) ** 2)
    if mse == 0:
        return float("inf")
    return 20 * math.log10(255.0 / math.sqrt(mse))


def _ssim_channel(img, ref):
    c1 = (0.01 * 255) ** 2
    c2 = (0.03 * 255) ** 2
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


def ssim(img, ref, border=0):
    """SSIM with an 11x11 Gaussian window (sigma 1.5); colour: mean over the RGB channels.

    NaN for images under 11 pixels on a side, which have no valid window position (the
    original's mean over an empty map).
    """
    img, ref = _prepare(img, ref, border)
    if min(img.shape[:2]) < 11:
        return float("nan")
    if img.ndim == 2:
        return float(_ssim_channel(img, ref))
    return float(np.mean([_ssim_channel(img[..., c], ref[..., c]) for c in range(img.shape[2])]))


def _bef(img, block=8):
    """Blocking effect factor of a single-channel float64 image (block size 8)."""
    h, w = img.shape
    col_diff = (img[:, :-1] - img[:, 1:]) ** 2  # pairs (i, i+1), i = 0..W-2
    row_diff = (img[:-1, :] - img[1:, :]) ** 2
    col_boundary = np.zeros(w - 1, dtype=bool)
    col_boundary[block - 1::block] = True
    row_boundary = np.zeros(h - 1, dtype=bool)
    row_boundary[block - 1::block] = True

    n_hb = h * (w / block - 1)
    n_vb = w * (h / block - 1)
    n_hbc = h * (w - 1) - n_hb
    n_vbc = w * (h - 1) - n_vb
    if min(h, w) < block or n_hb + n_vb <= 0:
        return 0.0  # no block boundary inside the image: no blocking to measure

    d_b = (col_diff[:, col_boundary].sum() + row_diff[row_boundary, :].sum()) / (n_hb + n_vb)
    d_bc = (col_diff[:, ~col_boundary].sum() + row_diff[~row_boundary, :].sum()) / (n_hbc + n_vbc)
    eta = math.log2(block) / math.log2(min(h, w)) if d_b > d_bc else 0.0
    return eta * (d_b - d_bc)


def psnrb(img, ref, border=0):
    """PSNR-B in dB: MSE against `ref` plus the blocking effect factor of `img` alone."""
    img_f, ref_f = _prepare(img, ref, border)
    mse = np.mean((img_f - ref_f) ** 2)
    if img_f.ndim == 3 and img_f.shape[2] == 3:
        y = rgb2y_matlab(img)  # the paper's quirk: BEF on the Y of the image, MSE over RGB
        bef = _bef(_prepare(y, y, border)[0])
    else:
        bef = _bef(img_f.reshape(img_f.shape[:2]))
    total = mse + bef
    if total == 0:
        return float("inf")
    return 10 * math.log10(255.0 ** 2 / total)
