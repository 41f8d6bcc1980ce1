"""Property-based tests (hypothesis) of the JPEG functions (data/jpeg.py), the metrics
(utils/metrics.py), tiled inference (models/inference.py) and the QF read from JPEG headers
(utils/jpeg_header.py). Example counts are kept small so the file runs in well under a minute."""
import math

import cv2
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from data.jpeg import double_jpeg, jpeg, jpeg_encode, label_to_qf, qf_to_label, shift_crop
from models.inference import restore
from models.tiling import forward_tiled
from models.model_zoo import LoadedModel
from models.network_fbcnn import FBCNN
from utils import metrics
from utils.image import rgb2y_matlab
from utils.jpeg_header import header_qf
from utils.metrics import psnr, psnrb, ssim

pytestmark = pytest.mark.usefixtures("one_thread")


FEW = settings(max_examples=30, deadline=None,
               suppress_health_check=[HealthCheck.function_scoped_fixture])
SOME = settings(max_examples=50, deadline=None)


@st.composite
def images(draw, min_side=1, max_side=40, layouts=("gray", "rgb", "gray3d")):
    """uint8 images of random size and layout (HxW, HxWx3 or HxWx1), random or smooth."""
    h = draw(st.integers(min_side, max_side))
    w = draw(st.integers(min_side, max_side))
    layout = draw(st.sampled_from(layouts))
    shape = {"gray": (h, w), "rgb": (h, w, 3), "gray3d": (h, w, 1)}[layout]
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    img = rng.integers(0, 256, shape, dtype=np.uint8)
    if draw(st.booleans()):  # smooth images: what JPEG is made for
        img = np.cumsum(img.astype(np.int64) % 5, axis=1).clip(0, 255).astype(np.uint8)
    return img


@st.composite
def image_pairs(draw, min_side=1, max_side=40, layouts=("gray", "rgb")):
    a = draw(images(min_side, max_side, layouts))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    mode = draw(st.sampled_from(["equal", "noise", "independent"]))
    if mode == "equal":
        b = a.copy()
    elif mode == "noise":
        b = (a.astype(np.int64) + rng.integers(-3, 4, a.shape)).clip(0, 255).astype(np.uint8)
    else:
        b = rng.integers(0, 256, a.shape, dtype=np.uint8)
    return a, b


# JPEG functions

@SOME
@given(img=images(), qf=st.integers(1, 100))
def test_jpeg_keeps_shape_dtype_and_layout(img, qf):
    out = jpeg(img, qf)
    assert out.shape == img.shape and out.dtype == np.uint8
    assert np.array_equal(jpeg(img, qf), out)  # deterministic


@SOME
@given(img=images(layouts=("gray", "rgb")), qf1=st.integers(1, 100), qf2=st.integers(1, 100),
       shift=st.one_of(st.integers(0, 7), st.tuples(st.integers(0, 7), st.integers(0, 7))))
def test_double_jpeg_is_aligned_with_shift_crop(img, qf1, qf2, shift):
    dy, dx = (shift, shift) if isinstance(shift, int) else shift
    assume(img.shape[0] > dy and img.shape[1] > dx)
    out = double_jpeg(img, qf1, qf2, shift)
    ref = shift_crop(img, shift)
    assert out.shape == ref.shape == (img.shape[0] - dy, img.shape[1] - dx, *img.shape[2:])
    assert out.dtype == np.uint8 and np.array_equal(ref, img[dy:, dx:])
    assert np.array_equal(out, _opencv_jpeg(_opencv_jpeg(img, qf1)[dy:, dx:], qf2))


def _opencv_jpeg(img, qf):
    """The spec's JPEG protocol straight from OpenCV (not data/jpeg.py): colour held as RGB
    and encoded as BGR, gray encoded single-channel and decoded with flag 0."""
    colour = img.ndim == 3
    _, enc = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR) if colour else img,
                          [int(cv2.IMWRITE_JPEG_QUALITY), qf])
    return (cv2.cvtColor(cv2.imdecode(enc, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB) if colour
            else cv2.imdecode(enc, 0))


@SOME
@given(qf=st.integers(0, 100))
def test_qf_labels_invert(qf):
    assert label_to_qf(qf_to_label(qf)) == qf and 0 <= qf_to_label(qf) <= 1


# Metrics

@SOME
@given(pair=image_pairs())
def test_psnr_is_symmetric_non_negative_and_infinite_only_for_equal_images(pair):
    a, b = pair
    value = psnr(a, b)
    assert value == psnr(b, a)
    if np.array_equal(a, b):
        assert value == math.inf
    else:
        assert 0 <= value <= 10 * math.log10(255 ** 2 * a.size)  # MSE is at least 1 / size
    assert psnr(np.zeros_like(a), np.full_like(a, 255)) == 0


@SOME
@given(pair=image_pairs(min_side=11))
def test_ssim_is_in_range_and_one_for_identical_images(pair):
    a, b = pair
    value = ssim(a, b)
    assert -1 - 1e-9 <= value <= 1 + 1e-9
    assert ssim(a, a) == pytest.approx(1, abs=1e-9)
    if not np.array_equal(a, b):
        assert value < 1


def _bef_input(img):
    """What psnrb measures the blocking of: the image, or the Y channel of a colour image."""
    y = rgb2y_matlab(img) if img.ndim == 3 else img
    return y.astype(np.float64)


@SOME
@given(pair=image_pairs(min_side=9))
def test_psnrb_is_psnr_less_the_blocking_effect(pair):
    a, b = pair
    bef = metrics._bef(_bef_input(a))
    assert bef >= 0
    if bef == 0:
        assert psnrb(a, b) == pytest.approx(psnr(a, b), abs=1e-9) or psnr(a, b) == math.inf
    else:
        assert psnrb(a, b) < psnr(a, b)


@st.composite
def blocky_images(draw):
    """Piecewise constant 8x8 blocks, some neighbours different: D_B > D_BC = 0."""
    rows, cols = draw(st.integers(2, 5)), draw(st.integers(2, 5))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    blocks = rng.integers(0, 256, (rows, cols), dtype=np.uint8)
    blocks[0, 1] = blocks[0, 0] ^ 0x80  # at least one boundary with a step
    img = np.kron(blocks, np.ones((8, 8), np.uint8))
    if draw(st.booleans()):
        img = np.repeat(img[:, :, None], 3, axis=2)
    return img


@SOME
@given(img=blocky_images(), noise=st.integers(0, 3), seed=st.integers(0, 1000))
def test_psnrb_is_below_psnr_when_blocking_is_present(img, noise, seed):
    rng = np.random.default_rng(seed)
    ref = (img.astype(np.int64) + rng.integers(-noise, noise + 1, img.shape)).clip(0, 255)
    ref = ref.astype(np.uint8)
    assert metrics._bef(_bef_input(img)) > 0
    assert psnrb(img, ref) < psnr(img, ref)  # also when psnr is inf (ref == img)
    assert math.isfinite(psnrb(img, ref))


@pytest.mark.parametrize("shape", [(8, 8), (6, 12), (5, 20), (8, 8, 3)])
def test_psnrb_is_a_number_for_every_size(shape):
    rng = np.random.default_rng(0)
    a, b = (rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(2))
    value = psnrb(a, b)
    assert not math.isnan(value) and value <= psnr(a, b) + 1e-9


# Tiled inference (issue 4)



@pytest.fixture(scope="module")
def small_field_net():
    """A narrow FBCNN and the overlap that covers its receptive field (see test_inference)."""
    torch.manual_seed(1)
    net = FBCNN(in_nc=1, out_nc=1, nc=(4, 4, 4, 4), nb=1).eval()
    x = torch.rand(1, 1, 192, 192, requires_grad=True)
    restored, _ = net(x, torch.full((1, 1), 0.5))
    restored[0, 0, 96, 96].backward()
    rows, cols = torch.nonzero(x.grad[0, 0], as_tuple=True)
    radius = int(max((rows - 96).abs().max(), (cols - 96).abs().max()))
    margin = -(-(radius + 8) // 8) * 8
    return net, 4 * margin


@FEW
@given(h=st.integers(1, 64), w=st.integers(1, 64), tile_eighths=st.integers(8, 12),
       qf=st.one_of(st.none(), st.integers(1, 100)), seed=st.integers(0, 1000))
def test_a_tile_holding_the_image_is_the_untiled_pass(small_field_net, h, w, tile_eighths, qf,
                                                      seed):
    net, _ = small_field_net
    model = LoadedModel("narrow", net, 1)
    img = np.random.default_rng(seed).integers(0, 256, (h, w), dtype=np.uint8)
    untiled = restore(model, img, qf=qf)
    tiled = restore(model, img, qf=qf, tile=8 * tile_eighths, tile_overlap=16)
    assert np.array_equal(tiled[0], untiled[0]) and tiled[1] == untiled[1]
    assert tiled[0].shape == img.shape


@settings(max_examples=8, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(h=st.integers(8, 40), extra=st.integers(1, 300), seed=st.integers(0, 1000),
       given_qf=st.booleans(), cache_bytes=st.sampled_from([0, 40_000, 1 << 30]))
def test_tiles_equal_the_untiled_pass_when_the_overlap_covers_the_receptive_field(
        small_field_net, h, extra, seed, given_qf, cache_bytes):
    net, overlap = small_field_net
    tile = 2 * overlap
    x = torch.rand(1, 1, h, tile + extra, generator=torch.Generator().manual_seed(seed))
    qf_input = torch.full((1, 1), 0.3) if given_qf else None
    with torch.no_grad():
        expected, qf = net(x, qf_input)
        tiled, qf_tiled = forward_tiled(net, x, qf_input, tile, overlap, cache_bytes)
        recomputed, _ = forward_tiled(net, x, qf_input, tile, overlap)
    assert torch.equal(tiled, recomputed)  # the encoder cache changes no bit
    assert tiled.shape == expected.shape
    assert (tiled - expected).abs().max() < 1e-5
    if not given_qf:
        assert abs(float(qf_tiled - qf)) < 1e-6


# QF from JPEG headers (issue 6)

@SOME
@given(img=images(min_side=8, max_side=24, layouts=("gray", "rgb")), qf=st.integers(1, 100))
def test_header_qf_inverts_opencv_quality_scaling(img, qf):
    found = header_qf(jpeg_encode(img, qf))
    assert found.qf == qf and found.exact and found.rms == 0
