"""models/widen.py and `convert_weights --widen`: a wider FBCNN with the same function."""
import pytest
import torch

from models.model_zoo import load_model, read_fbcnn_kwargs
from models.network_fbcnn import FBCNN
from models.widen import widen_fbcnn
from runners import convert_weights
from tests.conftest import with_skip_gate


@pytest.fixture(scope="module")
def trained():
    """The shipped colour lite model: trained weights, so that every channel matters."""
    return load_model("fbcnn_color_lite").net.float().eval()


@pytest.mark.parametrize("nc", [[16, 32, 32, 64], [12, 24, 48, 96], [9, 16, 33, 64]])
def test_widened_network_computes_the_same_function(trained, nc):
    x = torch.rand(2, 3, 45, 67, generator=torch.Generator().manual_seed(0))
    wide = widen_fbcnn(trained, nc).eval()
    assert wide.nc == nc and sum(p.numel() for p in wide.parameters()) > sum(
        p.numel() for p in trained.parameters())
    with torch.no_grad():
        for qf_input in (None, torch.tensor([[0.3], [0.9]])):
            (a, qa), (b, qb) = trained(x, qf_input), wide(x, qf_input)
            assert (a - b).abs().max() < 1e-5 and (qa - qb).abs().max() < 1e-6


def test_a_gated_skip_is_widened_with_its_gate(trained):
    gated = with_skip_gate(trained, std=0.01, seed=2)
    x = torch.rand(1, 3, 40, 48, generator=torch.Generator().manual_seed(0))
    wide = widen_fbcnn(gated, [16, 32, 32, 64]).eval()
    assert wide.skip_gate
    with torch.no_grad():
        (a, _), (b, _) = gated(x), wide(x)
    assert (a - b).abs().max() < 1e-5


def test_noise_makes_the_copies_differ_a_little(trained):
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    noisy = widen_fbcnn(trained, [16, 32, 32, 64], noise=0.01, seed=3).eval()
    again = widen_fbcnn(trained, [16, 32, 32, 64], noise=0.01, seed=3).eval()
    head = noisy.m_head.weight
    assert not torch.equal(head[:8], head[8:])  # the copies of the first level drifted apart
    assert torch.equal(head, again.m_head.weight)  # seeded
    with torch.no_grad():
        diff = (noisy(x)[0] - trained(x)[0]).abs().max()
    assert 0 < diff < 0.05


def test_narrower_widths_and_batchnorm_are_refused(trained):
    with pytest.raises(ValueError, match="each at least"):
        widen_fbcnn(trained, [4, 16, 32, 64])
    with pytest.raises(ValueError, match="fold BatchNorm"):
        widen_fbcnn(FBCNN(3, 3, [8, 16, 32, 64], nb=1, act_mode="BR"), [16, 16, 32, 64])


def test_convert_weights_widens_a_file(tmp_path, capsys):
    out = tmp_path / "wide.safetensors"
    assert convert_weights.main(["model_zoo/fbcnn_color_lite.safetensors", str(out),
                                 "--widen", "16", "32", "32", "64"]) == 0
    assert "nc [16, 32, 32, 64]" in capsys.readouterr().out
    assert read_fbcnn_kwargs(str(out))["nc"] == [16, 32, 32, 64]
    wide, narrow = load_model(str(out)).net.eval(), load_model("fbcnn_color_lite").net.eval()
    x = torch.rand(1, 3, 24, 40)
    with torch.no_grad():
        assert (wide(x)[0] - narrow.float()(x)[0]).abs().max() < 1e-5
    assert convert_weights.main(["model_zoo/fbcnn_color_lite.safetensors",
                                 str(tmp_path / "w2.safetensors"), "--widen", "4", "16", "32",
                                 "64"]) == 2
    assert "--widen: " in capsys.readouterr().err
