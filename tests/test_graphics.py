"""Tests of data/graphics.py: the graphics that replace photo patches in training."""
import numpy as np
import pytest

from data.graphics import GRAPHIC_KINDS, _error_diffusion, graphic, neutral_copy


def _photo(shape, seed=1):
    return (np.random.default_rng(seed).random(shape) * 255).astype(np.uint8)


def _floyd_steinberg(plane):
    """The textbook raster-order loop, the error at the borders dropped."""
    d, out = plane.astype(np.float64).copy(), np.zeros(plane.shape)
    h, w = d.shape
    for y in range(h):
        for x in range(w):
            out[y, x] = 255.0 if d[y, x] >= 128 else 0.0
            e = d[y, x] - out[y, x]
            for dy, dx, weight in ((0, 1, 7), (1, -1, 3), (1, 0, 5), (1, 1, 1)):
                if 0 <= y + dy < h and 0 <= x + dx < w:
                    d[y + dy, x + dx] += e * weight / 16
    return out


def test_the_anti_diagonal_error_diffusion_is_floyd_steinberg():
    plane = _photo((13, 29)).astype(np.float64)
    assert np.array_equal(_error_diffusion(plane), _floyd_steinberg(plane))


@pytest.mark.parametrize("shape", [(40, 48, 3), (40, 48)])
@pytest.mark.parametrize("kind", GRAPHIC_KINDS)
def test_every_kind_keeps_shape_and_dtype_and_is_a_function_of_the_generator(kind, shape):
    photo = _photo(shape)
    a = graphic(photo, np.random.default_rng(5), kind)
    b = graphic(photo, np.random.default_rng(5), kind)
    assert a.shape == shape and a.dtype == np.uint8 and np.array_equal(a, b)
    assert not np.array_equal(a, photo)


def test_dither_and_posterize_keep_the_patch_on_average_with_few_levels():
    """Error diffusion keeps a smooth patch's mean (the error left in a row is bounded); the
    ordered dither's levels are k * 255 / (levels - 1)."""
    smooth = np.tile(np.linspace(20, 230, 64), (48, 1)).astype(np.uint8)
    dithered = graphic(smooth, np.random.default_rng(0), "dither")
    assert set(np.unique(dithered)) <= {0, 255}
    assert abs(dithered.mean() - smooth.mean()) < 3
    column_means = dithered.mean(0)
    assert column_means[:8].mean() < 60 and column_means[-8:].mean() > 195
    posterized = graphic(smooth, np.random.default_rng(0), "posterize")
    levels = np.unique(posterized)
    assert 2 <= len(levels) <= 4 and np.allclose(levels, np.round(
        np.arange(len(levels)) * 255 / (len(levels) - 1)))
    assert abs(posterized.astype(float).mean() - smooth.mean()) < 8


def test_lines_stripes_and_text_are_two_colours_drawn_pixel_sharp():
    rng = np.random.default_rng(2)
    for _ in range(10):
        for kind in ("lines", "stripes"):
            g = graphic(_photo((32, 32, 3)), rng, kind)
            colours = np.unique(g.reshape(-1, 3), axis=0)
            assert len(colours) <= 2
        stripes = graphic(_photo((32, 32)), rng, "stripes").astype(int)
        steps = [np.abs(np.diff(stripes, axis=a)).max() for a in (0, 1)]
        assert max(steps) >= 64  # two colours at least 64 levels apart, a pixel or two wide
    text = [graphic(_photo((48, 64)), np.random.default_rng(s), "text") for s in range(6)]
    assert all(len(np.unique(t)) >= 2 for t in text)


def test_an_unknown_kind_is_refused_by_name():
    with pytest.raises(ValueError, match="graphic kind 'logo': choose one of dither"):
        graphic(_photo((8, 8)), np.random.default_rng(0), "logo")


def test_neutral_graphics_have_their_luma_in_every_channel():
    photo = _photo((24, 24, 3))
    colour = graphic(photo, np.random.default_rng(4), "stripes", neutral=False)
    neutral = graphic(photo, np.random.default_rng(4), "stripes", neutral=True)
    assert np.array_equal(neutral, neutral_copy(colour))
    expected = np.round(colour.astype(float) @ [0.299, 0.587, 0.114])
    assert np.array_equal(neutral[..., 0], expected) and (neutral == neutral[..., :1]).all()
    drawn = [graphic(photo, np.random.default_rng(s), "lines") for s in range(20)]
    assert 0 < sum(bool((g == g[..., :1]).all()) for g in drawn) < 20  # one in two, drawn
