"""The SSIM image loss of KAIR and the original FBCNN (`G_lossfn_type: "ssim"`).

This module owns `SSIMLoss`, KAIR's `models/loss_ssim.py` (itself from the pytorch-ssim
package) as a torch loss on [0, 1] images: an 11x11 Gaussian window of sigma 1.5 (built as
KAIR builds it, in float32, normalised to sum 1), applied to each channel separately
(`conv2d` with `groups` = channels) with zero padding of `window_size // 2`, so the SSIM map
has the image's size; C1 = 0.01**2, C2 = 0.03**2; the mean of the map over every pixel,
channel and sample (`size_average`). The loss is `1 - SSIM`: 0 for identical images.

It is not the SSIM of the test tables (`utils.metrics.ssim`: uint8 images, OpenCV's filter
and the valid region only): this one is differentiable and sees the zero-padded borders, as
the original's training did.
"""
import math

import torch
import torch.nn.functional as F

__all__ = ["SSIMLoss", "gaussian_window"]

C1 = 0.01 ** 2
C2 = 0.03 ** 2


def gaussian_window(window_size=11, sigma=1.5):
    """The 2-D Gaussian window (window_size, window_size) as KAIR makes it: the 1-D weights
    `exp(-(x - window_size // 2)**2 / (2 sigma**2))` in float32, divided by their sum, and
    their outer product."""
    centre = window_size // 2
    weights = torch.tensor([math.exp(-(x - centre) ** 2 / float(2 * sigma ** 2))
                            for x in range(window_size)], dtype=torch.float32)
    weights = (weights / weights.sum()).unsqueeze(1)
    return weights.mm(weights.t())


class SSIMLoss(torch.nn.Module):
    """`1 - SSIM(img1, img2)` of two (N, C, H, W) batches in [0, 1], averaged (see the module
    docstring); differentiable in both arguments."""

    def __init__(self, window_size=11, sigma=1.5):
        super().__init__()
        self.window_size = window_size
        self.register_buffer("window", gaussian_window(window_size, sigma), persistent=False)

    def ssim(self, img1, img2):
        """The mean SSIM of the two batches."""
        channels = img1.shape[1]
        window = self.window.to(device=img1.device, dtype=img1.dtype)
        window = window.expand(channels, 1, self.window_size, self.window_size)

        def blur(x):
            return F.conv2d(x, window, padding=self.window_size // 2, groups=channels)

        mu1, mu2 = blur(img1), blur(img2)
        mu1_sq, mu2_sq, mu1_mu2 = mu1 * mu1, mu2 * mu2, mu1 * mu2
        sigma1_sq = blur(img1 * img1) - mu1_sq
        sigma2_sq = blur(img2 * img2) - mu2_sq
        sigma12 = blur(img1 * img2) - mu1_mu2
        ssim_map = (((2 * mu1_mu2 + C1) * (2 * sigma12 + C2))
                    / ((mu1_sq + mu2_sq + C1) * (sigma1_sq + sigma2_sq + C2)))
        return ssim_map.mean()

    def forward(self, img1, img2):
        return 1 - self.ssim(img1, img2)
