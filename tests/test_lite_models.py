"""model_zoo/'s bundled lite models as shipped: the scores docs/models.md's lite-model table gives.

The colour model's LIVE1 averages are checked by CI, which runs the README's quick start; the
gray model's Classic5 average at QF 10 is checked here (10 images, seconds on a CPU).
"""
import glob
import os
import subprocess
import sys

import cv2
import numpy as np

from data.jpeg import jpeg_decode, jpeg_encode
from runners import restore
from tests.conftest import REPO_ROOT
from utils.image import imread_uint
from utils.metrics import psnr


def _readme_row(testset, model):
    """The QF 10 cell of docs/models.md's lite-model table: "PSNR / SSIM / PSNRB"."""
    with open(os.path.join(REPO_ROOT, "docs", "models.md"), encoding="utf-8") as f:
        for line in f:
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if cells[:2] == [testset, model]:
                return cells[2]
    raise AssertionError(f"docs/models.md has no row for {testset} / {model}")


def test_the_gray_lite_model_gives_the_readme_classic5_row_at_qf10(tmp_path):
    out = subprocess.run([sys.executable, "main_test_fbcnn_gray.py", "--model", "fbcnn_gray_lite",
                          "--qf", "10", "--device", "cpu", "--no-save-images",
                          "--results", str(tmp_path)],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "FBCNN_MODEL_DIR": str(tmp_path / "no_downloads")})
    assert out.returncode == 0, out.stderr
    promised = _readme_row("Classic5", "fbcnn_gray_lite").replace(" / ", "|")
    average = "Average PSNR/SSIM/PSNRB - Classic5_fbcnn_gray_lite_qf10 -: " + promised
    assert average in out.stdout.splitlines()
    assert float(promised.split("|")[0]) >= 28.70  # the shipping goal (JPEG: 27.82)


def test_the_shipped_colour_model_through_main_restore_leaves_good_jpegs_and_clean_images(
        tmp_path, offline_zoo):
    """`main_restore.py` with no flags (the bundled fbcnn_color_lite, projection on), on LIVE1's
    parrots: JPEGs of QF 90 and 95 come back better than they went in (the first stage's model
    made them worse), and the clean PNG comes back within 40 dB of itself (measured with the
    calibrated projection and the third-stage model: +0.81 and +0.59 dB, 46.37 dB)."""
    clean = imread_uint(os.path.join(REPO_ROOT, "testsets", "LIVE1_color", "parrots.png"))
    folder = tmp_path / "in"
    folder.mkdir()
    files = {qf: jpeg_encode(clean, qf) for qf in (90, 95)}
    for qf, data in files.items():
        (folder / f"q{qf}.jpg").write_bytes(data)
    cv2.imwrite(str(folder / "clean.png"), cv2.cvtColor(clean, cv2.COLOR_RGB2BGR))
    assert restore.main([str(folder), "-o", str(tmp_path / "out"), "--quiet"]) == 0
    for qf, data in files.items():
        out = imread_uint(str(tmp_path / "out" / f"q{qf}.png"))
        assert psnr(out, clean) > psnr(jpeg_decode(data, 3), clean), qf
    kept = imread_uint(str(tmp_path / "out" / "clean.png"))
    assert psnr(kept, clean) >= 40 and not np.array_equal(kept, clean)


def test_the_shipped_gray_model_through_main_restore_never_loses_on_classic5_at_qf_95(
        tmp_path, offline_zoo):
    """The case the lite gray network alone loses on (its restoration of Classic5 at QF 95 is
    0.91 dB below the JPEG): with main_restore's default calibrated projection no image loses
    more than 0.1 dB, and the mean gains (docs/models.md: +0.10 dB, worst -0.00)."""
    folder = tmp_path / "in"
    folder.mkdir()
    clean, files = {}, {}
    for path in sorted(glob.glob(os.path.join(REPO_ROOT, "testsets", "Classic5", "*.bmp"))):
        name = os.path.splitext(os.path.basename(path))[0]
        clean[name] = imread_uint(path, 1)
        files[name] = jpeg_encode(clean[name], 95)
        (folder / f"{name}.jpg").write_bytes(files[name])
    assert restore.main([str(folder), "-o", str(tmp_path / "out"), "--quiet"]) == 0
    gains = [psnr(imread_uint(str(tmp_path / "out" / f"{name}.png"), 1), clean[name])
             - psnr(jpeg_decode(files[name], 1), clean[name]) for name in clean]
    assert len(gains) == 5 and min(gains) > -0.1 and np.mean(gains) > 0
