"""The floors of the project (entry scripts -> runners -> models -> data -> utils): the
import-linter contract of pyproject.toml, and OpenCV's pixel cap in force in every entry point."""
import os
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import REPO_ROOT


def _lint_imports(root):
    return subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import "
                           "lint_imports_command; sys.exit(lint_imports_command())"],
                          cwd=root, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": root})


def test_the_import_contract_holds():
    out = _lint_imports(REPO_ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 kept, 0 broken" in out.stdout


def test_an_upward_import_breaks_the_contract(tmp_path):
    """The check can fail: a copy of the packages where utils imports models is refused."""
    for name in ("utils", "data", "models", "runners"):
        os.symlink(os.path.join(REPO_ROOT, name), tmp_path / name)
    (tmp_path / "pyproject.toml").write_text(open(os.path.join(REPO_ROOT, "pyproject.toml")).read())
    os.remove(tmp_path / "utils")
    (tmp_path / "utils").mkdir()
    for entry in os.listdir(os.path.join(REPO_ROOT, "utils")):
        if entry.endswith(".py"):
            os.symlink(os.path.join(REPO_ROOT, "utils", entry), tmp_path / "utils" / entry)
    (tmp_path / "utils" / "upward.py").write_text("from models import model_zoo  # noqa: F401\n")
    out = _lint_imports(str(tmp_path))
    assert out.returncode != 0
    assert "BROKEN" in out.stdout and "utils.upward -> models.model_zoo" in out.stdout


# Every entry point, as a user starts it; --help stops each after its imports.
ENTRY_POINTS = [["main_test_fbcnn_color.py"], ["main_test_fbcnn_gray.py"],
                ["main_test_fbcnn_gray_doublejpeg.py"], ["main_test_fbcnn_color_real.py"],
                ["main_train_fbcnn.py"], ["main_restore.py"], ["app.py"],
                ["-m", "runners.prepare_subimages"], ["-m", "runners.export_onnx"],
                ["-m", "benchmarks.bench_inference"], ["-m", "benchmarks.eval_qf_head"]]

# Runs an entry point after a hook that notes OpenCV's pixel cap at the moment cv2 is first
# imported; prints it last (the entry point's own output comes before).
_PROBE = textwrap.dedent("""
    import atexit, importlib.abc, os, runpy, sys
    seen = []
    class Probe(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "cv2" and not seen:
                seen.append(os.environ.get("OPENCV_IO_MAX_IMAGE_PIXELS"))
            return None
    sys.meta_path.insert(0, Probe())
    atexit.register(lambda: print("CAP AT CV2 IMPORT:", seen[0] if seen else "cv2 not imported"))
    args = sys.argv[1:]
    if args[0] == "-m":
        sys.argv = [args[1], *args[2:]]
        runpy.run_module(args[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = args
        runpy.run_path(args[0], run_name="__main__")
""")


@pytest.mark.parametrize("entry", ENTRY_POINTS, ids=lambda e: e[-1])
def test_every_entry_point_caps_opencv_before_importing_it(entry):
    env = {k: v for k, v in os.environ.items() if k != "OPENCV_IO_MAX_IMAGE_PIXELS"}
    env.update(FBCNN_MAX_PIXELS="1234567", PYTHONPATH=REPO_ROOT)
    out = subprocess.run([sys.executable, "-c", _PROBE, *entry, "--help"], cwd=REPO_ROOT,
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "CAP AT CV2 IMPORT: 1234567", out.stderr[-2000:]
