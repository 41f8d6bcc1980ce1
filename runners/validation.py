"""Validation during training: the network restores every test image blind.

This module owns what a validation reports: per image and on average PSNR, SSIM, PSNR-B and
the predicted QF, beside the same metrics of the unrestored JPEG (measured once per run), and
the restored images when asked for.
"""
import logging
import os

from data.jpeg import label_to_qf
from utils.fileio import make_folder
from utils.image import ImageReadError, imwrite, tensor2uint
from utils.metrics import mean_score, scores

__all__ = ["validate"]

logger = logging.getLogger("fbcnn.runners.training")


def _uint8_image(chw):
    img = chw.permute(1, 2, 0).numpy()
    return img[:, :, 0] if img.shape[2] == 1 else img


def _measure(E, H):
    return dict(zip(("psnr", "ssim", "psnrb"), scores(E, H)))


def validate(model, test_set, step, image_dir=None, jpeg_cache=None, stop=None):
    """Restore every test image blind; per-image and average PSNR/SSIM/PSNR-B and predicted QF.

    `jpeg_cache` (a dict kept between calls) holds the metrics of the unrestored JPEG inputs,
    measured once, so each result can be read against the JPEG baseline. `stop`, a callable,
    is asked before each image: when it says True, validation ends there and returns None.
    """
    rows = []
    for index in range(len(test_set)):
        if stop is not None and stop():
            return None
        try:
            item = test_set[index]
        except ImageReadError as exc:  # a file damaged since the start: skip it, keep training
            logger.warning("validation: skipped %s", exc)
            continue
        E, qf_est = model.test(item["L"][None])
        img_E, img_H = tensor2uint(E), _uint8_image(item["H"])
        # the path below the test folder: images of one name in two sub-folders stay apart
        name = os.path.splitext(os.path.relpath(item["H_path"], test_set.dataroot_H))[0]
        row = {"name": name, **_measure(img_E, img_H), "qf": label_to_qf(qf_est[0, 0])}
        if jpeg_cache is not None:
            key = item["H_path"]
            if key not in jpeg_cache:
                jpeg_cache[key] = _measure(_uint8_image(item["L"]), img_H)
            row.update({f"jpeg_{k}": v for k, v in jpeg_cache[key].items()})
        rows.append(row)
        logger.info("%4d--> %20s | PSNR %.2fdB | SSIM %.4f | PSNR-B %.2fdB | QF %d",
                    index + 1, name, row["psnr"], row["ssim"], row["psnrb"], row["qf"])
        if image_dir is not None:
            folder = os.path.join(image_dir, name)
            make_folder(folder)
            imwrite(os.path.join(folder, f"{os.path.basename(name)}_{step}.png"), img_E)
    keys = [k for k in rows[0] if k != "name"] if rows else []
    average = {k: mean_score([r[k] for r in rows]) for k in keys}
    return rows, average
