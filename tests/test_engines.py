"""models/engines.py: the OpenVINO engine against PyTorch fp32, its cache, and the defaults.

OpenVINO is an optional extra; CI installs it (requirements-test.txt), so these run there.
Where it is missing they are skipped, except the checks of what a user without it is told.
"""
import os

import numpy as np
import pytest
import torch

import models.consistency as consistency
import models.engines as engines
from models.engines import (INSTALL_OPENVINO, check_engine, fastest_options,
                            openvino_available, openvino_fns, resolve_engine)
from models.inference import restore
from models.model_zoo import load_model
from models.network_fbcnn import FBCNN
from models.tiling import forward_tiled
from runners import restore as main_restore
from utils.errors import UserError
from utils.image import imread_uint
from tests.conftest import with_skip_gate

needs_openvino = pytest.mark.skipif(not openvino_available(),
                                    reason=f"openvino not installed ({INSTALL_OPENVINO})")


@pytest.fixture(scope="module")
def random_net():
    torch.manual_seed(0)
    return FBCNN(3, 3, [8, 16, 32, 64], nb=1).eval()


@pytest.fixture(scope="module")
def photo(testsets_dir):
    img = imread_uint(os.path.join(testsets_dir, "LIVE1_color", "bikes.png"))
    return torch.from_numpy(np.ascontiguousarray(img[:120, :200])).permute(2, 0, 1)[None] / 255.


@needs_openvino
@pytest.mark.parametrize("weights", ["random", "random_global_skip", "random_skip_gate",
                                     "fbcnn_color_lite", "fbcnn_gray_lite"])
def test_openvino_fp32_equals_pytorch_fp32_within_1e_4(weights, random_net, photo):
    """Blind and with a QF, untiled and tiled (blind tiles: the encoder, the QF of the whole
    image, then the decoder), the float outputs and the predicted QF."""
    if weights.startswith("random"):
        net = random_net
        if weights == "random_global_skip":  # the same weights, the input added to the output
            net = FBCNN(3, 3, [8, 16, 32, 64], nb=1, global_skip=True).eval()
            net.load_state_dict(random_net.state_dict())
        elif weights == "random_skip_gate":  # the same weights, output and input blended
            net = with_skip_gate(random_net, std=0.02, seed=3)
    else:
        net = load_model(weights).net.float().eval()
    x = photo[:, :1] if net.in_nc == 1 else photo
    fns = openvino_fns(net, "fp32")
    with torch.no_grad():
        for qf_input in (None, torch.tensor([[0.6]])):
            expected, expected_qf = net(x, qf_input)
            got, got_qf = fns.forward(x, qf_input)
            assert (got - expected).abs().max() < 1e-4
            assert (got_qf - expected_qf).abs().max() < 1e-5
            tiled, tiled_qf = forward_tiled(fns, x, qf_input, 64, 16, cache_bytes=1 << 20)
            reference, reference_qf = forward_tiled(net, x, qf_input, 64, 16)
            assert (tiled - reference).abs().max() < 1e-4
            assert (tiled_qf - reference_qf).abs().max() < 1e-5


@needs_openvino
def test_restore_through_openvino_is_within_a_grey_level(photo):
    model = load_model("fbcnn_color_lite")
    img = (photo[0].permute(1, 2, 0) * 255).round().byte().numpy()
    for qf in (None, 30):
        for kwargs in ({}, {"tile": 64}):
            expected, expected_qf = restore(model, img, qf=qf, **kwargs)
            got, got_qf = restore(model, img, qf=qf, engine="openvino", **kwargs)
            assert got_qf == expected_qf
            assert np.abs(got.astype(int) - expected).max() <= 1
    high, _ = restore(model, img, bit_depth=16, engine="openvino")
    assert high.dtype == np.uint16
    assert np.abs(high.astype(int) - restore(model, img, bit_depth=16)[0]).max() <= 257


@needs_openvino
def test_bf16_is_a_choice_close_to_fp32(random_net, photo):
    with torch.no_grad():
        expected, _ = random_net(photo)
        got, _ = openvino_fns(random_net, "bf16").forward(photo)
    assert (got - expected).abs().max() < 0.05


@needs_openvino
def test_converted_parts_are_kept_and_read_back(tmp_path, monkeypatch, random_net, photo):
    monkeypatch.setenv("FBCNN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(engines, "_CONVERTED", type(engines._CONVERTED)())
    with torch.no_grad():
        first, _ = openvino_fns(random_net).forward(photo)
    kept = sorted(name for name in os.listdir(tmp_path / "cache") if name.endswith(".xml"))
    assert len(kept) == 1 and kept[0].endswith("-whole.xml")
    monkeypatch.setattr(engines, "_CONVERTED", type(engines._CONVERTED)())

    def no_export(*args):
        raise AssertionError("exported again")

    monkeypatch.setattr(engines, "_export", no_export)
    with torch.no_grad():
        again, _ = openvino_fns(random_net).forward(photo)
    assert torch.equal(first, again)
    # other weights are other files
    other = FBCNN(3, 3, [8, 16, 32, 64], nb=1)
    assert engines._weights_key(other) != engines._weights_key(random_net)
    skip = FBCNN(3, 3, [8, 16, 32, 64], nb=1, global_skip=True)  # the same weights, skip added
    skip.load_state_dict(random_net.state_dict())
    assert engines._weights_key(skip) != engines._weights_key(random_net)
    # closed, a gate computes the plain network's output, but its decoder takes the input too
    closed = with_skip_gate(random_net, std=0.0, seed=0)
    assert engines._weights_key(closed) != engines._weights_key(random_net)


@needs_openvino
def test_parts_converted_in_a_bf16_pass_are_fp32_graphs(tmp_path, monkeypatch, random_net,
                                                        photo):
    """`restore(precision="bf16")` runs under bf16 autocast; the parts it converts first must
    not trace that autocast into the graph, or the kept file (shared by every precision) would
    take bf16 inputs: a tiled bf16 pass failed on its first run, and an fp32 pass after it would
    have run bf16 arithmetic."""
    monkeypatch.setenv("FBCNN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(engines, "_CONVERTED", type(engines._CONVERTED)())
    img = (photo[0].permute(1, 2, 0) * 255).round().byte().numpy()
    model = load_model("fbcnn_color_lite")
    model.net = random_net
    first, _ = restore(model, img, engine="openvino", precision="bf16", tile=64)
    kept = sorted(name for name in os.listdir(tmp_path / "cache") if name.endswith(".xml"))
    assert [name.split("-")[-1] for name in kept] == ["decoder.xml", "encoder.xml"]
    for name in kept:
        assert 'element_type="bf16"' not in (tmp_path / "cache" / name).read_text()
    monkeypatch.setattr(engines, "_CONVERTED", type(engines._CONVERTED)())
    with torch.no_grad():
        fp32, _ = forward_tiled(openvino_fns(random_net, "fp32"), photo, None, 64, 16)
        reference, _ = forward_tiled(random_net, photo, None, 64, 16)
    assert (fp32 - reference).abs().max() < 1e-4


@needs_openvino
def test_a_cache_that_cannot_be_written_costs_time_not_the_run(tmp_path, monkeypatch,
                                                              random_net, photo, caplog):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("FBCNN_CACHE_DIR", str(blocker))
    monkeypatch.setattr(engines, "_CONVERTED", type(engines._CONVERTED)())
    with torch.no_grad():
        got, _ = openvino_fns(random_net).forward(photo)
        expected, _ = random_net(photo)
    assert (got - expected).abs().max() < 1e-4
    assert "could not keep the converted network" in caplog.text


def test_without_openvino_the_error_names_the_install(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(engines, "openvino_available", lambda: False)
    with pytest.raises(UserError, match="pip install -r requirements-openvino.txt"):
        check_engine("openvino")
    jpeg = tmp_path / "a.jpg"
    jpeg.write_bytes(b"")
    assert main_restore.main([str(jpeg), "-o", str(tmp_path / "out"), "--engine",
                              "openvino"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "requirements-openvino.txt" in err[0]
    assert not (tmp_path / "out").exists()


def test_engine_options_are_checked():
    with pytest.raises(ValueError, match="engine='onnx'"):
        check_engine("onnx")
    with pytest.raises(ValueError, match="fp32 or bf16"):
        check_engine("openvino", "fp16")
    with pytest.raises(ValueError, match="runs on the CPU"):
        check_engine("openvino", "fp32", "cuda")


def test_main_restores_defaults_are_the_fastest_installed(monkeypatch):
    monkeypatch.setattr(engines, "openvino_available", lambda: True)
    assert fastest_options({}, "cpu") == {"engine": "auto", "channels_last": True}
    assert fastest_options({"engine": "torch"}, "cpu") == {"engine": "torch",
                                                          "channels_last": True}
    assert fastest_options({"engine": "openvino"}, "cpu") == {"engine": "openvino"}
    assert fastest_options({"compile": True}, "cpu") == {"compile": True}
    assert fastest_options({}, "cuda") == {}
    # auto: OpenVINO untiled or in bf16, PyTorch for tiled fp32, fp16 and off the CPU
    assert resolve_engine("auto", "fp32", tiled=False) == "openvino"
    assert resolve_engine("auto", "fp32", tiled=True) == "torch"
    assert resolve_engine("auto", "bf16", tiled=True) == "openvino"
    assert resolve_engine("auto", "fp16", tiled=False) == "torch"
    assert resolve_engine("auto", "fp32", tiled=False, device="cuda") == "torch"
    assert resolve_engine("torch", "fp32") == "torch"
    monkeypatch.setattr(engines, "openvino_available", lambda: False)
    assert fastest_options({}, "cpu") == {"channels_last": True}
    assert resolve_engine("auto", "fp32") == "torch"
    check_engine("auto")  # auto runs without OpenVINO: on PyTorch


def test_auto_is_resolved_for_the_image_with_every_tiling_option(monkeypatch, photo):
    """restore_consistent resolves `auto` once per image from the tiling restore will use, the
    caller's limits included (a photo over `max_untiled_megapixels` is a tiled pass)."""
    seen = []

    def record(engine, precision="fp32", tiled=False, device="cpu"):
        seen.append(tiled)
        return "torch"

    monkeypatch.setattr(consistency, "resolve_engine", record)
    img = (photo[0].permute(1, 2, 0) * 255).round().byte().numpy()
    model = load_model("fbcnn_color_lite")
    for limit in (None, 0.001):
        consistency.restore_consistent_batch(model, [img], [None], engine="auto",
                                             max_untiled_megapixels=limit)
    assert seen == [False, True]
