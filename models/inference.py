"""Running a loaded model on one uint8 image: the step every script shares.

This module owns the conversion uint8 image -> tensor -> network -> uint8 image, exactly as
the original test scripts did it (`clip(0, 1) * 255`, rounded), the meaning of a QF given by
the user (`qf_input = 1 - QF/100`), and every way of running the network faster or in less
memory than the faithful default (fp32, the whole image in one pass): `precision` (fp32, tf32,
bf16/fp16 autocast; `precision_autocast` and `tf32_allowed` are shared with training),
`channels_last`, `compile`, `engine` (models/engines.py), `tile` (models/tiling.py: tiles on
the 8x8 grid, blended, one QF for the whole image, an encoder cache between a blind pass's two
sweeps), `x8` (the self-ensemble of the 8 rotations
and mirrorings, with the unturned pass's QF), and bounded memory (CUDA falls back to tiles on
out-of-memory; a CPU tiles images above its network's `cpu_plan`). docs/evaluation.md, "How
the network runs", describes each choice and why.
"""
import contextlib
import logging
import weakref
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

from data.jpeg import label_to_qf, qf_to_label
from models.engines import check_engine, openvino_fns, resolve_engine
from models.tiling import forward_tiled
from utils.errors import UserError
from utils.image import tensor2uint, tensor2uint16, uint2tensor

__all__ = ["restore", "restore_batch", "predict_qf", "plan_tile", "fit_overlap", "resolve_device",
           "check_options", "PRECISIONS",
           "precision_autocast", "tf32_allowed",
           "DEFAULT_TILE", "MIN_TILE", "CpuPlan", "CPU_PLANS", "cpu_plan",
           "DEFAULT_TILE_CACHE_GIB", "default_tile_cache_gib",
           "DIHEDRAL"]

LOG = logging.getLogger(f"fbcnn.{__name__}")

# autocast dtype per precision; "fp32" is full IEEE fp32 (PyTorch lets cuDNN use TF32 for
# fp32 convolutions on Ampere and later unless told otherwise), "tf32" allows it
PRECISIONS = {"fp32": None, "tf32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# Full FBCNN in fp32 needs about 1.5 GiB per megapixel untiled; a 1024-pixel tile then fits
# in about 1.5 GiB of GPU memory, a 512-pixel tile in well under 1 GiB of RAM.
DEFAULT_TILE = {"cuda": 1024, "cpu": 512}  # the out-of-memory fallback's first tile
MIN_TILE = 64
# The encoder cache of blind tiled passes, GiB per image, on GPUs: on CUDA 1 GiB holds the
# cached skips of about 4 megapixels in fp32 and 8 in bf16 (64 values per pixel, see the module
# docstring). On CPU the network's `cpu_plan` says (`default_tile_cache_gib`).
DEFAULT_TILE_CACHE_GIB = {"cuda": 1.0}


@dataclass(frozen=True)
class CpuPlan:
    """How a network runs on a CPU unless told otherwise: images above
    `max_untiled_megapixels` in tiles of `tile` pixels, a blind pass keeping up to
    `tile_cache_gib` of encoder outputs between its two sweeps."""
    tile: int
    max_untiled_megapixels: float
    tile_cache_gib: float


# By the width of the network's first level, nc[0] (what sets its memory per pixel): the
# measurements that chose them are in docs/benchmarks.md, "Tiles on the CPU".
CPU_PLANS = {16: CpuPlan(tile=768, max_untiled_megapixels=1.5, tile_cache_gib=1.0),
             64: CpuPlan(tile=512, max_untiled_megapixels=2.0, tile_cache_gib=0.0)}


def default_tile_cache_gib(device, net):
    """The encoder cache a blind tiled pass of `net` keeps on `device` unless told otherwise."""
    if torch.device(device).type == "cpu":
        return cpu_plan(net).tile_cache_gib
    return DEFAULT_TILE_CACHE_GIB.get(torch.device(device).type, 0.0)


def cpu_plan(net):
    """The CpuPlan of `net`: that of the narrowest listed width at least its nc[0]; a wider
    network than any listed gets the widest plan with its limit scaled down by the width."""
    width = getattr(net, "nc", [max(CPU_PLANS)])[0]
    for listed in sorted(CPU_PLANS):
        if width <= listed:
            return CPU_PLANS[listed]
    widest = CPU_PLANS[max(CPU_PLANS)]
    return CpuPlan(widest.tile, widest.max_untiled_megapixels * max(CPU_PLANS) / width,
                   widest.tile_cache_gib)

_COMPILED = weakref.WeakKeyDictionary()  # net -> its torch.compile'd entry points
# The 8 transforms of x8 as (quarter turns, then mirrored left-right?); the identity first
DIHEDRAL = tuple((turns, mirror) for mirror in (False, True) for turns in range(4))


def fit_overlap(tile, overlap=32):
    """`overlap` (default 32) capped at half of `tile` on the 8x8 grid: the largest overlap
    `check_options` accepts for that tile; `overlap` itself when there is no tile."""
    return overlap if tile is None else min(overlap, tile // 2 // 8 * 8)


def check_options(precision="fp32", tile=None, tile_overlap=32, engine="torch", device="cpu"):
    """Raise ValueError, naming the argument, unless the options are valid for `restore` (a
    UserError naming the install command when the engine asked for is not installed)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: choose one of {', '.join(PRECISIONS)}")
    check_engine(engine, precision, device)
    if (tile_overlap is None or int(tile_overlap) != tile_overlap or tile_overlap < 0
            or tile_overlap % 8):
        raise ValueError(f"tile_overlap={tile_overlap!r}: must be 0 or a positive multiple of 8 "
                         f"(tiles stay on the 8x8 JPEG grid)")
    if tile is None:
        return
    if int(tile) != tile or tile < 16 or tile % 8:
        raise ValueError(f"tile={tile!r}: must be a multiple of 8, at least 16 "
                         f"(tiles stay on the 8x8 JPEG grid)")
    if tile_overlap > tile // 2:
        raise ValueError(f"tile_overlap={tile_overlap}: must be at most half the tile "
                         f"(tile={tile}, so at most {fit_overlap(tile, tile)})")


def _network_fns(net, compile, engine="torch", precision="fp32"):
    """The network's entry points: OpenVINO's (`models.engines`), or PyTorch's, compiled once
    per network when asked."""
    if engine == "openvino":
        return openvino_fns(net, precision)
    if not compile:
        return SimpleNamespace(forward=net, encode=net.encode, decode=net.decode, head=net.head,
                               qf_features=net.qf_features, qf_from_pooled=net.qf_from_pooled)
    fns = _COMPILED.get(net)
    if fns is None:
        fns = SimpleNamespace(forward=torch.compile(net), encode=torch.compile(net.encode),
                              decode=torch.compile(net.decode), head=net.head,  # one conv
                              qf_features=torch.compile(net.qf_features),
                              qf_from_pooled=net.qf_from_pooled)  # a tiny MLP: not worth it
        _COMPILED[net] = fns
    return fns


def _set_memory_format(net, channels_last):
    """Put the weights in the asked layout; a no-op when they already are."""
    if getattr(net, "_fbcnn_channels_last", False) != channels_last:
        net.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        net._fbcnn_channels_last = channels_last


def precision_autocast(device, precision):
    """The autocast context of a precision: bf16/fp16 autocast on `device`'s type, or none."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def _tf32_switches(allowed):
    """(owner, attribute, value) of the TF32 switches of cuDNN's convolutions and cuBLAS's
    matrix products. `allow_tf32`, whose setters (torch 2.1 to 2.14) keep the newer per-backend
    `fp32_precision` in step, so code that reads either API inside the block (some
    torch.compile releases read the old one) sees one setting; setting only the new API makes
    reading the old one raise on torch >= 2.9 (tests/test_inference.py reads both)."""
    return [(torch.backends.cudnn, "allow_tf32", allowed),
            (torch.backends.cuda.matmul, "allow_tf32", allowed)]


def _read_switch(owner, name):
    try:
        return getattr(owner, name)
    except RuntimeError:  # old and new APIs set apart elsewhere: PyTorch refuses to say
        return None


@contextlib.contextmanager
def tf32_allowed(allowed):
    """fp32 convolutions (cuDNN) and matrix products (cuBLAS) in TF32 (`allowed`) or in IEEE
    fp32 for the block; the previous settings come back afterwards. The switches are
    process-wide, like PyTorch's own; they matter only on GPUs with TF32 (Ampere and later)."""
    switches = _tf32_switches(allowed)
    previous = [_read_switch(owner, name) for owner, name, _ in switches]
    try:
        for owner, name, value in switches:
            setattr(owner, name, value)
        yield
    finally:
        for (owner, name, _), value in zip(switches, previous):
            if value is not None:
                setattr(owner, name, value)


def _forward(fns, x, qf_input, tile, overlap, device, cache_bytes, qf_only=False):
    """Untiled or tiled pass, falling back to tiles when CUDA runs out of memory: first without
    the encoder cache, then with smaller tiles. `qf_only`: the encoder and QF head alone.
    Returns `(restored, qf, (tile, overlap))`, the last being what the pass ended with."""
    if tile is None:
        try:
            out = (None, fns.encode(x)[1]) if qf_only else fns.forward(x, qf_input)
            return (*out, (None, overlap))
        except torch.cuda.OutOfMemoryError:
            pass  # leaving the except clause frees the failed pass's tensors first
        tile = DEFAULT_TILE.get(device.type, DEFAULT_TILE["cuda"])
        overlap = fit_overlap(tile, overlap)
        torch.cuda.empty_cache()  # a CUDA out-of-memory error brought us here
        LOG.warning("out of memory on a %dx%d image; retrying with %d-pixel tiles (overlap %d)",
                    x.shape[-1], x.shape[-2], tile, overlap)
    while True:
        try:
            out = forward_tiled(fns, x, qf_input, tile, overlap, cache_bytes, qf_only)
            return (*out, (tile, overlap))
        except torch.cuda.OutOfMemoryError:
            if tile <= MIN_TILE and not cache_bytes:
                raise
        torch.cuda.empty_cache()  # a CUDA out-of-memory error brought us here
        if cache_bytes:
            cache_bytes = 0
            LOG.warning("out of memory with tiles; retrying without the encoder cache")
            continue
        tile = max(MIN_TILE, tile // 2 // 8 * 8)
        overlap = fit_overlap(tile, overlap)
        LOG.warning("out of memory with tiles; retrying with %d-pixel tiles (overlap %d)",
                    tile, overlap)


def _turn(x, turns, mirror):
    """`x` rotated by `turns` quarter turns (H, W plane), then mirrored left-right."""
    x = torch.rot90(x, turns, dims=(-2, -1))
    return torch.flip(x, dims=(-1,)) if mirror else x


def _turn_back(y, turns, mirror):
    """The inverse of `_turn(., turns, mirror)`."""
    y = torch.flip(y, dims=(-1,)) if mirror else y
    return torch.rot90(y, -turns, dims=(-2, -1))


def _forward_x8(fns, x, qf_input, tile, overlap, device, cache_bytes, memory_format):
    """The self-ensemble (see the module docstring): the mean of the 8 turned passes, turned
    back, and the identity pass's qf; in blind mode that qf is fed to the other seven."""
    h, w = x.shape[-2:]
    x = F.pad(x, (0, -w % 8, 0, -h % 8), mode="replicate")  # the grid stays on the cells
    total, qf = None, None
    for turns, mirror in DIHEDRAL:
        turned = _turn(x, turns, mirror).contiguous(memory_format=memory_format)
        restored, qf_pass, (tile, overlap) = _forward(fns, turned, qf_input, tile, overlap,
                                                      device, cache_bytes)
        if qf is None:  # the identity pass
            qf = qf_pass
            if qf_input is None:
                qf_input, cache_bytes = qf_pass, 0  # one QF for the image; one pass each now
        restored = _turn_back(restored.float(), turns, mirror)
        total = restored if total is None else total + restored
    return (total / len(DIHEDRAL))[..., :h, :w], qf


def resolve_device(device):
    """`--device auto|cpu|cuda` -> "cuda" or "cpu"; asking for an absent CUDA is a UserError."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available; use --device cpu")
    return device


def _untiled_limit(max_untiled_megapixels, net):
    return (cpu_plan(net).max_untiled_megapixels if max_untiled_megapixels is None
            else max_untiled_megapixels)


def plan_tile(shape, device, tile=None, tile_overlap=32, max_untiled_megapixels=None, net=None):
    """`(tile, tile_overlap)` that `restore` starts with for an image of `shape` (H, W, ...):
    the given tile, or on CPU the tile of `net`'s `cpu_plan` above `max_untiled_megapixels`
    (default: the plan's limit; `net` None: the released width's plan). (On CUDA an untiled
    pass may still fall back to tiles when it runs out of memory.)"""
    if (tile is None and torch.device(device).type == "cpu"
            and shape[0] * shape[1] > _untiled_limit(max_untiled_megapixels, net) * 1e6):
        tile = cpu_plan(net).tile
        tile_overlap = fit_overlap(tile, tile_overlap)
    return tile, tile_overlap


def restore(model, img, qf=None, device="cpu", precision="fp32", tile=None, tile_overlap=32,
            channels_last=False, compile=False, max_untiled_megapixels=None, tile_cache_gib=None,
            x8=False, bit_depth=8, engine="torch"):
    """Restore a uint8 HxW or HxWx3 image; returns `(restored uint8, predicted QF or None)`,
    the restored image uint16 with `bit_depth` 16 (the network's output rounded to 65535
    levels instead of 255; the input's levels x 257 for the `jpeg` pseudo-model).

    `model` is a LoadedModel (its `net` None for the `jpeg` pseudo-model, which returns the
    input). `qf`, when given, is the integer QF fed to the network as `qf_input`; the predicted
    QF is reported either way. The defaults are the faithful path (fp32, untiled); the other
    options are described in the module docstring. `max_untiled_megapixels` applies on CPU
    only (default: the network's `cpu_plan`; `float("inf")` never tiles automatically).
    `tile_cache_gib`: the encoder cache of blind tiled passes (default
    `default_tile_cache_gib`; 0 recomputes every tile's encoder).
    `x8`: the self-ensemble of the 8 rotations and mirrorings, averaged; the QF reported (and,
    when blind, fed to the other seven passes) is the identity pass's. `engine`: "torch",
    "openvino" (`models.engines`, CPU, fp32 or bf16) or "auto" (`models.engines.resolve_engine`).
    """
    if bit_depth not in (8, 16):
        raise ValueError(f"bit_depth {bit_depth}: 8 or 16")
    if model.net is None:
        check_options(precision, tile, tile_overlap, engine, device)
        return (img if bit_depth == 8 else img.astype(np.uint16) * 257), None
    restored, qf_pred = _run(model, img, qf, device=device, precision=precision, tile=tile,
                             tile_overlap=tile_overlap, channels_last=channels_last,
                             compile=compile, max_untiled_megapixels=max_untiled_megapixels,
                             tile_cache_gib=tile_cache_gib, qf_only=False, x8=x8, engine=engine)
    out = tensor2uint(restored) if bit_depth == 8 else tensor2uint16(restored)
    return out, label_to_qf(qf_pred[0, 0])


@torch.no_grad()
def restore_batch(model, imgs, qfs=None, device="cpu", precision="fp32", channels_last=False,
                  compile=False, bit_depth=8, engine="torch"):
    """Restore same-size uint8 images in one untiled forward pass; returns a list of
    `(restored, predicted QF)`, one per image, as `restore` gives them.

    Each image keeps its own QF: `qfs` (one integer per image) is fed as its `qf_input`, or,
    when None, each image's own predicted QF conditions its decoder, as in `restore`. The
    outputs equal `restore`'s image by image up to the order in which batched convolutions sum
    (tests/test_inference.py bounds the difference). There is no tiling: batch only images that
    `restore` would not tile (`plan_tile`).
    """
    check_options(precision, engine=engine, device=device)
    if len({img.shape for img in imgs}) > 1:
        raise ValueError("restore_batch: the images differ in size")
    if model.net is None or len(imgs) == 1:
        return [restore(model, img, qf=None if qfs is None else qfs[k], device=device,
                        precision=precision, channels_last=channels_last, compile=compile,
                        bit_depth=bit_depth, engine=engine) for k, img in enumerate(imgs)]
    device = torch.device(device)
    engine = resolve_engine(engine, precision, tiled=False, device=device)
    _set_memory_format(model.net, channels_last)
    fns = _network_fns(model.net, compile, engine, precision)
    x = torch.cat([uint2tensor(img) for img in imgs]).to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    qf_input = None if qfs is None else torch.tensor([[qf_to_label(q)] for q in qfs],
                                                     dtype=torch.float32, device=device)
    with precision_autocast(device, precision), tf32_allowed(precision == "tf32"):
        restored, qf_pred, _ = _forward(fns, x, qf_input, None, 32, device, 0)
    to_image = tensor2uint if bit_depth == 8 else tensor2uint16
    return [(to_image(restored[k:k + 1]), label_to_qf(qf_pred[k, 0])) for k in range(len(imgs))]


def predict_qf(model, img, device="cpu", precision="fp32", tile=None, tile_overlap=32,
               channels_last=False, compile=False, max_untiled_megapixels=None, engine="torch"):
    """The QF `restore(model, img, ...)` would report, from the encoder and the QF head alone
    (no decoder); None for the `jpeg` pseudo-model. Options as for `restore`."""
    if model.net is None:
        check_options(precision, tile, tile_overlap, engine, device)
        return None
    _, qf_pred = _run(model, img, None, device=device, precision=precision, tile=tile,
                      tile_overlap=tile_overlap, channels_last=channels_last, compile=compile,
                      max_untiled_megapixels=max_untiled_megapixels, tile_cache_gib=0,
                      qf_only=True, x8=False, engine=engine)
    return label_to_qf(qf_pred[0, 0])


@torch.no_grad()
def _run(model, img, qf, *, device, precision, tile, tile_overlap, channels_last, compile,
         max_untiled_megapixels, tile_cache_gib, qf_only, x8, engine):
    check_options(precision, tile, tile_overlap, engine, device)
    device = torch.device(device)
    net = model.net
    planned = plan_tile(img.shape, device, tile, tile_overlap, max_untiled_megapixels, net)
    engine = resolve_engine(engine, precision, tiled=planned[0] is not None, device=device)
    _set_memory_format(net, channels_last)
    fns = _network_fns(net, compile, engine, precision)
    x = uint2tensor(img).to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    qf_input = None if qf is None else torch.full((x.shape[0], 1), qf_to_label(qf), device=device)
    if planned[0] != tile:
        tile, tile_overlap = planned
        LOG.info("%dx%d image is over %.1f megapixels: tiling it (%d pixels, overlap %d) to "
                 "bound memory and time", img.shape[1], img.shape[0],
                 _untiled_limit(max_untiled_megapixels, net), tile, tile_overlap)
    with precision_autocast(device, precision), tf32_allowed(precision == "tf32"):
        if tile_cache_gib is None:
            tile_cache_gib = default_tile_cache_gib(device, net)
        cache_bytes = 0 if qf_input is not None or qf_only else int(tile_cache_gib * 2 ** 30)
        if x8:
            return _forward_x8(fns, x, qf_input, tile, tile_overlap, device, cache_bytes,
                               torch.channels_last if channels_last else torch.contiguous_format)
        return _forward(fns, x, qf_input, tile, tile_overlap, device, cache_bytes, qf_only)[:2]
