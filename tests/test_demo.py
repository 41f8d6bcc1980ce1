"""runners/demo.py without a browser: model discovery, reading uploads, restoring, callbacks.

The restoration checks compare with `models.inference.restore` on the same tiny random FBCNN,
projected onto the JPEG's quantization intervals as the demo does by default; the Gradio
callbacks run only when gradio is importable.
"""
import importlib.util
import os
import struct

import cv2
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import models.inference as inference
from data.jpeg import jpeg, jpeg_encode
from models.engines import fastest_options
from models.inference import restore as inference_restore
from models.model_zoo import MODEL_ZOO
from models.network_fbcnn import FBCNN
from runners.demo import (DEMO_MODEL_ORDER, LITE_NOTE, Demo, ModelChoices, find_models, main,
                          prepare_samples)
from tests.conftest import REPO_ROOT, calibrated_projection
from utils.errors import UserError
from utils.image import imread_uint

HAS_GRADIO = importlib.util.find_spec("gradio") is not None
# Where FBCNN_REQUIRE_BROWSER is set (CI, after .ci/install_browser.sh) these run, and fail
# without gradio, as the browser test does.
needs_gradio = pytest.mark.skipif(
    not HAS_GRADIO and not os.environ.get("FBCNN_REQUIRE_BROWSER"),
    reason="gradio not installed (pip install -r requirements-demo.txt)")


def restore(model, img, **kwargs):
    """`models.inference.restore` with the demo's engine and layout (main_restore's)."""
    return inference_restore(model, img, **fastest_options(kwargs, "cpu"))


def _save_tiny(path, in_nc=3, seed=0):
    torch.manual_seed(seed)
    save_file(FBCNN(in_nc=in_nc, out_nc=in_nc, nc=[8, 16, 32, 64], nb=1).state_dict(), str(path))
    return str(path)


def projected(img, path, model, **kwargs):
    """`img` projected onto the quantization intervals of the JPEG file at `path`, calibrated
    on a twin restored by `model` with `kwargs` (as the demo restored `img`)."""
    with open(path, "rb") as f:
        return calibrated_projection(img, f.read(), lambda x: restore(model, x, **kwargs)[0])


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return _save_tiny(tmp_path_factory.mktemp("model") / "tiny.safetensors")


@pytest.fixture
def demo(tiny_path, tmp_path):
    return Demo(ModelChoices(find_models(model_dir=str(tmp_path), requested=tiny_path)),
                str(tmp_path / "work"))


@pytest.fixture(scope="module")
def jpeg_file(tmp_path_factory):
    clean = imread_uint(os.path.join(REPO_ROOT, "testsets", "LIVE1_color", "parrots.png"))
    path = tmp_path_factory.mktemp("inputs") / "parrots_qf20.jpg"
    path.write_bytes(jpeg_encode(clean[:96, :136], 20))
    return str(path)


def test_find_models_prefers_requested_then_released_then_lite(tmp_path, tiny_path):
    bundled = [n for n in DEMO_MODEL_ORDER if n in MODEL_ZOO and MODEL_ZOO[n].bundled]
    assert list(find_models(model_dir=str(tmp_path))) == bundled  # they ship with the repo
    assert "fbcnn_color_lite" in bundled
    (tmp_path / MODEL_ZOO["fbcnn_gray"].filename).write_bytes(b"")
    (tmp_path / MODEL_ZOO["fbcnn_color"].filename).write_bytes(b"")
    found = find_models(model_dir=str(tmp_path))
    assert list(found)[:3] == ["fbcnn_color", "fbcnn_color_lite", "fbcnn_gray"]
    assert found["fbcnn_color_lite"] == "fbcnn_color_lite" and found["fbcnn_color"] == "fbcnn_color"
    found = find_models(model_dir=str(tmp_path), requested=tiny_path)
    assert list(found)[0] == "tiny" and found["tiny"] == tiny_path
    assert (list(find_models(model_dir=str(tmp_path), requested="fbcnn_color"))[:3] ==
            ["fbcnn_color", "fbcnn_color_lite", "fbcnn_gray"])


def test_find_models_refuses_the_jpeg_pseudo_model(tmp_path):
    with pytest.raises(UserError, match="needs a network"):
        find_models(model_dir=str(tmp_path), requested="jpeg")


def test_no_model_is_explained(tmp_path):
    models = ModelChoices({})
    assert models.default is None
    assert "--model" in models.describe(None)
    with pytest.raises(UserError, match="--model"):
        Demo(models, str(tmp_path)).run(str(tmp_path / "x.jpg"), None)
    with pytest.raises(UserError, match="not offered"):
        models.get("fbcnn_color")


def test_unloadable_model_is_described_not_raised(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    text = ModelChoices({"bad": str(bad)}).describe("bad")
    assert "cannot be loaded" in text and "bad.pth" in text


def test_samples_are_real_jpegs_and_a_live1_crop_at_qf10(tmp_path):
    samples = prepare_samples(str(tmp_path))
    real = sorted(n for n in os.listdir(os.path.join(REPO_ROOT, "testsets", "Real"))
                  if n.endswith(".jpg"))
    assert [label for label in samples if label.startswith("Real ")] == [f"Real {n}" for n in real]
    monarch = imread_uint(os.path.join(REPO_ROOT, "testsets", "LIVE1_color", "monarch.png"))
    crop = monarch[128:384, 256:512]
    sample = imread_uint(samples["LIVE1 monarch crop, JPEG QF 10"])
    assert np.array_equal(sample, jpeg(crop, 10))


def test_blind_then_slider_match_restore(demo, jpeg_file):
    model = demo.models.get("tiny")
    img = imread_uint(jpeg_file)
    raw, expected_qf = restore(model, img)
    expected = projected(raw, jpeg_file, model)
    blind = demo.run(jpeg_file, "tiny")
    assert blind.qf_pred == expected_qf and blind.qf_used is None and blind.tile is None
    assert np.array_equal(blind.after, expected) and np.array_equal(blind.before, img)
    assert np.array_equal(imread_uint(blind.png_path), expected)
    assert os.path.basename(blind.png_path) == "parrots_qf20_tiny_blind.png"
    assert f"Predicted QF: **{expected_qf}**" in blind.info_markdown()
    assert "projected onto the file's DCT" in blind.info_markdown()
    unprojected = Demo(demo.models, demo.work_dir, projection=False).run(jpeg_file, "tiny")
    assert np.array_equal(unprojected.after, raw) and not np.array_equal(raw, expected)
    assert "projected" not in unprojected.info_markdown()

    qf = 90 if expected_qf < 50 else 10
    controlled = demo.run(jpeg_file, "tiny", qf=qf)
    assert np.array_equal(controlled.after, projected(restore(model, img, qf=qf)[0], jpeg_file,
                                                           model, qf=qf))
    assert not np.array_equal(controlled.after, blind.after)
    assert controlled.qf_pred == expected_qf and controlled.qf_used == qf
    assert f"QF {qf} (set by the slider)" in controlled.info_markdown()
    with pytest.raises(UserError, match="between 1 and 100"):
        demo.run(jpeg_file, "tiny", qf=0)


def test_large_images_are_tiled(tiny_path, tmp_path, jpeg_file):
    demo = Demo(ModelChoices({"tiny": tiny_path}), str(tmp_path), tile=64)
    result = demo.run(jpeg_file, "tiny")
    assert result.tile == 64 and "tiled, 64 px" in result.info_markdown()
    img = imread_uint(jpeg_file)
    model = demo.models.get("tiny")
    tiled = restore(model, img, tile=64, tile_overlap=32)[0]
    assert np.array_equal(result.after, projected(tiled, jpeg_file, model, tile=64,
                                                  tile_overlap=32))
    untiled = restore(model, img)[0]
    assert not np.array_equal(result.after, projected(untiled, jpeg_file, model))


def test_cpu_tiles_large_uploads_as_restore_does(tiny_path, tmp_path, jpeg_file, monkeypatch):
    # the tiny model's width (8) takes the lite plan: tiles of 64 above 0.01 MP (96x136: 0.013)
    monkeypatch.setitem(inference.CPU_PLANS, 16, inference.CpuPlan(64, 0.01, 0.0))
    demo = Demo(ModelChoices({"tiny": tiny_path}), str(tmp_path))
    result = demo.run(jpeg_file, "tiny")
    assert result.tile == 64 and "tiled, 64 px" in result.info_markdown()
    img = imread_uint(jpeg_file)
    assert np.array_equal(result.after,
                          projected(restore(demo.models.get("tiny"), img, tile=64)[0], jpeg_file,
                                    demo.models.get("tiny")))


def test_exif_rotated_jpeg_is_restored_on_its_stored_grid_then_turned(demo, tmp_path, jpeg_file):
    data = open(jpeg_file, "rb").read()
    payload = b"Exif\x00\x00MM\x00\x2a" + struct.pack(">IHHHIHHI", 8, 1, 0x0112, 3, 1, 6, 0, 0)
    path = tmp_path / "rotated.jpg"  # orientation 6: shown turned 90 degrees clockwise
    path.write_bytes(data[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload
                     + data[2:])
    stored = imread_uint(jpeg_file)
    expected, expected_qf = restore(demo.models.get("tiny"), stored)
    result = demo.run(str(path), "tiny")
    assert np.array_equal(result.before, np.rot90(stored, -1))
    assert np.array_equal(result.after, np.rot90(projected(expected, jpeg_file,
                                                                 demo.models.get("tiny")), -1))
    assert result.qf_pred == expected_qf
    assert np.array_equal(imread_uint(result.png_path), result.after)


def test_gray_model_reads_gray(tmp_path, jpeg_file):
    gray_path = _save_tiny(tmp_path / "tiny_gray.safetensors", in_nc=1)
    demo = Demo(ModelChoices(find_models(model_dir=str(tmp_path), requested=gray_path)),
                str(tmp_path / "work"))
    result = demo.run(jpeg_file, "tiny_gray")
    gray = imread_uint(jpeg_file, n_channels=1)
    assert np.array_equal(result.before, gray)
    assert np.array_equal(result.after,
                          projected(restore(demo.models.get("tiny_gray"), gray)[0], jpeg_file,
                                    demo.models.get("tiny_gray")))


@pytest.mark.parametrize("content, message", [
    (b"", "empty file"),
    (b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4, "corrupt"),
    (b"hello, not an image at all", "not an image"),
    ("truncated", "truncated JPEG"),
])
def test_bad_uploads_name_the_file_not_its_folder(demo, tmp_path, jpeg_file, content, message):
    path = tmp_path / "upload dir" / "bad.jpg"
    path.parent.mkdir()
    if content == "truncated":
        data = open(jpeg_file, "rb").read()
        content = data[:-100]  # inside the scan: no EOI marker
    path.write_bytes(content)
    with pytest.raises(UserError, match=message) as info:
        demo.run(str(path), "tiny")
    assert str(info.value).startswith("bad.jpg: ") and "upload dir" not in str(info.value)


def test_uploads_over_the_limit_are_refused_before_decoding(tiny_path, tmp_path, jpeg_file):
    demo = Demo(ModelChoices({"tiny": tiny_path}), str(tmp_path), max_megapixels=0.01)
    with pytest.raises(UserError, match=r"136x96 pixels is over the demo's limit of 0.01"):
        demo.run(jpeg_file, "tiny")


@needs_gradio
def test_callbacks_fill_the_page(demo, jpeg_file):
    compare, download, info, error, slider = demo.on_input(jpeg_file, "tiny")
    blind = demo.run(jpeg_file, "tiny")
    assert np.array_equal(compare[1], blind.after) and np.array_equal(compare[0], blind.before)
    assert download["interactive"] is True and os.path.isfile(download["value"])
    assert np.array_equal(imread_uint(download["value"]), blind.after)
    assert error == "" and f"Predicted QF: **{blind.qf_pred}**" in info
    assert slider["value"] == blind.qf_pred  # the slider shows the prediction

    compare, download, info, error, slider = demo.on_qf(jpeg_file, "tiny", 77)
    assert slider["value"] == 77 and "QF 77 (set by the slider)" in info
    assert np.array_equal(compare[1], demo.run(jpeg_file, "tiny", qf=77).after)

    status, *outputs = demo.on_model(jpeg_file, "tiny")
    assert "nc 8-16-32-64, nb 1" in status and "(blind)" in outputs[2]


@needs_gradio
def test_callbacks_report_bad_files_in_the_page(demo, tmp_path):
    bad = tmp_path / "<b>broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0garbage")
    with pytest.warns(UserWarning, match="&lt;b&gt;broken.jpg: corrupt"):  # the toast, escaped
        compare, download, info, error, slider = demo.on_input(str(bad), "tiny")
    assert compare is None and download["interactive"] is False and info == ""
    assert error.startswith("**Error:** &lt;b&gt;broken.jpg: corrupt")
    assert demo.on_input(None, "tiny")[3] == ""  # a cleared input is no error


@needs_gradio
def test_unexpected_failures_are_one_line_in_the_page(demo, jpeg_file, monkeypatch, caplog):
    def fail(*args, **kwargs):
        raise RuntimeError("boom")
    monkeypatch.setattr(demo, "run", fail)
    with pytest.warns(UserWarning, match="RuntimeError: boom"):
        compare, download, info, error, slider = demo.on_qf(jpeg_file, "tiny", 30)
    assert compare is None and error.startswith("**Error:** restoring failed (RuntimeError: boom)")
    assert "Traceback" not in error
    assert any(r.exc_info for r in caplog.records)  # the traceback went to the server log


@needs_gradio
def test_page_has_the_controls_the_browser_test_uses(demo):
    from runners.demo import build_ui
    page = build_ui(demo, {"sample": os.path.join(REPO_ROOT, "testsets", "Real", "1.jpg")})
    ids = {block.elem_id for block in page.blocks.values()}
    assert {"upload", "sample", "model", "qf", "blind", "qf-info", "error", "download",
            "compare", "model-status"} <= ids


@pytest.mark.parametrize("argv, message", [
    (["--model", "jpeg"], "needs a network"),
    (["--model", "no/such/file.pth"], "not a known model name"),
    (["--max-megapixels", "0"], "--max-megapixels must be positive"),
])
@needs_gradio
def test_bad_options_stop_with_one_error_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


@pytest.mark.parametrize("argv, message", [
    (["--port", "99999"], "argument --port: 99999 is not in 0..65535"),
    (["--port", "-1"], "argument --port: -1 is not in 0..65535"),
    (["--max-megapixels", "nan"], "argument --max-megapixels: nan is not a finite number"),
])
@pytest.mark.timeout(60)  # were one accepted, the server would start and serve until stopped
def test_out_of_range_numbers_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


@needs_gradio
def test_an_address_that_is_not_this_machines_is_one_error_line(tiny_path, capsys):
    assert main(["--model", tiny_path, "--host", "256.1.1.1", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --host 256.1.1.1: cannot serve on it") and "Traceback" not in err


def test_formats_without_a_size_in_the_header_are_refused_before_decoding(demo, tmp_path,
                                                                          monkeypatch):
    import runners.demo
    ok, jp2 = cv2.imencode(".jp2", np.full((64, 64, 3), 120, np.uint8))  # a tiny JPEG 2000
    path = tmp_path / "bomb.jpg"
    path.write_bytes(jp2.tobytes())
    monkeypatch.setattr(runners.demo, "read_image", None)  # never decoded
    with pytest.raises(UserError, match=r"^bomb\.jpg: not an image the demo takes"):
        demo.run(str(path), "tiny")


def test_a_long_upload_name_still_restores(demo, tmp_path, jpeg_file):
    path = tmp_path / ("a" * 240 + ".jpg")
    path.write_bytes(open(jpeg_file, "rb").read())
    result = demo.run(str(path), "tiny")
    assert os.path.isfile(result.png_path)
    assert os.path.basename(result.png_path) == "a" * 100 + "_tiny_blind.png"


@pytest.mark.parametrize("tile, message", [("12", "12 is not at least 16"),
                                           ("100", "100 is not a multiple of 8")])
def test_tile_off_the_jpeg_grid_is_a_usage_error(tile, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--tile", tile])
    assert exit_.value.code == 2
    assert (f"argument --tile: {message} (tiles follow the 8x8 JPEG grid)"
            in capsys.readouterr().err)


def test_the_bundled_lite_models_are_described_with_their_limits(tiny_path):
    models = ModelChoices({"fbcnn_color_lite": "fbcnn_color_lite", "tiny": tiny_path})
    lite = models.describe("fbcnn_color_lite")
    assert "1.44 M parameters" in lite and LITE_NOTE in lite
    assert LITE_NOTE not in models.describe("tiny")


def test_the_engine_is_main_restores_unless_asked(tiny_path, tmp_path, monkeypatch):
    import models.engines as engines
    models = ModelChoices({"tiny": tiny_path})
    assert Demo(models, str(tmp_path)).speed == fastest_options({}, "cpu")
    assert Demo(models, str(tmp_path), engine="torch").speed == {"engine": "torch",
                                                                "channels_last": True}
    monkeypatch.setattr(engines, "openvino_available", lambda: False)
    with pytest.raises(UserError, match="requirements-openvino.txt"):
        Demo(models, str(tmp_path), engine="openvino")
