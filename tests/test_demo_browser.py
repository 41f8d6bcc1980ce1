"""app.py end to end: the demo served on 127.0.0.1 and driven in headless Debian Chromium.

A tiny random FBCNN (nc 8-16-32-64, nb 1) is saved to a .safetensors file and served with
`python app.py --model FILE --port 0`; Playwright drives /usr/bin/chromium (not a browser of its
own). The page's results are checked against `restore` run here on the same weights.

Skips when Chromium, Playwright or Gradio is missing, unless FBCNN_REQUIRE_BROWSER is set (CI
sets it after .ci/install_browser.sh), in which case it fails instead.
"""
import importlib.util
import os
import queue
import re
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from data.jpeg import jpeg_encode
from models.engines import fastest_options
from models.inference import restore as inference_restore
from models.model_zoo import load_model
from models.network_fbcnn import FBCNN
from tests.conftest import REPO_ROOT, calibrated_projection
from utils.image import imread_uint

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
# Debian's Chromium on a machine without network; Playwright adds a fresh --user-data-dir.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync"]
STARTUP_TIMEOUT_S = 60
STEP_TIMEOUT_MS = 20_000


def restore(model, img, **kwargs):
    """`models.inference.restore` with the demo's engine and layout (main_restore's)."""
    return inference_restore(model, img, **fastest_options(kwargs, "cpu"))


def _require_browser_stack():
    missing = [what for what, ok in (
        (CHROMIUM, os.path.isfile(CHROMIUM)),
        ("the gradio package", importlib.util.find_spec("gradio") is not None),
        ("the playwright package", importlib.util.find_spec("playwright") is not None)) if not ok]
    if not missing:
        return
    message = (f"{', '.join(missing)} not installed; run .ci/install_browser.sh "
               f"(apt chromium chromium-driver, pip install -r requirements-demo.txt)")
    if os.environ.get("FBCNN_REQUIRE_BROWSER"):
        pytest.fail(f"FBCNN_REQUIRE_BROWSER is set but {message}")
    pytest.skip(message)


def _start_app(model_path):
    """Start app.py on a free port; returns (process, url) once it prints its address."""
    proc = subprocess.Popen([sys.executable, "app.py", "--model", model_path, "--port", "0",
                             "--device", "cpu"], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
    lines = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout] and None,
                     daemon=True).start()
    seen, deadline = [], time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=0.5)
        except queue.Empty:
            if proc.poll() is not None:
                break
            continue
        seen.append(line)
        match = re.search(r"running at (http://127\.0\.0\.1:\d+)/? ", line)
        if match:
            return proc, match.group(1)
    proc.kill()
    proc.wait()
    pytest.fail("app.py did not print its address within "
                f"{STARTUP_TIMEOUT_S} s; its output:\n{''.join(seen)}")


def _download(page, tmp_path, name):
    with page.expect_download(timeout=STEP_TIMEOUT_MS) as info:
        page.locator("#download").click()
    download = info.value
    path = tmp_path / name
    download.save_as(path)
    return download.suggested_filename, imread_uint(str(path))


def _wait_for_text(page, selector, pattern):
    """The text of `selector` once it matches the regex `pattern`."""
    page.wait_for_function(
        "([sel, pat]) => new RegExp(pat).test(document.querySelector(sel)?.innerText ?? '')",
        arg=[selector, pattern], timeout=STEP_TIMEOUT_MS)
    return page.locator(selector).inner_text()


@pytest.mark.timeout(150)
def test_demo_in_chromium(tmp_path):
    _require_browser_stack()
    from playwright.sync_api import sync_playwright

    torch.manual_seed(0)
    model_path = str(tmp_path / "tiny.safetensors")
    from safetensors.torch import save_file
    save_file(FBCNN(nc=[8, 16, 32, 64], nb=1).state_dict(), model_path)
    clean = imread_uint(os.path.join(REPO_ROOT, "testsets", "LIVE1_color", "parrots.png"))
    jpeg_path = tmp_path / "parrots_qf20.jpg"
    jpeg_path.write_bytes(jpeg_encode(clean[:96, :128], 20))
    broken_path = tmp_path / "broken.jpg"
    broken_path.write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4)

    model = load_model(model_path)
    jpeg_img = imread_uint(str(jpeg_path))
    data = jpeg_path.read_bytes()  # the demo projects by default
    expected_blind, expected_qf = restore(model, jpeg_img)
    expected_blind = calibrated_projection(expected_blind, data, lambda x: restore(model, x)[0])
    proc, url = _start_app(model_path)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
            page = browser.new_page(viewport={"width": 1280, "height": 900},
                                    accept_downloads=True)
            page.goto(url, timeout=STEP_TIMEOUT_MS)
            assert "tiny" in page.locator("#model-status").inner_text()

            page.locator("#upload input[type=file]").set_input_files(str(jpeg_path))
            info = _wait_for_text(page, "#qf-info", r"Predicted QF: \d+")
            predicted = int(re.search(r"Predicted QF: (\d+)", info).group(1))
            assert predicted == expected_qf
            assert "(blind)" in info
            name, blind = _download(page, tmp_path, "blind.png")
            assert name == "parrots_qf20_tiny_blind.png"
            assert blind.shape == jpeg_img.shape
            assert np.abs(blind.astype(int) - expected_blind).max() <= 1

            qf = 90 if predicted < 50 else 10
            number = page.locator("#qf input[type=number]")
            number.fill(str(qf))
            number.press("Tab")  # the slider's release event fires on blur
            _wait_for_text(page, "#qf-info", rf"QF {qf} \(set by the slider\)")
            name, controlled = _download(page, tmp_path, "controlled.png")
            assert name == f"parrots_qf20_tiny_qf{qf}.png"
            assert np.abs(controlled.astype(int) - blind).max() > 1  # the slider changed it
            expected_controlled = calibrated_projection(
                restore(model, jpeg_img, qf=qf)[0], data, lambda x: restore(model, x, qf=qf)[0])
            assert np.abs(controlled.astype(int) - expected_controlled).max() <= 1
            page.screenshot(path=str(tmp_path / "demo_result.png"), full_page=True)

            page.locator("#sample input").click()
            page.get_by_role("option", name="LIVE1 monarch crop, JPEG QF 10").click()
            info = _wait_for_text(page, "#qf-info", "256×256 px")
            assert "(blind)" in info

            page.locator("#upload button[aria-label='Clear']").click()
            page.locator("#upload input[type=file]").set_input_files(str(broken_path))
            error = _wait_for_text(page, "#error", "broken.jpg")
            assert "Error" in error and "corrupt" in error
            _wait_for_text(page, ".toast-body", "broken.jpg")  # and the warning toast
            assert "Traceback" not in page.locator("body").inner_text()
            assert page.locator("#qf-info").inner_text().strip() == ""
            shot = tmp_path / "demo_error.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            browser.close()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
