"""runners/export_onnx.py: dynamic-size ONNX export, checked against PyTorch with onnxruntime."""
import numpy as np
import pytest
import torch

from models.network_fbcnn import FBCNN
from runners.export_onnx import export_onnx, main
from tests.conftest import with_skip_gate

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

SIZES = [(48, 64), (37, 53)]  # a multiple of 8, and one needing the in-graph padding


@pytest.fixture(scope="module")
def tiny_net():
    torch.manual_seed(0)
    return FBCNN(in_nc=3, out_nc=3, nc=[8, 16, 32, 64], nb=1).eval()


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("gate", [False, True])
def test_export_matches_pytorch_at_two_sizes(tmp_path, tiny_net, gate):
    tiny_net = with_skip_gate(tiny_net, std=0.02, seed=5) if gate else tiny_net
    path = export_onnx(tiny_net, str(tmp_path / "fbcnn.onnx"), example_size=(64, 64))
    model = onnx.load(path)
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, "height", "width"]
    session = _session(path)
    for h, w in SIZES:
        x = torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(h))
        restored, qf = session.run(["restored", "qf"], {"image": x.numpy()})
        with torch.no_grad():
            want_restored, want_qf = tiny_net(x)
        assert restored.shape == (2, 3, h, w) and qf.shape == (2, 1)
        assert np.abs(restored - want_restored.numpy()).max() <= 1e-3
        assert np.abs(qf - want_qf.numpy()).max() <= 1e-3


def test_qf_input_controls_and_negative_means_blind(tmp_path, tiny_net):
    session = _session(export_onnx(tiny_net, str(tmp_path / "qf.onnx"), qf_input=True))
    x = torch.rand(1, 3, *SIZES[1], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        blind, predicted = tiny_net(x)
        controlled, _ = tiny_net(x, torch.full((1, 1), 0.7))
    def run(qf_input):
        return session.run(None, {"image": x.numpy(),
                                  "qf_input": np.full((1, 1), qf_input, np.float32)})

    got_blind, got_qf = run(-1)
    got_controlled, _ = run(0.7)
    assert np.abs(got_blind - blind.numpy()).max() <= 1e-3
    assert np.abs(got_qf - predicted.numpy()).max() <= 1e-3
    assert np.abs(got_controlled - controlled.numpy()).max() <= 1e-3
    assert (controlled - blind).abs().max().item() > 1e-3  # the control changes the output


@pytest.mark.filterwarnings("ignore:Exporting to ONNX opset version 999")  # torch, before it fails
def test_command_line_export_with_check(tmp_path, tiny_net, capsys):
    from safetensors.torch import save_file
    weights = tmp_path / "tiny.safetensors"
    save_file(tiny_net.state_dict(), str(weights))
    assert main(["--model", str(weights), "-o", str(tmp_path / "cli.onnx"), "--check"]) == 0
    out = capsys.readouterr().out
    diff = float(out.split("max abs difference")[1])
    assert (tmp_path / "cli.onnx").is_file() and diff <= 1e-3
    assert main(["--model", "jpeg", "-o", str(tmp_path / "x.onnx")]) == 2
    capsys.readouterr()
    with pytest.raises(SystemExit) as low:  # argparse: the padding needs opset 11
        main(["--model", str(weights), "-o", str(tmp_path / "x.onnx"), "--opset", "9"])
    assert low.value.code == 2 and "opset 11 or later" in capsys.readouterr().err
    assert main(["--model", str(weights), "-o", str(tmp_path / "x.onnx"), "--opset", "999"]) == 2
    assert capsys.readouterr().err.startswith("error: --opset 999: this PyTorch cannot export it")
    assert not (tmp_path / "x.onnx").exists()
