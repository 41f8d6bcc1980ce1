"""Tests of models/loss_ssim.py: KAIR's SSIM loss against a direct computation."""
import cv2
import numpy as np
import pytest
import torch

from models.loss_ssim import SSIMLoss, gaussian_window


def _direct_ssim(img1, img2, size=11, sigma=1.5):
    """Mean SSIM of two (N, C, H, W) float64 arrays, pixel by pixel: each local statistic is a
    sum over the zero-padded 11x11 neighbourhood weighted by the Gaussian window."""
    x = np.arange(size) - size // 2
    g = np.exp(-x ** 2 / (2 * sigma ** 2))
    g /= g.sum()
    window = np.outer(g, g)
    pad = size // 2
    n, c, h, w = img1.shape
    padded = [np.pad(a, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
              for a in (img1, img2, img1 * img1, img2 * img2, img1 * img2)]
    values = []
    for b in range(n):
        for ch in range(c):
            for i in range(h):
                for j in range(w):
                    m1, m2, s11, s22, s12 = (float(np.sum(p[b, ch, i:i + size, j:j + size]
                                                          * window)) for p in padded)
                    v1, v2, cov = s11 - m1 * m1, s22 - m2 * m2, s12 - m1 * m2
                    values.append(((2 * m1 * m2 + 0.01 ** 2) * (2 * cov + 0.03 ** 2))
                                  / ((m1 * m1 + m2 * m2 + 0.01 ** 2) * (v1 + v2 + 0.03 ** 2)))
    return float(np.mean(values))


def test_window_is_the_normalised_gaussian_of_sigma_1_5():
    window = gaussian_window().double().numpy()
    kernel = cv2.getGaussianKernel(11, 1.5)  # the test metrics' window
    np.testing.assert_allclose(window, kernel @ kernel.T, rtol=1e-6, atol=0)
    assert window.sum() == pytest.approx(1.0, abs=1e-6)


def test_identical_images_have_loss_zero():
    img = torch.rand(2, 3, 20, 17, generator=torch.Generator().manual_seed(0))
    assert SSIMLoss()(img, img.clone()).item() == 0.0


def test_loss_is_one_minus_the_directly_computed_ssim():
    rng = np.random.default_rng(3)
    a = rng.random((2, 2, 9, 12))
    b = np.clip(a + rng.normal(0, 0.2, a.shape), 0, 1)
    expected = 1 - _direct_ssim(a, b)
    assert 0.05 < expected < 1  # a case far from both ends
    got = SSIMLoss()(torch.from_numpy(a), torch.from_numpy(b)).item()
    assert got == pytest.approx(expected, rel=1e-6)
    got32 = SSIMLoss()(torch.from_numpy(a).float(), torch.from_numpy(b).float()).item()
    assert got32 == pytest.approx(expected, rel=1e-4)


def test_minimising_the_loss_brings_the_images_together():
    """The sign: gradient descent on the loss raises the SSIM (and lowers the error)."""
    g = torch.Generator().manual_seed(1)
    target = torch.rand(1, 3, 16, 16, generator=g)
    estimate = torch.rand(1, 3, 16, 16, generator=g).requires_grad_()
    loss_fn = SSIMLoss()
    first = loss_fn(estimate, target).item()
    optimiser = torch.optim.Adam([estimate], lr=0.02)
    for _ in range(30):
        optimiser.zero_grad()
        loss_fn(estimate, target).backward()
        optimiser.step()
    assert loss_fn(estimate, target).item() < 0.5 * first
