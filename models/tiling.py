"""Tiles on the 8x8 JPEG grid: where they fall and how a tiled pass runs the network.

This module owns the tile geometry (`tile_starts`, `tile_spans`: the fewest tiles of at most
`tile` pixels per side, each only as wide as the overlap needs, with normalised blending
weights) and `forward_tiled`, the tiled forward pass with one QF for the whole image and the
encoder cache of a blind pass. `models.inference` decides when to tile and with what;
docs/evaluation.md, "How the network runs", describes both.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

__all__ = ["tile_starts", "tile_spans", "forward_tiled"]


@dataclass(frozen=True)
class _Span:
    """One tile along one axis: pixels [start, start + size) and its blending weights."""
    start: int
    size: int
    weight: torch.Tensor  # (size,), sums to 1 over the tiles covering a pixel
    weight8: torch.Tensor  # (size // 8,), the same at the network's 1/8 scale

    @property
    def slice(self):
        return slice(self.start, self.start + self.size)


def _layout(length, tile, overlap):
    """`(size, starts)` of the tiles along one axis: the fewest tiles of at most `tile` pixels
    whose neighbours overlap by at least `overlap`, each as small as that allows (a multiple of
    8), so that the work added is the overlaps, not the spare pixels of tiles wider than needed;
    their origins (multiples of 8) spread evenly. `length` and `tile` are multiples of 8."""
    if length <= tile:
        return length, [0]
    n = 1 + -(-(length - tile) // (tile - overlap))  # fewest tiles with stride <= tile - overlap
    size = 8 * -(-(length + (n - 1) * overlap) // (8 * n))
    while True:  # a step or two at most: the origins are rounded down to the 8-pixel grid
        starts = [8 * (k * ((length - size) // 8) // (n - 1)) for k in range(n)]
        if all(b - a <= size - overlap for a, b in zip(starts, starts[1:])):
            return size, starts
        size += 8  # size == tile fits: n was counted for it


def tile_starts(length, tile, overlap):
    """Origins (multiples of 8) of the tiles covering [0, length), spread evenly so that
    neighbours overlap by at least `overlap` (`_layout`); `length` and `tile` are multiples of 8."""
    return _layout(length, tile, overlap)[1]


def tile_spans(length, tile, overlap):
    """The tiles along one axis with their normalised blending weights (see the module doc)."""
    size, starts = _layout(length, tile, overlap)
    margin, ramp = overlap // 4, overlap // 2
    index = torch.arange(size, dtype=torch.float64)
    raw = []
    for start in starts:
        inf = torch.full_like(index, float("inf"))
        to_cut = torch.minimum(index if start > 0 else inf,
                               (size - 1 - index) if start + size < length else inf)
        raw.append(((to_cut - margin + 1) / (ramp + 1)).clamp(0, 1))
    total = torch.zeros(length, dtype=torch.float64)
    for start, w in zip(starts, raw):
        total[start:start + size] += w
    spans = []
    for start, w in zip(starts, raw):
        w = (w / total[start:start + size]).float()
        spans.append(_Span(start, size, w, w.view(-1, 8).mean(1)))
    return spans


def forward_tiled(fns, x, qf_input, tile, overlap, cache_bytes=0, qf_only=False):
    """Tiled forward pass with one QF for the whole image; returns (restored, qf) as the
    network's forward does. `fns` is an FBCNN, or the compiled entry points of one.
    `qf_only`: stop after the QF pass and return (None, qf).

    `cache_bytes`: in blind mode, keep the encoder outputs of the QF pass (all skips but the
    first, which one convolution recomputes) for as many tiles as fit in this many bytes, on
    the image's device, and decode those tiles from them instead of encoding them again.
    """
    h, w = x.shape[-2:]
    x = F.pad(x, (0, -w % 8, 0, -h % 8), mode="replicate")
    rows, cols = (tile_spans(n, tile, overlap) for n in x.shape[-2:])
    tiles = [(r, c) for r in rows for c in cols]
    if len(tiles) == 1:  # the tile holds the image: the untiled pass, bit for bit
        if qf_only:
            return None, fns.encode(x)[1]
        restored, qf = fns.forward(x, qf_input)
        return restored[..., :h, :w], qf
    dev = x.device
    n_cells = x.shape[-2] * x.shape[-1] / 64

    def encode(r, c):
        return fns.encode(x[..., r.slice, c.slice], predict_qf=False)[0]

    def pooled_features(skips, r, c):
        weight = (r.weight8[:, None] * c.weight8[None, :]).to(dev)
        return (fns.qf_features(skips[-1]).float() * weight).sum((2, 3))

    bar = tqdm(total=len(tiles) * (2 if qf_input is None else 1), desc="tiles", unit="tile",
               leave=False, disable=None if len(tiles) > 4 else True)
    pooled, skips, cache, cached_bytes = 0.0, None, {}, 0
    if qf_input is None:  # the QF pass: encoder only, features pooled over the whole image
        for r, c in tiles:
            skips = None  # free the previous tile's activations before the next encoding
            skips = encode(r, c)
            pooled = pooled + pooled_features(skips, r, c)
            size = sum(t.numel() * t.element_size() for t in skips[1:])
            if cached_bytes + size <= cache_bytes:
                cache[r.start, c.start] = skips[1:]
                cached_bytes += size
            bar.update()
        cache.pop((tiles[-1][0].start, tiles[-1][1].start), None)  # still in `skips`
        qf_input = fns.qf_from_pooled(pooled / n_cells)
        qf = qf_input
        if qf_only:
            bar.close()
            return None, qf
    else:
        qf = None
    out = None
    for r, c in reversed(tiles):  # reversed, so the QF pass's last encoding is used first
        if skips is None:
            deep = cache.pop((r.start, c.start), None)
            if deep is not None:
                skips = (fns.head(x[..., r.slice, c.slice]), *deep)
            else:
                skips = encode(r, c)
                if qf is None:
                    pooled = pooled + pooled_features(skips, r, c)
        y = fns.decode(skips, qf_input, (r.size, c.size), x[..., r.slice, c.slice]).float()
        skips = None
        if out is None:
            out = torch.zeros((x.shape[0], y.shape[1], *x.shape[-2:]), device=dev)
        out[..., r.slice, c.slice] += y * (r.weight[:, None] * c.weight[None, :]).to(dev)
        bar.update()
    bar.close()
    if qf is None:
        qf = fns.qf_from_pooled(pooled / n_cells)
    return out[..., :h, :w], qf
