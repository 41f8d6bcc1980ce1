"""models/tiling.py: the tile geometry (coverage, the 8-pixel grid, the fewest and narrowest
tiles, weights summing to one) and the tiled pass equal to the untiled one wherever the
receptive field fits the blending margin. The tiled paths of `restore` are tested against the
faithful one in tests/test_inference.py."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from models.network_fbcnn import FBCNN
from models.tiling import forward_tiled, tile_spans, tile_starts


@settings(max_examples=200, deadline=None)
@given(length=st.integers(1, 120).map(lambda n: 8 * n),
       tile=st.integers(2, 40).map(lambda n: 8 * n), overlap_eighths=st.integers(0, 20))
def test_tile_spans_cover_align_and_sum_to_one(length, tile, overlap_eighths):
    overlap = min(8 * overlap_eighths, tile // 2 // 8 * 8)
    spans = tile_spans(length, tile, overlap)
    starts = [s.start for s in spans]
    assert starts == tile_starts(length, tile, overlap) and starts == sorted(set(starts))
    size, n = spans[0].size, len(spans)
    assert all(s.start % 8 == 0 and s.size == size <= min(tile, length) for s in spans)
    # the fewest tiles of `tile` pixels, each no wider than the overlaps need (up to the grid)
    assert n == 1 + max(0, -(-(length - tile) // (tile - overlap)))
    assert n * size - (n - 1) * overlap - length <= 8 * n
    assert starts[0] == 0 and spans[-1].start + spans[-1].size == length
    assert all(a.start + a.size - b.start >= overlap for a, b in zip(spans, spans[1:]))
    total = torch.zeros(length, dtype=torch.float64)
    total8 = torch.zeros(length // 8, dtype=torch.float64)
    for s in spans:
        total[s.slice] += s.weight.double()
        total8[s.start // 8:(s.start + s.size) // 8] += s.weight8.double()
        # no weight within overlap // 4 of an edge where the tile was cut
        margin = overlap // 4
        if s.start > 0:
            assert not s.weight[:margin].any()
        if s.start + s.size < length:
            assert not s.weight[s.size - margin:].any()
    assert torch.allclose(total, torch.ones_like(total), atol=1e-6)
    assert torch.allclose(total8, torch.ones_like(total8), atol=1e-6)


def _receptive_radius(net, size=192):
    """Pixels an output pixel reaches into its input, measured with a gradient."""
    x = torch.rand(1, net.in_nc, size, size, requires_grad=True)
    restored, _ = net(x, torch.full((1, 1), 0.5))
    restored[0, 0, size // 2, size // 2].backward()
    rows, cols = torch.nonzero(x.grad[0].abs().sum(0), as_tuple=True)
    return int(max((rows - size // 2).abs().max(), (cols - size // 2).abs().max()))


@pytest.mark.parametrize("global_skip, skip_gate", [(False, False), (True, False), (True, True)])
def test_tile_output_equals_untiled_when_receptive_field_fits_the_margin(global_skip, skip_gate):
    torch.manual_seed(1)
    net = FBCNN(in_nc=1, out_nc=1, nc=(4, 4, 4, 4), nb=1, global_skip=global_skip,
                skip_gate=skip_gate).eval()
    if skip_gate:  # open it: a gate of the image's QF on each tile
        torch.nn.init.normal_(net.to_skip_gate.weight, std=0.002)
    radius = _receptive_radius(net)
    assert 40 < radius < 96  # the layout's own: 3 downsamplings, one block per stage
    margin = -(-(radius + 8) // 8) * 8  # + 8: tile cuts fall on 8-pixel cells
    overlap = 4 * margin  # blending ignores a tile's outer overlap // 4 pixels
    tile = 2 * overlap
    x = torch.rand(1, 1, 40, 2 * tile)
    with torch.no_grad():
        expected, qf = net(x)
        tiled, qf_tiled = forward_tiled(net, x, None, tile, overlap)
        assert len(tile_spans(x.shape[-1], tile, overlap)) == 3
        assert (tiled - expected).abs().max() < 1e-5
        assert abs(float(qf_tiled - qf)) < 1e-6
        # the test can fail: with a margin smaller than the receptive field, tiles differ
        small, _ = forward_tiled(net, x, None, 64, 32)
        assert (small - expected).abs().max() > 1e-4
