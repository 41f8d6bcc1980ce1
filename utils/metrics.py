"""Image quality metrics exactly as the FBCNN paper computed them: PSNR, SSIM and PSNR-B.

This module owns the numbers in every results table. All functions take uint8 images (HxW or
HxWx3), `img` the restored or compressed image and `ref` the ground truth, and trim `border`
pixels from each side; `scores` gives all three at once, sharing the work. The values stay
the paper's while costing less (tests/test_metrics.py checks each against a copy of the
original float64 code): squared errors and block-boundary differences are summed as integers,
so PSNR and PSNR-B are bit-identical; SSIM's 11x11 Gaussian window is applied as two 1-D passes
(equal within 1e-13, about four times faster); `scores(..., device="cuda")` computes the same
in torch float64 on a GPU. Colour PSNR-B quirk (kept on purpose, as in the paper's code): the
MSE is taken over RGB, the blocking effect factor on the MATLAB-style Y of `img`, rounded.
"""
import math

import cv2
import numpy as np
import torch

from utils.image import rgb2y_matlab

__all__ = ["psnr", "psnrb", "scores", "ssim", "mean_score"]

_SSIM_KERNEL = cv2.getGaussianKernel(11, 1.5)  # float64; the window is its outer product
_C1 = (0.01 * 255) ** 2
_C2 = (0.03 * 255) ** 2


def mean_score(values):
    """The mean of the scores that exist: None (a score not computed) and NaN (SSIM of an image
    under 11x11 pixels) are left out; None when nothing is left. An infinite PSNR (a result
    equal to its reference) makes the mean infinite."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(values)) if values else None


def _prepare(img, ref, border):
    """Check the images and trim `border` pixels from each side (no copy)."""
    if img.shape != ref.shape:
        raise ValueError(f"image shapes differ: {img.shape} vs {ref.shape}")
    if img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] not in (1, 3)):
        raise ValueError(f"expected HxW or HxWx3 images, got shape {img.shape}")
    if img.dtype != np.uint8 or ref.dtype != np.uint8:
        raise ValueError(f"expected uint8 images, got {img.dtype} and {ref.dtype}")
    h, w = img.shape[:2]
    if min(h, w) <= 2 * border:
        raise ValueError(f"border={border} leaves no pixels of a {h}x{w} image")
    return img[border:h - border, border:w - border], ref[border:h - border, border:w - border]


def _sum_sq(diff):
    """Exact sum of squares of an integer array, as a Python int."""
    diff = diff.astype(np.int64).ravel()
    return int(np.dot(diff, diff))


def _mse(img, ref):
    """Mean squared error over all pixels and channels, from the exact integer sum."""
    return _sum_sq(np.subtract(img, ref, dtype=np.int32)) / img.size


def _psnr_from_mse(mse):
    if mse == 0:
        return float("inf")
    return 20 * math.log10(255.0 / math.sqrt(mse))


def psnr(img, ref, border=0):
    """PSNR in dB over all pixels and channels; inf when the images are equal."""
    return _psnr_from_mse(_mse(*_prepare(img, ref, border)))


def _filter(x):
    """The 11x11 Gaussian window (sigma 1.5) over the positions where it fits entirely."""
    return cv2.sepFilter2D(x, cv2.CV_64F, _SSIM_KERNEL, _SSIM_KERNEL)[5:-5, 5:-5]


def _ssim_mean(img, ref):
    """Mean SSIM map per channel of HxWxC float64 images (C <= 4: OpenCV filters channels alike)."""
    mu1, mu2 = _filter(img), _filter(ref)
    mu1_mu2 = mu1 * mu2
    mu1 *= mu1  # mu1 ** 2 from here on
    mu2 *= mu2
    sigma1_sq = _filter(img * img)
    sigma1_sq -= mu1
    sigma2_sq = _filter(ref * ref)
    sigma2_sq -= mu2
    sigma12 = _filter(img * ref)
    sigma12 -= mu1_mu2
    # ((2 mu1 mu2 + C1) (2 sigma12 + C2)) / ((mu1^2 + mu2^2 + C1) (sigma1^2 + sigma2^2 + C2))
    num = mu1_mu2
    num *= 2
    num += _C1
    sigma12 *= 2
    sigma12 += _C2
    num *= sigma12
    den = mu1
    den += mu2
    den += _C1
    sigma1_sq += sigma2_sq
    sigma1_sq += _C2
    den *= sigma1_sq
    num /= den
    if num.ndim == 2:
        return num.mean(keepdims=True)
    # channels made contiguous, so that each mean is numpy's pairwise sum as in the original
    return np.ascontiguousarray(num.transpose(2, 0, 1)).reshape(num.shape[2], -1).mean(axis=1)


def _ssim(img, ref):
    if min(img.shape[:2]) < 11:
        return float("nan")
    return float(np.mean(_ssim_mean(img.astype(np.float64), ref.astype(np.float64))))


def ssim(img, ref, border=0):
    """SSIM with an 11x11 Gaussian window (sigma 1.5); colour: mean over the RGB channels.

    NaN for images under 11 pixels on a side, which have no valid window position (the
    original's mean over an empty map).
    """
    return _ssim(*_prepare(img, ref, border))


def _bef_from_sums(h, w, boundary, inside, block=8):
    """Blocking effect factor of an h x w image from its exact sums of squared differences
    between neighbours across block boundaries (`boundary`) and everywhere else (`inside`)."""
    n_hb = h * (w / block - 1)
    n_vb = w * (h / block - 1)
    n_hbc = h * (w - 1) - n_hb
    n_vbc = w * (h - 1) - n_vb
    if min(h, w) < block or n_hb + n_vb <= 0:
        return 0.0  # no block boundary inside the image: no blocking to measure
    d_b = boundary / (n_hb + n_vb)
    d_bc = inside / (n_hbc + n_vbc)
    eta = math.log2(block) / math.log2(min(h, w)) if d_b > d_bc else 0.0
    return eta * (d_b - d_bc)


def _bef(img, block=8):
    """Blocking effect factor of a single-channel uint8 image (block size 8)."""
    img = img.astype(np.int32)
    col_diff = img[:, :-1] - img[:, 1:]  # pairs (i, i+1), i = 0..W-2
    row_diff = img[:-1, :] - img[1:, :]
    # boundary pairs are i = block-1, 2*block-1, ...; the others are the total minus those
    boundary = _sum_sq(col_diff[:, block - 1::block]) + _sum_sq(row_diff[block - 1::block, :])
    inside = _sum_sq(col_diff) + _sum_sq(row_diff) - boundary
    return _bef_from_sums(*img.shape, boundary, inside, block)


def _psnrb_from(mse, bef):
    total = mse + bef
    if total == 0:
        return float("inf")
    return 20 * math.log10(255.0 / math.sqrt(total))  # as PSNR, with MSE + BEF


def _psnrb(img_full, img, border, mse):
    if img.ndim == 3 and img.shape[2] == 3:
        y = rgb2y_matlab(img_full)  # the paper's quirk: BEF on the Y of the image, MSE over RGB
        bef = _bef(_prepare(y, y, border)[0])
    else:
        bef = _bef(img.reshape(img.shape[:2]))
    return _psnrb_from(mse, bef)


def psnrb(img, ref, border=0):
    """PSNR-B in dB: MSE against `ref` plus the blocking effect factor of `img` alone."""
    img_b, ref_b = _prepare(img, ref, border)
    return _psnrb(img, img_b, border, _mse(img_b, ref_b))


def scores(img, ref, border=0, device=None):
    """(PSNR, SSIM, PSNR-B) of `img` against `ref`, equal to the three functions one by one.

    `device` (a torch device, e.g. "cuda"): compute them there instead, in float64 with torch;
    the same values (see `_scores_torch`). The test runner does so when the network runs on
    CUDA, where NumPy's metrics would otherwise take longer than the network. When the device
    runs out of memory, the NumPy path below gives the values instead.
    """
    img_b, ref_b = _prepare(img, ref, border)
    if device is not None:
        try:
            return _scores_torch(img, ref_b, border, torch.device(device))
        except torch.cuda.OutOfMemoryError:
            pass
    mse = _mse(img_b, ref_b)
    return _psnr_from_mse(mse), _ssim(img_b, ref_b), _psnrb(img, img_b, border, mse)


# --- the same metrics in torch, for a GPU ---------------------------------------------------
# Integer sums are exact on any device, so PSNR and PSNR-B come out bit-identical to the NumPy
# path. The SSIM window is applied as 11 shifted multiply-adds per axis (a direct correlation,
# deterministic, no cuDNN algorithm choice), so SSIM agrees within 1e-13.

def _sum_sq_torch(diff):
    diff = diff.to(torch.int64)
    return int((diff * diff).sum())


def _filter_torch(x):
    """The 11x11 Gaussian window over the valid positions of the last two dimensions."""
    taps = _SSIM_KERNEL.ravel().tolist()
    h, w = x.shape[-2:]
    cols = taps[0] * x[..., :, :w - 10]
    for i, t in enumerate(taps[1:], 1):
        cols.add_(x[..., :, i:w - 10 + i], alpha=t)
    out = taps[0] * cols[..., :h - 10, :]
    for i, t in enumerate(taps[1:], 1):
        out.add_(cols[..., i:h - 10 + i, :], alpha=t)
    return out


def _ssim_torch(img, ref):
    """SSIM of (C, H, W) float64 tensors: the mean over channels of each channel's mean map.

    One statistic at a time, in place where possible: about ten image-sized float64 arrays at
    the peak."""
    if min(img.shape[-2:]) < 11:
        return float("nan")
    mu1, mu2 = _filter_torch(img), _filter_torch(ref)
    mu1_mu2 = mu1 * mu2
    mu1.square_()
    mu2.square_()
    sigmas = _filter_torch(img * img).sub_(mu1).add_(_filter_torch(ref * ref).sub_(mu2))
    den = mu1.add_(mu2).add_(_C1).mul_(sigmas.add_(_C2))  # (mu1^2 + mu2^2 + C1)(s1 + s2 + C2)
    del mu2, sigmas
    num = _filter_torch(img * ref).sub_(mu1_mu2).mul_(2).add_(_C2)  # 2 sigma12 + C2
    num.mul_(mu1_mu2.mul_(2).add_(_C1)).div_(den)
    return float(np.mean(num.mean((-2, -1)).cpu().numpy()))


def _bef_torch(img, block=8):
    """`_bef` of a single-channel uint8 (H, W) tensor."""
    img = img.to(torch.int32)
    col_diff = img[:, :-1] - img[:, 1:]
    row_diff = img[:-1, :] - img[1:, :]
    boundary = (_sum_sq_torch(col_diff[:, block - 1::block])
                + _sum_sq_torch(row_diff[block - 1::block, :]))
    inside = _sum_sq_torch(col_diff) + _sum_sq_torch(row_diff) - boundary
    return _bef_from_sums(*img.shape, boundary, inside, block)


def _scores_torch(img, ref_b, border, device):
    """`scores` on `device`: `img` whole (its Y gives the colour BEF), `ref_b` already trimmed
    by `_prepare`."""
    full = torch.from_numpy(np.ascontiguousarray(img)).to(device)
    h, w = img.shape[:2]
    a = full[border:h - border, border:w - border]
    b = torch.from_numpy(np.ascontiguousarray(ref_b)).to(device)
    mse = _sum_sq_torch(a.to(torch.int32) - b.to(torch.int32)) / a.numel()
    if a.ndim == 2:
        a, b = a[..., None], b[..., None]
    ssim_value = _ssim_torch(a.permute(2, 0, 1).to(torch.float64),
                             b.permute(2, 0, 1).to(torch.float64))
    if a.shape[2] == 3:  # the paper's quirk: BEF on the Y of the image, MSE over RGB
        # the Y channel from the one function of utils.image (on the host, one cheap pass)
        y = torch.from_numpy(rgb2y_matlab(img)).to(device)
        bef = _bef_torch(y[border:h - border, border:w - border])
    else:
        bef = _bef_torch(a[..., 0])
    return _psnr_from_mse(mse), ssim_value, _psnrb_from(mse, bef)
