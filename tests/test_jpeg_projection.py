"""data/jpeg_projection.py: the projection onto a JPEG's quantization constraint set."""
import io
import os

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from data.jpeg import jpeg_decode, jpeg_encode
from data.jpeg_projection import (CALIBRATION_WINDOW, TWIN_SHIFT, ProjectionUnavailable,
                                  _image, _planes, _posterior, _project_plane, _window,
                                  _window_coefficients, block_dct, block_idct, make_twin,
                                  project, read_coefficients, twin_shares)
from utils.metrics import psnr


@pytest.fixture(scope="module")
def photo(testsets_dir):
    """An odd-sized crop of a LIVE1 photo (the blocks at its right and bottom edges are partial)."""
    img = cv2.imread(os.path.join(testsets_dir, "LIVE1_color", "bikes.png"))
    return np.ascontiguousarray(cv2.cvtColor(img, cv2.COLOR_BGR2RGB)[37:158, 51:246])


def pil_jpeg(img, qf, **kwargs):
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=qf, **kwargs)
    return buf.getvalue()


def test_block_dct_is_orthonormal_and_inverted(rng=np.random.default_rng(0)):
    plane = rng.uniform(-128, 128, (16, 24))
    coefficients = block_dct(plane)
    assert coefficients.shape == (2, 3, 8, 8)
    np.testing.assert_allclose(block_idct(coefficients), plane, atol=1e-9)
    # orthonormal: energy kept per block; DC = 8 * block mean (JPEG's scaling)
    np.testing.assert_allclose((coefficients ** 2).sum(), (plane ** 2).sum())
    np.testing.assert_allclose(coefficients[1, 2, 0, 0], 8 * plane[8:16, 16:24].mean())


def test_ycbcr_planes_have_jfif_values_and_round_trip(rng=np.random.default_rng(4)):
    """The projection's own colour conversion: JFIF's values, and back to the same pixels at
    8 and 16 bits."""
    rgb = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [128, 128, 128]]], dtype=np.uint8)
    y, cb, cr = (p.double().numpy() for p in _planes(rgb))
    np.testing.assert_allclose(y[0], [76.245, 149.685, 29.07, 128], atol=1e-4)
    np.testing.assert_allclose([cb[0, 3], cr[0, 3]], [128, 128], atol=1e-4)
    photo = rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)
    np.testing.assert_array_equal(_image(_planes(photo)), photo)
    deep = photo.astype(np.uint16) * 257 + rng.integers(0, 257, photo.shape).astype(np.uint16)
    assert np.abs(_image(_planes(deep), np.uint16).astype(int) - deep).max() <= 1


def test_the_file_reads_as_opencv_decodes_it(photo):
    """The coefficients, tables and sampling jpeglib reads, turned back into pixels by hand,
    give the decoder's luma."""
    data = jpeg_encode(photo[..., 1], 50)
    coefficients = read_coefficients(data)
    (component,) = coefficients.components
    assert (coefficients.height, coefficients.width) == photo.shape[:2]
    assert component.coefficients.shape == (16, 25, 8, 8) and component.factor == (1, 1)
    assert component.table[0, 0] == 16 and component.table[7, 7] == 99  # IJG luma at QF 50
    plane = np.clip(block_idct(component.coefficients * component.table) + 128, 0, 255)
    decoded = jpeg_decode(data, 1).astype(np.float64)
    assert np.abs(plane[:121, :195] - decoded).max() <= 1.5


@pytest.mark.parametrize("qf", [10, 50, 90])
def test_projected_gray_coefficients_lie_in_their_intervals(photo, qf):
    data = jpeg_encode(photo[..., 0], qf)
    component = read_coefficients(data).components[0]
    blurred = cv2.GaussianBlur(jpeg_decode(data, 1), (7, 7), 2).astype(np.float32)
    out = _project_plane(torch.from_numpy(blurred), component).double().numpy()
    padded = np.pad(out, ((0, 128 - 121), (0, 200 - 195)), mode="edge")
    k, q = component.coefficients, component.table
    d = block_dct(padded - 128)
    inside = (d >= (k - 0.5) * q - 1e-3) & (d <= (k + 0.5) * q + 1e-3)  # float32's rounding
    # the whole blocks exactly (the partial edge blocks were padded again from the result)
    assert inside[:15, :24].all()


@pytest.mark.parametrize("qf", [10, 30, 60, 90])
def test_projection_never_moves_a_gray_estimate_away_from_the_truth(photo, qf):
    truth = photo[..., 0]
    data = jpeg_encode(truth, qf)
    coefficients = read_coefficients(data)
    decoded = jpeg_decode(data, 1)
    for estimate in (cv2.GaussianBlur(decoded, (5, 5), 1.2), cv2.medianBlur(decoded, 5),
                     np.full_like(decoded, 128)):
        projected = project(estimate, coefficients, "posterior")
        assert psnr(projected, truth) >= psnr(estimate, truth) - 0.01
        # a projection: applying it again changes little (rounding, and pixels clipped to
        # [0, 255] after the first)
        moved = np.abs(project(projected, coefficients, "posterior").astype(int) - projected)
        assert float((moved > 1).mean()) < 0.01
    # the truth is in the set: it stays (up to libjpeg's integer DCT and rounding)
    assert psnr(project(truth, coefficients, "posterior"), truth) > 55


@pytest.mark.parametrize("kind", ["opencv 4:2:0", "4:4:4", "4:2:2", "progressive",
                                  "restart markers"])
def test_colour_layouts_keep_the_truth_and_improve_a_blurred_estimate(photo, kind):
    if kind == "opencv 4:2:0":
        data = jpeg_encode(photo, 40)
    elif kind == "restart markers":
        ok, buf = cv2.imencode(".jpg", cv2.cvtColor(photo, cv2.COLOR_RGB2BGR),
                               [cv2.IMWRITE_JPEG_QUALITY, 40, cv2.IMWRITE_JPEG_RST_INTERVAL, 2])
        data = buf.tobytes()
        assert b"\xff\xdd" in data  # a DRI segment
    else:
        subsampling = {"4:4:4": 0, "4:2:2": 1, "progressive": 2}[kind]
        data = pil_jpeg(photo, 40, subsampling=subsampling, progressive=kind == "progressive")
    coefficients = read_coefficients(data)
    factors = [c.factor for c in coefficients.components]
    assert factors[0] == (1, 1) and len(factors) == 3
    assert factors[1] == {"4:4:4": (1, 1), "4:2:2": (1, 2)}.get(kind, (2, 2))
    assert psnr(project(photo, coefficients, "posterior"), photo) > 50
    decoded = jpeg_decode(data, 3)
    blurred = cv2.GaussianBlur(decoded, (5, 5), 1.5)
    gain = float(psnr(project(blurred, coefficients, "posterior"), photo) - psnr(blurred, photo))
    assert gain > 1


def test_a_colour_restoration_of_a_gray_file_gets_its_luma_projected(photo):
    data = jpeg_encode(photo[..., 1], 30)
    colour = np.repeat(cv2.GaussianBlur(jpeg_decode(data, 1), (5, 5), 1.2)[..., None], 3, axis=2)
    projected = project(colour, read_coefficients(data), "posterior")
    assert projected.shape == colour.shape
    assert psnr(projected[..., 1], photo[..., 1]) > psnr(colour[..., 1], photo[..., 1])


def test_a_size_mismatch_is_refused(photo):
    coefficients = read_coefficients(jpeg_encode(photo, 50))
    with pytest.raises(ProjectionUnavailable, match="the image is 194x121, the file 195x121"):
        project(photo[:, :-1], coefficients, "posterior")


def _with_sof(data, marker=None, precision=None):
    """The same bytes with the frame's SOF marker or sample precision changed."""
    data = bytearray(data)
    at = data.index(b"\xff\xc0")
    if marker is not None:
        data[at + 1] = marker
    if precision is not None:
        data[at + 4] = precision
    return bytes(data)


@pytest.mark.parametrize("change, reason", [
    ({"marker": 0xC9}, "arithmetic coding"),
    ({"marker": 0xC3}, "lossless JPEG"),
    ({"marker": 0xC5}, "hierarchical JPEG"),
    ({"precision": 12}, "12-bit samples"),
])
def test_frames_libjpeg_gives_no_8bit_dct_for_are_named(photo, change, reason):
    with pytest.raises(ProjectionUnavailable, match=reason):
        read_coefficients(_with_sof(jpeg_encode(photo, 50), **change))


def test_cmyk_is_named():
    cmyk = Image.new("CMYK", (24, 16), (10, 200, 30, 5))
    buf = io.BytesIO()
    cmyk.save(buf, "JPEG", quality=80)
    with pytest.raises(ProjectionUnavailable, match="4 components"):
        read_coefficients(buf.getvalue())


def test_bytes_that_are_not_a_jpeg_are_named():
    with pytest.raises(ProjectionUnavailable):
        read_coefficients(b"\x89PNG\r\n\x1a\n" + bytes(100))


def test_the_posterior_mean_lies_between_the_clip_and_the_files_value():
    rng = np.random.default_rng(1)
    k = rng.integers(-5, 6, (30, 8, 40, 8)).astype(float)  # planar: block row, u, column, v
    step = rng.integers(1, 30, (1, 8, 1, 8)).astype(float)
    estimate = k * step + rng.normal(0, 1, k.shape) * step * rng.uniform(0.1, 3, (1, 8, 1, 8))

    def posterior_mean(estimate, k, step):
        return _posterior(*(torch.from_numpy(a) for a in (estimate, k, step))).numpy()

    post = posterior_mean(estimate, k, step)
    clipped = np.clip(estimate, (k - 0.5) * step, (k + 0.5) * step)
    assert (post >= (k - 0.5) * step - 1e-9).all() and (post <= (k + 0.5) * step + 1e-9).all()
    assert (post >= np.minimum(clipped, k * step) - 1e-9).all()
    assert (post <= np.maximum(clipped, k * step) + 1e-9).all()
    # an estimate the quantization alone explains (inside its intervals, spread q^2/12 or
    # less) is left as the clip leaves it
    inside = k * step + rng.uniform(-0.2, 0.2, k.shape) * step
    np.testing.assert_array_equal(posterior_mean(inside, k, step), inside)


def test_a_restoration_that_strays_is_pulled_back_towards_the_file(photo):
    """A 'restoration' that is the decoded JPEG plus noise far beyond the quantization: clipping
    leaves it at the intervals' edges, the posterior mean brings it back towards the JPEG."""
    truth = photo[..., 0]
    rng = np.random.default_rng(2)
    for qf in (90, 100):
        data = jpeg_encode(truth, qf)
        coefficients = read_coefficients(data)
        decoded = jpeg_decode(data, 1)
        noisy = np.clip(decoded + rng.normal(0, 6, decoded.shape), 0, 255).astype(np.uint8)
        jpeg_db = float(psnr(decoded, truth))
        clipped = float(psnr(project(noisy, coefficients, "clip"), truth))
        posterior = float(psnr(project(noisy, coefficients, "posterior"), truth))
        assert posterior > clipped + 1
        if qf == 100:  # intervals of width 1: about the JPEG itself
            assert posterior > jpeg_db - 0.3


def calibrate(img, coefficients, network):
    """The shares a twin of `img` teaches when `network` restores it."""
    twin = make_twin(img, coefficients)
    return twin_shares(twin, network(twin.image))


def calibrated(img, coefficients, network):
    """`img` projected with the shares its twin teaches (models/consistency.py's steps)."""
    return project(img, coefficients, "calibrated", shares=calibrate(img, coefficients, network))


def _oracle_for_its_twin(img):
    """A 'network' that restores the calibration's twin perfectly: it returns the twin's source."""
    pad = ((TWIN_SHIFT, 0), (TWIN_SHIFT, 0)) + ((0, 0),) * (img.ndim - 2)
    return lambda twin: np.pad(img, pad, mode="edge")


@pytest.mark.parametrize("gray", [True, False])
def test_a_network_that_restores_its_twin_keeps_every_departure(photo, gray):
    """Shares of 1 (the twin restored exactly): the calibrated result is the clip itself."""
    img = photo[..., 1] if gray else photo
    blurred = cv2.GaussianBlur(img, (0, 0), 1.0)
    coefficients = read_coefficients(jpeg_encode(img, 50))
    clipped = project(blurred, coefficients, "clip")  # the twin's source
    shares = calibrate(blurred, coefficients, _oracle_for_its_twin(clipped))
    assert len(shares) == (1 if gray else 3) and all(s.shape == (8, 8) for s in shares)
    np.testing.assert_allclose(np.concatenate(shares), 1.0)
    np.testing.assert_array_equal(calibrated(blurred, coefficients,
                                          _oracle_for_its_twin(clipped)), clipped)


@pytest.mark.parametrize("gray", [True, False])
def test_a_network_that_paints_detail_flat_is_drawn_back_to_the_file(photo, gray):
    """A 'network' that blurs everything: at QF 95 its output, clipped or posterior, is worse
    than the JPEG; the twin shows the blur losing detail, and the calibrated result keeps
    about the JPEG. At QF 10, where blur removes blocking, it keeps most of the blur's gain."""
    truth = photo[..., 1] if gray else photo
    network = lambda img: cv2.GaussianBlur(img, (0, 0), 1.0)  # noqa: E731
    for qf in (95, 10):
        data = jpeg_encode(truth, qf)
        decoded, coefficients = jpeg_decode(data, 1 if gray else 3), read_coefficients(data)
        jpeg_db = float(psnr(decoded, truth))
        restored = network(decoded)
        clipped = float(psnr(project(restored, coefficients, "clip"), truth))
        kept = float(psnr(calibrated(restored, coefficients, network), truth))
        if qf == 95:
            assert clipped < jpeg_db - 0.5 and kept > jpeg_db - 0.1
        else:
            assert kept > jpeg_db + 0.3 and kept > clipped - 0.3


@pytest.mark.parametrize("gray", [True, False])
def test_calibrated_coefficients_lie_in_their_intervals(photo, gray):
    # mid-tones: the result's pixels are never clipped at 0 or 255, which would move them
    img = ((photo[..., 1] if gray else photo) * 0.7 + 38).astype(np.uint8)
    data = jpeg_encode(img, 80)
    coefficients = read_coefficients(data)
    noisy = np.clip(jpeg_decode(data, 1 if gray else 3)
                    + np.random.default_rng(3).normal(0, 4, img.shape), 0, 255).astype(np.uint8)
    out = calibrated(noisy, coefficients, lambda x: cv2.GaussianBlur(x, (0, 0), 0.8))
    y = out.astype(np.float64) if gray else _planes(out)[0].double().numpy()
    component = coefficients.components[0]
    padded = np.pad(y, ((0, 128 - 121), (0, 200 - 195)), mode="edge")
    k, q = component.coefficients, component.table
    outside = np.abs(block_dct(padded - 128) - k * q) - q / 2
    # whole blocks (the partial edge blocks were padded again from the result); the rounding
    # of the result to 8-bit pixels moves a coefficient by about a pixel level at most
    assert outside[:15, :24].max() <= 1.5


def test_the_calibration_window_starts_on_the_grid_and_is_bounded():
    rows, cols = _window(3000, 4000)
    assert rows.start % 16 == 0 and cols.start % 16 == 0
    assert rows.stop - rows.start == cols.stop - cols.start == CALIBRATION_WINDOW
    assert abs((rows.start + rows.stop) / 2 - 1500) <= 16 and abs((cols.start + cols.stop) / 2
                                                                  - 2000) <= 16
    assert _window(121, 195) == (slice(0, 121), slice(0, 195))


def test_unknown_methods_and_a_calibration_without_shares_are_refused(photo):
    coefficients = read_coefficients(jpeg_encode(photo, 50))
    with pytest.raises(ValueError, match="calibrated, clip, posterior"):
        project(photo, coefficients, "median")
    with pytest.raises(ValueError, match="needs the shares"):
        project(photo, coefficients, "calibrated")


@pytest.mark.parametrize("gray", [True, False])
def test_the_twin_of_a_large_image_clips_its_window_alone(testsets_dir, gray):
    """Above CALIBRATION_WINDOW the twin's truth is clipped on the window's own blocks: as the
    whole image's clip there (exactly for gray; colour within a level, its chroma correction
    being upsampled without the neighbours outside)."""
    img = cv2.imread(os.path.join(testsets_dir, "LIVE1_color", "bikes.png"))
    big = np.ascontiguousarray(cv2.resize(img, (1000, 840))[:, :, ::-1])
    big = np.ascontiguousarray(big[..., 1]) if gray else big
    coefficients = read_coefficients(jpeg_encode(big, 60))
    rows, cols = _window(*big.shape[:2])
    assert (rows.stop - rows.start, cols.stop - cols.start) == (768, 768)
    window = _window_coefficients(coefficients, rows, cols)
    assert (window.height, window.width) == (768, 768)
    assert window.components[0].coefficients.shape[:2] == (96, 96)
    whole = project(big, coefficients, "clip")[rows, cols].astype(int)
    alone = project(np.ascontiguousarray(big[rows, cols]), window, "clip").astype(int)
    assert np.abs(whole - alone).max() <= (0 if gray else 1)


@pytest.mark.parametrize("width", [8, 16, 40])
def test_projecting_leaves_the_files_coefficients_as_read(photo, width):
    """A plane one block wide is planar without a copy: the projection must not write into the
    file's coefficients (it once did), so projecting twice gives the same image."""
    img = np.ascontiguousarray(photo[:64, :width])
    data = jpeg_encode(img, 50)
    coefficients = read_coefficients(data)
    read = [c.coefficients.copy() for c in coefficients.components]
    decoded = jpeg_decode(data, 3)
    first = project(decoded, coefficients, "clip")
    assert all(np.array_equal(r, c.coefficients) for r, c in zip(read, coefficients.components))
    np.testing.assert_array_equal(project(decoded, coefficients, "clip"), first)
