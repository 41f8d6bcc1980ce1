"""Weights stored in 8 bits: the int8 encoding of a state dict, and its decoding.

This module owns the format. Each floating-point tensor of two or more dimensions (convolution
and Linear weights, nearly all of a network's bytes) is stored as int8 `q` beside a float32
tensor `<key>.int8_scale`, one scale per slice along the first dimension (an output channel of
a convolution or Linear, an input channel of a transposed convolution):
`weight = q * scale`, `scale = max |slice| / 127`, so each weight is off by at most half its
slice's scale. Other tensors (biases, BatchNorm statistics) are stored in fp16. A file is a
quarter of its fp32 size, half its fp16 size; decoding gives float32 tensors, and the file is
self-describing (the scale keys say which tensors to decode), so loading needs no flag.
"""
import torch

__all__ = ["INT8_SCALE_SUFFIX", "encode_int8", "decode_int8", "is_int8_encoded"]

INT8_SCALE_SUFFIX = ".int8_scale"


def _scale(weight):
    amax = weight.abs().amax(dim=tuple(range(1, weight.dim())), keepdim=True)
    return torch.where(amax > 0, amax / 127, torch.ones_like(amax))  # an all-zero slice: q = 0


def encode_int8(state_dict):
    """The int8 encoding of `state_dict` (a new dict; integer tensors are kept as they are)."""
    encoded = {}
    for key, value in state_dict.items():
        value = value.detach().cpu()
        if key.endswith(INT8_SCALE_SUFFIX):
            raise ValueError(f"{key}: already int8-encoded (a key ending in {INT8_SCALE_SUFFIX})")
        if not value.is_floating_point():
            encoded[key] = value
        elif value.dim() < 2:
            encoded[key] = value.to(torch.float16)
        else:
            value = value.float()
            scale = _scale(value)
            encoded[key] = torch.round(value / scale).clamp(-127, 127).to(torch.int8)
            encoded[key + INT8_SCALE_SUFFIX] = scale
    return encoded


def is_int8_encoded(state_dict):
    """Whether `state_dict` holds int8-encoded tensors (any key ending in the scale suffix)."""
    return any(key.endswith(INT8_SCALE_SUFFIX) for key in state_dict)


def decode_int8(state_dict):
    """Float32 tensors from an int8 encoding (`encode_int8`'s output, or a file of it).
    ValueError when a scale has no int8 tensor or does not fit it."""
    decoded = {}
    for key, value in state_dict.items():
        if key.endswith(INT8_SCALE_SUFFIX):
            base = key[:-len(INT8_SCALE_SUFFIX)]
            if base not in state_dict or state_dict[base].dtype != torch.int8:
                raise ValueError(f"{key}: no int8 tensor {base} beside it")
        elif value.dtype == torch.int8:
            scale = state_dict.get(key + INT8_SCALE_SUFFIX)
            if scale is None:
                raise ValueError(f"{key}: int8 tensor without {key}{INT8_SCALE_SUFFIX}")
            if scale.dim() != value.dim() or scale.numel() != value.shape[0] or (
                    scale.shape[0] != value.shape[0]):
                raise ValueError(f"{key}{INT8_SCALE_SUFFIX}: shape {tuple(scale.shape)} is not "
                                 f"one scale per slice of {key} {tuple(value.shape)}")
            decoded[key] = value.float() * scale.float()
        else:
            decoded[key] = value.float() if value.is_floating_point() else value
    return decoded
