"""model_zoo/'s bundled lite models as shipped: the scores the README's "Lite models" table gives.

The colour model's LIVE1 averages are checked by CI, which runs the README's quick start; the
gray model's Classic5 average at QF 10 is checked here (10 images, seconds on a CPU).
"""
import os
import subprocess
import sys

from tests.conftest import REPO_ROOT

CLASSIC5_QF10 = "Average PSNR/SSIM/PSNRB - Classic5_fbcnn_gray_lite_qf10 -: 29.11|0.794|28.34"


def test_the_gray_lite_model_gives_the_readme_classic5_row_at_qf10(tmp_path):
    out = subprocess.run([sys.executable, "main_test_fbcnn_gray.py", "--model", "fbcnn_gray_lite",
                          "--qf", "10", "--device", "cpu", "--no-save-images",
                          "--results", str(tmp_path)],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "FBCNN_MODEL_DIR": str(tmp_path / "no_downloads")})
    assert out.returncode == 0, out.stderr
    assert CLASSIC5_QF10 in out.stdout.splitlines()
    with open(os.path.join(REPO_ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    assert "| Classic5 | fbcnn_gray_lite | 29.11 / 0.794 / 28.34 |" in readme
