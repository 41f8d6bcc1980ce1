"""Restoring a JPEG consistently with its file: the network, then the calibrated projection.

This module owns the one way main_restore, the demo and the test scripts' `--projection`
restore a decoded JPEG so that the result stays an image the file could have come from:
the network's restoration (`models.inference`), a twin JPEG of it
(`data.jpeg_projection.make_twin`) restored by the same network and options, the shares the
twin teaches (`twin_shares`), and the projection onto the file's intervals with those shares.
Same-size images of one model may go through the network together (`restore_batch`), and
their twins too. Images without coefficients (not a JPEG, or one the projection cannot use)
are restored as they are.
"""
from data.jpeg_projection import (ProjectionUnavailable, make_twin, project, read_coefficients,
                                  twin_shares)
from models.engines import resolve_engine
from models.inference import plan_tile, restore, restore_batch
from utils.jpeg_header import is_jpeg

__all__ = ["PROJECTED", "NOT_PROJECTED", "NOT_A_JPEG", "BATCH_OPTIONS", "file_coefficients",
           "restore_consistent", "restore_consistent_batch"]

# what a tool says of an image's consistency with its file
PROJECTED = "projected onto the file's DCT"
NOT_PROJECTED = "not projected onto the file's DCT"
NOT_A_JPEG = "not a JPEG file: no JPEG trace read"
BATCH_OPTIONS = ("precision", "channels_last", "compile", "engine")  # what restore_batch takes


def file_coefficients(data, wanted=True):
    """`(coefficients or None, note, problem or None)` of a file's bytes: the coefficients of a
    JPEG when the projection is `wanted`, the few words a tool says of it (PROJECTED, "" when
    not wanted, ...), and why a JPEG's cannot be used (CMYK, 12-bit, arithmetic coding, ...:
    its restoration is then kept as it is)."""
    if not is_jpeg(data):
        return None, NOT_A_JPEG, None
    if not wanted:
        return None, "", None
    try:
        return read_coefficients(data), PROJECTED, None
    except ProjectionUnavailable as exc:
        return None, NOT_PROJECTED, str(exc)


def _network(model, imgs, qfs, device, bit_depth, options):
    """`(restored, predicted QF)` per image: in one pass when there are several and the images
    are not tiled, else one by one with every option."""
    if len(imgs) > 1 and plan_tile(imgs[0].shape, device, net=model.net)[0] is None:
        return restore_batch(model, imgs, qfs, device=device, bit_depth=bit_depth,
                             **{k: v for k, v in options.items() if k in BATCH_OPTIONS})
    return [restore(model, img, qf=None if qfs is None else qfs[k], device=device,
                    bit_depth=bit_depth, **options) for k, img in enumerate(imgs)]


def restore_consistent_batch(model, imgs, coefficients, qfs=None, device="cpu", bit_depth=8,
                             **options):
    """`(restored, predicted QF)` per image of `imgs` (same size, one model), each made
    consistent with its file's `coefficients` (None: restored only); `qfs` as for
    `restore_batch`, `options` as for `restore`. The engine "auto" is resolved once, for the
    image: its twin runs on the same engine (a photo tiled on PyTorch loads no OpenVINO)."""
    if options.get("engine") == "auto" and model.net is not None:  # one engine for the image
        tiled = plan_tile(imgs[0].shape, device, options.get("tile"),
                          options.get("tile_overlap", 32),
                          options.get("max_untiled_megapixels"), model.net)[0]
        options = {**options, "engine": resolve_engine(
            "auto", options.get("precision", "fp32"), tiled=tiled is not None, device=device)}
    results = _network(model, imgs, qfs, device, bit_depth, options)
    if model.net is None:  # the jpeg pseudo-model: the input is already the file's image
        return results
    twinned = [k for k, c in enumerate(coefficients) if c is not None]
    twins = {k: make_twin(results[k][0], coefficients[k]) for k in twinned}
    if not twins:
        return results
    twin_qfs = None if qfs is None else [qfs[k] for k in twinned]
    restored = _network(model, [twins[k].image for k in twinned], twin_qfs, device, bit_depth,
                        options)
    for k, (twin_E, _) in zip(twinned, restored):
        img_E, qf_pred = results[k]
        shares = twin_shares(twins[k], twin_E)
        results[k] = (project(img_E, coefficients[k], "calibrated", shares=shares), qf_pred)
    return results


def restore_consistent(model, img, coefficients=None, qf=None, device="cpu", bit_depth=8,
                       **options):
    """`(restored, predicted QF)` of one image, made consistent with its file's
    `coefficients` (None: restored only)."""
    return restore_consistent_batch(model, [img], [coefficients],
                                    None if qf is None else [qf], device, bit_depth,
                                    **options)[0]
