"""models/network_fbcnn.py: the official layout, the variants, and agreement with spandrel."""
import json
import os

import pytest
import torch

from models.model_zoo import MODEL_ZOO, load_model
from models.network_fbcnn import EMBED_WIDTH, FBCNN, SKIP_GATE_SCALE
from tests.conftest import REFERENCE
from utils import REPO_ROOT

SPEC_PATH = os.path.join(REFERENCE, "official_state_dict_spec.json")
TINY = dict(nc=[8, 16, 32, 64], nb=1)


@pytest.fixture(scope="module")
def official_spec():
    with open(SPEC_PATH) as f:  # in the repository: a missing file is a failure, not a skip
        return json.load(f)


@pytest.mark.parametrize("kind,channels", [("color", 3), ("gray", 1)])
def test_state_dict_equals_official_layout(official_spec, kind, channels):
    net = FBCNN(in_nc=channels, out_nc=channels)
    ours = {k: list(v.shape) for k, v in net.state_dict().items()}
    assert list(ours) == list(official_spec[kind])  # same keys in the same order
    assert ours == official_spec[kind]


def test_official_parameter_count():
    assert sum(p.numel() for p in FBCNN().parameters()) == 71_921_796


@pytest.mark.parametrize("kind,channels", [("color", 3), ("gray", 1)])
def test_state_dict_built_from_spec_loads_strictly(official_spec, kind, channels):
    gen = torch.Generator().manual_seed(0)
    state_dict = {k: torch.randn(shape, generator=gen) * 0.01
                  for k, shape in official_spec[kind].items()}
    net = FBCNN(in_nc=channels, out_nc=channels)
    result = net.load_state_dict(state_dict, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(net.m_up1[4].res[2].bias, state_dict["m_up1.4.res.2.bias"])


@pytest.mark.parametrize("h,w", [(16, 16), (13, 21), (1, 1), (7, 9)])
def test_output_shape_and_qf_range(h, w):
    net = FBCNN(**TINY).eval()
    with torch.no_grad():
        restored, qf = net(torch.rand(2, 3, h, w))
    assert restored.shape == (2, 3, h, w)
    assert qf.shape == (2, 1)
    assert torch.all((qf >= 0) & (qf <= 1))


def test_padding_is_replicate_then_crop():
    """Padding to a multiple of 8 replicates the last row/column, so a padded input is the same."""
    net = FBCNN(**TINY).eval()
    x = torch.rand(1, 3, 13, 21)
    padded = torch.nn.functional.pad(x, (0, 3, 0, 3), mode="replicate")
    with torch.no_grad():
        a, qa = net(x)
        b, qb = net(padded)
    torch.testing.assert_close(a, b[..., :13, :21], rtol=0, atol=1e-6)
    torch.testing.assert_close(qa, qb, rtol=0, atol=1e-6)


def test_qf_input_overrides_prediction():
    torch.manual_seed(0)
    net = FBCNN(**TINY).eval()
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        blind, qf = net(x)
        same, _ = net(x, qf_input=qf)
        other, qf_other = net(x, qf_input=torch.tensor([[0.05]]))
    torch.testing.assert_close(blind, same, rtol=0, atol=0)
    assert not torch.allclose(blind, other)
    torch.testing.assert_close(qf, qf_other)  # the prediction is reported either way


def test_other_widths_take_qf_pred_width_from_nc():
    net = FBCNN(nc=[16, 32, 64, 128], nb=4)
    assert net.qf_pred[6].in_features == 128
    assert sum(p.numel() for p in net.parameters()) == 5_375_652


@pytest.mark.parametrize("act_mode,down,up,keys", [
    ("BR", "strideconv", "convtranspose",
     ["m_down1.0.res.1.running_mean", "m_down1.0.res.3.weight"]),
    ("R", "avgpool", "upconv", ["m_down1.2.weight", "m_up3.0.1.weight"]),
    ("R", "maxpool", "pixelshuffle", ["m_down1.2.weight", "m_up3.0.0.weight"]),
])
def test_variants_build_and_run(act_mode, down, up, keys):
    net = FBCNN(nc=[8, 16, 32, 64], nb=1, act_mode=act_mode, downsample_mode=down,
                upsample_mode=up).eval()
    state_dict = net.state_dict()
    for key in keys:
        assert key in state_dict
    with torch.no_grad():
        restored, _ = net(torch.rand(1, 3, 24, 17))
    assert restored.shape == (1, 3, 24, 17)


def test_global_skip_adds_the_input_to_the_same_weights_output():
    """With `global_skip` the output is the plain network's plus the input (no new weights),
    so a zero tail is the identity; the split decode needs the input to add it."""
    torch.manual_seed(0)
    plain = FBCNN(**TINY).eval()
    skip = FBCNN(**TINY, global_skip=True).eval()
    skip.load_state_dict(plain.state_dict(), strict=True)
    x = torch.rand(2, 3, 13, 21)  # not a multiple of 8: padded and cropped
    with torch.no_grad():
        expected, qf = plain(x)
        got, got_qf = skip(x)
        torch.testing.assert_close(got, expected + x, rtol=0, atol=1e-6)
        torch.testing.assert_close(got_qf, qf, rtol=0, atol=0)
        skip.m_tail.weight.zero_()
        skip.m_tail.bias.zero_()
        torch.testing.assert_close(skip(x)[0], x, rtol=0, atol=0)
        with pytest.raises(ValueError, match="needs the input"):
            skip.decode(skip.encode(x)[0], qf, x.shape[-2:])


def gated(plain, weight_std=0.0, bias=0.0, seed=1):
    """`plain`'s weights in a network with a gated global skip whose gate has random weights of
    spread `weight_std` and gives `bias` where they are zero (both in units of the gate)."""
    net = FBCNN(**TINY, global_skip=True, skip_gate=True).eval()
    weight = torch.randn(1, EMBED_WIDTH, generator=torch.Generator().manual_seed(seed))
    net.load_state_dict({**plain.state_dict(),
                         "to_skip_gate.weight": weight * weight_std / SKIP_GATE_SCALE,
                         "to_skip_gate.bias": torch.tensor([bias / SKIP_GATE_SCALE])}, strict=True)
    return net


def test_skip_gate_starts_closed_and_blends_output_and_input_by_the_embeddings_gate():
    """Closed (as built: zero weights) the gated network computes the plain one's output; with
    bias 1 the identity; in general the blend (1 - g) * plain + g * input, the gate g read per
    image from the embedding of the QF the decoder is given."""
    torch.manual_seed(0)
    plain = FBCNN(**TINY).eval()
    built = FBCNN(**TINY, global_skip=True, skip_gate=True)
    assert not built.to_skip_gate.weight.any() and not built.to_skip_gate.bias.any()
    x = torch.rand(2, 3, 13, 21)
    qf = torch.tensor([[0.9], [0.1]])
    with torch.no_grad():
        expected, expected_qf = plain(x, qf)
        got, got_qf = gated(plain)(x, qf)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        torch.testing.assert_close(got_qf, expected_qf, rtol=0, atol=0)
        torch.testing.assert_close(gated(plain, bias=1.0)(x, qf)[0], x, rtol=0, atol=1e-6)
        net = gated(plain, weight_std=0.5, bias=0.2)
        gate = net.gate(net.qf_embed(qf))
        assert gate[0].item() != pytest.approx(gate[1].item(), abs=1e-3)  # it follows the QF
        g = gate[:, :, None, None]
        torch.testing.assert_close(net(x, qf)[0], (1 - g) * expected + g * x, rtol=0, atol=1e-6)


def test_pixelshuffle_upsampling_width():
    net = FBCNN(nc=[8, 16, 32, 64], nb=1, upsample_mode="pixelshuffle")
    assert net.m_up3[0][0].out_channels == 32 * 4


@pytest.mark.parametrize("kwargs,needle", [
    (dict(act_mode="X"), "act_mode"), (dict(downsample_mode="bilinear"), "downsample_mode"),
    (dict(upsample_mode="nearest"), "upsample_mode"), (dict(nc=[8, 16, 32]), "nc"),
    (dict(nb=0), "nb"), (dict(in_nc=3, out_nc=1, global_skip=True), "global_skip"),
    (dict(skip_gate=True), "needs global_skip"),
])
def test_invalid_arguments_name_the_argument(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        FBCNN(**kwargs)


def test_spandrel_loads_our_state_dict_and_agrees(tmp_path):
    spandrel = pytest.importorskip("spandrel")
    torch.manual_seed(0)
    net = FBCNN(in_nc=3, out_nc=3, nc=[16, 32, 64, 512], nb=2).eval()
    path = tmp_path / "fbcnn_small.pth"
    torch.save(net.state_dict(), path)
    descriptor = spandrel.ModelLoader(device="cpu").load_from_file(str(path))
    assert descriptor.architecture.id == "FBCNN"
    assert (descriptor.input_channels, descriptor.output_channels) == (3, 3)
    descriptor.model.eval()
    x = torch.rand(1, 3, 37, 29)
    with torch.no_grad():
        ours, qf_ours = net(x)
        theirs = descriptor(x)  # spandrel's call clamps to [0, 1]
        raw_theirs, qf_theirs = descriptor.model(x)
    assert (ours - raw_theirs).abs().max().item() < 1e-5
    assert (ours.clamp(0, 1) - theirs).abs().max().item() < 1e-5
    assert (qf_ours - qf_theirs).abs().max().item() < 1e-5


@pytest.mark.parametrize("name", sorted(n for n, e in MODEL_ZOO.items() if e.bundled))
def test_spandrel_refuses_the_bundled_models_for_their_qf_head_width(name):
    """spandrel's FBCNN, like the original, hard-codes 512 inputs for the QF head's first
    Linear; the bundled lite models have nc[3] = 64 there, so spandrel refuses them at load, as
    docs/models.md says (a 512-wide file agrees with ours: the test above)."""
    spandrel = pytest.importorskip("spandrel")
    path = os.path.join(REPO_ROOT, "model_zoo", MODEL_ZOO[name].filename)
    assert load_model(path).net.qf_pred[-6].in_features == 64
    with pytest.raises(RuntimeError, match="qf_pred"):
        spandrel.ModelLoader(device="cpu").load_from_file(path)


def test_the_qf_head_split_for_tiled_inference_is_the_head():
    """`qf_features` then global mean then `qf_from_pooled` is `qf_pred`, layer for layer; and
    the features of two halves pooled with equal weights give the whole image's QF (what tiled
    inference does with its tiles)."""
    torch.manual_seed(3)
    net = FBCNN(**TINY).eval()
    x = torch.rand(2, 3, 32, 48)
    with torch.no_grad():
        (*_, b), qf = net.encode(x)
        features = net.qf_features(b)
        assert features.shape == (2, 64, 4, 6)
        by_hand = b
        for block in net.qf_pred[:net.nb]:
            by_hand = block(by_hand)
        torch.testing.assert_close(features, by_hand, rtol=0, atol=0)
        pooled = features.mean((2, 3))
        torch.testing.assert_close(net.qf_from_pooled(pooled), qf, rtol=1e-6, atol=1e-7)
        head = net.qf_pred[net.nb + 2:]
        torch.testing.assert_close(head(pooled), qf, rtol=1e-6, atol=1e-7)
        halves = (features[..., :3].mean((2, 3)) + features[..., 3:].mean((2, 3))) / 2
        torch.testing.assert_close(net.qf_from_pooled(halves), qf, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(net.qf_from_pooled(features[..., :3].mean((2, 3))), qf)
