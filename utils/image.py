"""Image files and pixel layouts: reading, writing, colour conversion, uint8 <-> tensor.

This module owns how an image on disk becomes the uint8 array every other module works on:
RGB order for colour (HxWx3), plain HxW for grayscale, exactly as the original scripts read
them with OpenCV. Errors name the file at fault.
"""
import os

import cv2
import numpy as np
import torch

from utils.errors import UserError

__all__ = ["IMG_EXTENSIONS", "ImageReadError", "list_images", "imread_uint", "imwrite",
           "rgb2y_matlab", "uint2tensor", "tensor2uint"]

IMG_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


class ImageReadError(UserError):
    """An image file that cannot be decoded; the message names the file."""


def list_images(folder):
    """Sorted paths of the image files directly inside `folder` (by extension, case-insensitive)."""
    return sorted(os.path.join(folder, name) for name in os.listdir(folder)
                  if name.lower().endswith(IMG_EXTENSIONS) and os.path.isfile(os.path.join(folder, name)))


def imread_uint(path, n_channels=3):
    """Read `path` as uint8: HxWx3 RGB when n_channels is 3, HxW grayscale when it is 1.

    Colour is OpenCV's BGR read converted to RGB (a grayscale file becomes three equal channels);
    grayscale is OpenCV's grayscale read, as in the original test scripts.
    """
    if n_channels not in (1, 3):
        raise ValueError(f"n_channels must be 1 or 3, got {n_channels}")
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise ImageReadError(f"{path}: cannot read file ({exc.strerror or exc})") from None
    img = cv2.imdecode(data, cv2.IMREAD_GRAYSCALE if n_channels == 1 else cv2.IMREAD_COLOR) \
        if data.size else None
    if img is None:
        raise ImageReadError(f"{path}: not a readable image (empty, truncated or unknown format)")
    if n_channels == 3:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    return img


def imwrite(path, img):
    """Write a uint8 HxW or HxWx3 RGB image; the format follows the file extension."""
    if img.ndim == 3 and img.shape[2] == 3:
        img = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
    ext = os.path.splitext(path)[1] or ".png"
    ok, buf = cv2.imencode(ext, img)
    if not ok:
        raise OSError(f"{path}: OpenCV could not encode the image as {ext}")
    buf.tofile(path)


def rgb2y_matlab(img):
    """MATLAB-style Y (BT.601, range 16-235) of an RGB uint8 image, rounded to uint8."""
    img = img.astype(np.float64)
    y = img[..., 0] * 65.481 / 255 + img[..., 1] * 128.553 / 255 + img[..., 2] * 24.966 / 255 + 16
    return np.round(y).astype(np.uint8)


def uint2tensor(img):
    """uint8 HxW or HxWxC -> float32 tensor (1, C, H, W) in [0, 1]."""
    if img.ndim == 2:
        img = img[:, :, None]
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float().div(255.0).unsqueeze(0)


def tensor2uint(tensor):
    """Tensor (1, C, H, W) or (C, H, W) -> uint8 HxW or HxWx3: clip to [0, 1], x255, round."""
    img = tensor.detach().squeeze(0).float().clamp(0, 1).mul(255.0).round().byte().cpu()
    img = img.permute(1, 2, 0).numpy()
    return img[:, :, 0] if img.shape[2] == 1 else img
