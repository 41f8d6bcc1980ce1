"""Tests of utils/weight_codec.py: the int8 encoding of a state dict and its decoding."""
import pytest
import torch

from models.model_zoo import load_state_dict_file
from utils.checkpoint import save_network
from utils.errors import UserError
from utils.weight_codec import INT8_SCALE_SUFFIX, decode_int8, encode_int8, is_int8_encoded


def _state():
    g = torch.Generator().manual_seed(0)
    return {"conv.weight": torch.randn(4, 3, 3, 3, generator=g) * torch.tensor([1, 1e-3, 10, 0.5])
            .view(4, 1, 1, 1),
            "conv.bias": torch.randn(4, generator=g),
            "zero.weight": torch.zeros(2, 5),
            "bn.num_batches_tracked": torch.tensor(7)}


def test_each_weight_is_within_half_its_slices_scale_and_the_largest_is_exact():
    state = _state()
    encoded = encode_int8(state)
    assert set(encoded) == set(state) | {"conv.weight" + INT8_SCALE_SUFFIX,
                                         "zero.weight" + INT8_SCALE_SUFFIX}
    assert encoded["conv.weight"].dtype == torch.int8
    assert encoded["conv.bias"].dtype == torch.float16
    scale = encoded["conv.weight" + INT8_SCALE_SUFFIX]
    w = state["conv.weight"]
    torch.testing.assert_close(scale.flatten(), w.abs().amax(dim=(1, 2, 3)) / 127)
    decoded = decode_int8(encoded)
    assert all(v.dtype == state[k].dtype for k, v in decoded.items())
    error = (decoded["conv.weight"] - w).abs()
    assert bool((error <= scale / 2 * (1 + 1e-5)).all())
    assert error[1].max() < 1e-4  # a scale per slice: one for the whole tensor would be ~0.1
    peak = w.abs().flatten(1).argmax(1)
    torch.testing.assert_close(decoded["conv.weight"].flatten(1).gather(1, peak[:, None]),
                               w.flatten(1).gather(1, peak[:, None]))
    assert torch.equal(decoded["conv.bias"], state["conv.bias"].half().float())
    assert torch.equal(decoded["zero.weight"], torch.zeros(2, 5))
    assert torch.equal(decoded["bn.num_batches_tracked"], torch.tensor(7))


def test_a_file_loads_decoded_and_broken_files_name_the_key(tmp_path):
    state = _state()
    path = save_network(str(tmp_path / "w.safetensors"), encode_int8(state))
    loaded = load_state_dict_file(path)
    assert not is_int8_encoded(loaded) and is_int8_encoded(encode_int8(state))
    expected = decode_int8(encode_int8(state))
    assert set(loaded) == set(state)
    assert all(torch.equal(loaded[k], expected[k]) for k in state)
    broken = encode_int8(state)
    del broken["conv.weight" + INT8_SCALE_SUFFIX]
    path = save_network(str(tmp_path / "broken.safetensors"), broken)
    with pytest.raises(UserError, match=r"broken\.safetensors: broken int8 weights "
                                        r"\(conv\.weight: int8 tensor without"):
        load_state_dict_file(path)


@pytest.mark.parametrize("change, message", [
    (lambda e: e.pop("conv.weight"), "no int8 tensor conv.weight"),
    (lambda e: e.update({"conv.weight" + INT8_SCALE_SUFFIX: torch.ones(3, 1, 1, 1)}),
     "is not one scale per slice"),
])
def test_decoding_refuses_scales_that_do_not_fit(change, message):
    encoded = encode_int8(_state())
    change(encoded)
    with pytest.raises(ValueError, match=message):
        decode_int8(encoded)


def test_encoding_twice_is_refused():
    with pytest.raises(ValueError, match="already int8-encoded"):
        encode_int8(encode_int8(_state()))
