"""model_zoo/'s bundled lite models as shipped: the scores the README's "Lite models" table gives.

The colour model's LIVE1 averages are checked by CI, which runs the README's quick start; the
gray model's Classic5 average at QF 10 is checked here (10 images, seconds on a CPU).
"""
import os
import subprocess
import sys

from tests.conftest import REPO_ROOT


def _readme_row(testset, model):
    """The QF 10 cell of README's "Lite models" table: "PSNR / SSIM / PSNRB"."""
    with open(os.path.join(REPO_ROOT, "README.md"), encoding="utf-8") as f:
        for line in f:
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if cells[:2] == [testset, model]:
                return cells[2]
    raise AssertionError(f"README.md has no row for {testset} / {model}")


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
