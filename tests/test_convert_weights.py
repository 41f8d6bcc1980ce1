"""Tests of runners/convert_weights.py: .pth <-> .safetensors with the architecture metadata."""
import os

import pytest
import torch
from safetensors import safe_open

from models.model_zoo import infer_fbcnn_kwargs, load_model, read_fbcnn_kwargs
from models.network_fbcnn import FBCNN
from runners import convert_weights
from tests.conftest import TouchOnUnpickle
from utils.checkpoint import save_network
from utils.errors import UserError
from utils.weight_codec import decode_int8, encode_int8

pytestmark = pytest.mark.usefixtures("one_thread")


def _original_pth(path, act_mode="BR"):
    """Weights as the original saves them: `torch.save(net.state_dict())`, BatchNorm included
    (its training JSONs say BR), with non-trivial running statistics."""
    torch.manual_seed(0)
    net = FBCNN(in_nc=1, out_nc=1, nc=[8, 16, 32, 64], nb=1, act_mode=act_mode)
    with torch.no_grad():
        net(torch.rand(2, 1, 24, 24))  # moves BatchNorm's running statistics
    state = net.state_dict()
    torch.save(state, path)
    return state


def test_round_trip_pth_safetensors_pth_keeps_every_tensor_and_the_architecture(tmp_path):
    original = _original_pth(tmp_path / "100_G.pth")
    st, back = tmp_path / "w.safetensors", tmp_path / "back.pth"
    assert convert_weights.main([str(tmp_path / "100_G.pth"), str(st)]) == 0
    kwargs = {"in_nc": 1, "out_nc": 1, "nc": [8, 16, 32, 64], "nb": 1, "act_mode": "BR",
              "downsample_mode": "strideconv", "upsample_mode": "convtranspose",
              "global_skip": False, "skip_gate": False}
    assert read_fbcnn_kwargs(str(st)) == kwargs
    with safe_open(str(st), framework="pt") as f:
        assert f.metadata()["converted_from"] == "100_G.pth"
        assert set(f.keys()) == set(original)
        assert all(torch.equal(f.get_tensor(k), v) for k, v in original.items())
    assert convert_weights.main([str(st), str(back)]) == 0
    plain = torch.load(back, weights_only=True)
    assert list(plain) == list(original)
    assert all(torch.equal(plain[k], v) and plain[k].dtype == v.dtype for k, v in original.items())
    # what the original's test scripts do with a .pth
    model = FBCNN(in_nc=1, out_nc=1, nc=[8, 16, 32, 64], nb=1, act_mode="BR")
    model.load_state_dict(torch.load(back), strict=True)
    loaded = load_model(str(st))  # and here, the architecture from the metadata alone
    assert all(torch.equal(loaded.net.state_dict()[k], v) for k, v in original.items())


def test_our_fp16_safetensors_become_a_pth_the_original_loads(tmp_path):
    net = FBCNN(in_nc=3, out_nc=3, nc=[8, 16, 32, 64], nb=1)
    src = save_network(str(tmp_path / "lite.safetensors"), net.state_dict(),
                       infer_fbcnn_kwargs(net.state_dict()), dtype=torch.float16)
    convert_weights.convert(src, str(tmp_path / "lite.pth"))
    model = FBCNN(in_nc=3, out_nc=3, nc=[8, 16, 32, 64], nb=1)
    model.load_state_dict(torch.load(tmp_path / "lite.pth"), strict=True)
    for key, value in net.state_dict().items():
        assert torch.equal(model.state_dict()[key], value.half().float())


def test_fp16_writes_half_size_safetensors_from_either_format(tmp_path, capsys):
    """--fp16 ships a training checkpoint: fp32 safetensors (or .pth) in, fp16 safetensors with
    the same architecture out, every tensor the fp32 one rounded to fp16; never a .pth."""
    net = FBCNN(in_nc=3, out_nc=3, nc=[8, 16, 32, 64], nb=1)
    kwargs = infer_fbcnn_kwargs(net.state_dict())
    src = save_network(str(tmp_path / "18000_G.safetensors"), net.state_dict(), kwargs)
    out = tmp_path / "lite.safetensors"
    assert convert_weights.main([src, str(out), "--fp16"]) == 0
    assert read_fbcnn_kwargs(str(out)) == kwargs
    with safe_open(str(out), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
        assert all(torch.equal(f.get_tensor(k), v.half()) for k, v in net.state_dict().items())
    assert os.path.getsize(out) < 0.6 * os.path.getsize(src)
    capsys.readouterr()
    assert convert_weights.main([src, str(tmp_path / "lite.pth"), "--fp16"]) == 2
    assert "--fp16: OUT" in capsys.readouterr().err
    assert convert_weights.main([src, str(tmp_path / "same.safetensors")]) == 2  # nothing to do


def test_int8_writes_a_quarter_size_file_that_loads_as_the_decoded_weights(tmp_path, capsys):
    """--int8: 8-bit weights with a scale per output channel; the loaded network holds exactly
    the decoded tensors, its output near the fp32 network's; --fp16 with it is refused."""
    torch.manual_seed(0)
    net = FBCNN(in_nc=3, out_nc=3, nc=[8, 16, 32, 64], nb=1).eval()
    kwargs = infer_fbcnn_kwargs(net.state_dict())
    src = save_network(str(tmp_path / "18000_G.safetensors"), net.state_dict(), kwargs)
    out = tmp_path / "lite.safetensors"
    assert convert_weights.main([src, str(out), "--int8"]) == 0
    assert read_fbcnn_kwargs(str(out)) == kwargs
    assert os.path.getsize(out) < 0.27 * os.path.getsize(src)
    loaded = load_model(str(out)).net
    decoded = decode_int8(encode_int8(net.state_dict()))
    assert all(torch.equal(loaded.state_dict()[k], decoded[k]) for k in decoded)
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        diff = (loaded(x)[0] - net(x)[0]).abs().max()
    assert 0 < diff < 0.01
    capsys.readouterr()
    assert convert_weights.main([src, str(tmp_path / "both.safetensors"), "--int8", "--fp16"]) == 2
    assert capsys.readouterr().err == "error: --fp16 and --int8: choose one storage\n"
    assert convert_weights.main([src, str(tmp_path / "lite.pth"), "--int8"]) == 2
    assert "--int8: OUT" in capsys.readouterr().err


def test_an_existing_output_is_replaced_only_with_overwrite(tmp_path, capsys):
    _original_pth(tmp_path / "w.pth")
    out = tmp_path / "w.safetensors"
    out.write_bytes(b"keep me")
    assert convert_weights.main([str(tmp_path / "w.pth"), str(out)]) == 2
    assert capsys.readouterr().err == (f"error: OUT {out} exists; pass --overwrite to replace "
                                       f"it\n")
    assert out.read_bytes() == b"keep me"
    assert convert_weights.main([str(tmp_path / "w.pth"), str(out), "--overwrite"]) == 0
    assert read_fbcnn_kwargs(str(out))["act_mode"] == "BR"
    assert [n for n in os.listdir(tmp_path) if ".tmp-" in n] == []


@pytest.mark.parametrize("names, message", [
    (("w.pth", "x.pt"), "IN and OUT are both pth files: nothing to convert"),
    (("w.pth", "x.onnx"), "OUT {out}: unknown extension '.onnx'; expected .pth, .pt or "
                          ".safetensors"),
    (("missing.pth", "x.safetensors"), "{src}: no such weight file"),
    (("foreign.pth", "x.safetensors"), "{src}: not an FBCNN state dict (missing m_head.weight"),
])
def test_bad_inputs_are_one_error_line_and_write_nothing(tmp_path, capsys, names, message):
    _original_pth(tmp_path / "w.pth")
    torch.save({"conv.weight": torch.zeros(3)}, tmp_path / "foreign.pth")
    src, out = (str(tmp_path / n) for n in names)
    before = sorted(os.listdir(tmp_path))
    assert convert_weights.main([src, out]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: " + message.format(src=src, out=out)) and err.count("\n") == 1
    assert sorted(os.listdir(tmp_path)) == before


def test_pickled_code_in_a_pth_is_never_run(tmp_path):
    sentinel = tmp_path / "pwned"
    state = _original_pth(tmp_path / "w.pth")
    torch.save({**state, "m_head.weight": TouchOnUnpickle(sentinel)}, tmp_path / "evil.pth")
    assert convert_weights.main([str(tmp_path / "evil.pth"), str(tmp_path / "x.safetensors")]) == 2
    assert not sentinel.exists() and not (tmp_path / "x.safetensors").exists()


def test_a_global_skip_survives_conversion_and_refuses_a_pth(tmp_path):
    torch.manual_seed(0)
    net = FBCNN(in_nc=3, out_nc=3, nc=[8, 16, 32, 64], nb=1, global_skip=True).eval()
    kwargs = {**infer_fbcnn_kwargs(net.state_dict()), "global_skip": True}
    src = save_network(str(tmp_path / "skip.safetensors"), net.state_dict(), kwargs)
    convert_weights.convert(src, str(tmp_path / "skip16.safetensors"), fp16=True)
    loaded = load_model(str(tmp_path / "skip16.safetensors")).net
    assert loaded.global_skip
    x = torch.rand(1, 3, 24, 24)
    with torch.no_grad():
        assert (loaded.float()(x)[0] - net(x)[0]).abs().max() < 1e-2
    with pytest.raises(UserError, match="global skip"):
        convert_weights.convert(src, str(tmp_path / "skip.pth"))

