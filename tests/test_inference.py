"""models/inference.py: every fast or memory-bounded path against the faithful one (fp32,
untiled), and the pipelined test runner against the serial one.

Random-weight networks stand in for the released ones (not available offline). Small widths keep
the file fast on 2 CPU cores; default PyTorch initialisation keeps each residual branch small, so
the network's effective receptive field is small too, as a trained network's is."""
import json
import logging
import math
import os
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import models.inference as inference
from data.jpeg import jpeg, label_to_qf, qf_to_label
from models.inference import (CpuPlan, check_options, cpu_plan, fit_overlap, plan_tile,
                              predict_qf, restore, restore_batch, tf32_allowed)
from models.model_zoo import LoadedModel
from models.network_fbcnn import FBCNN
from runners.evaluation import COLOR, main
from runners.pipeline import Pipeline
from utils.image import imread_uint, imwrite

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(nc=(8, 16, 32, 64), nb=1, channels=3, seed=0):
    torch.manual_seed(seed)
    net = FBCNN(in_nc=channels, out_nc=channels, nc=nc, nb=nb).eval()
    return LoadedModel("random", net, channels)


@pytest.fixture(scope="module")
def photo(testsets_dir):
    """A 200x264 crop of LIVE1 monarch at QF 10: real edges and real blocking artifacts."""
    img = imread_uint(os.path.join(testsets_dir, "LIVE1_color", "monarch.png"), 3)
    return jpeg(np.ascontiguousarray(img[100:300, 200:464]), 10)


@pytest.fixture(scope="module")
def model():
    return _model()


@pytest.fixture(scope="module")
def faithful(model, photo):
    return restore(model, photo)


def _grey_diff(a, b):
    return np.abs(a.astype(np.int16) - b.astype(np.int16))


def _record_decodes(monkeypatch, net):
    """Record the qf given to every decode call (one per tile, or one untiled)."""
    seen = []
    decode = net.decode

    def recording(skips, qf, size, x=None):
        seen.append(qf.detach().float().clone())
        return decode(skips, qf, size, x)

    monkeypatch.setattr(net, "decode", recording)
    return seen


def test_invalid_options_name_the_argument(model, photo):
    with pytest.raises(ValueError, match=r"tile=100\b"):
        restore(model, photo, tile=100)
    with pytest.raises(ValueError, match="tile_overlap=12"):
        check_options(tile=64, tile_overlap=12)
    with pytest.raises(ValueError, match=r"tile_overlap=40.*tile=64"):
        check_options(tile=64, tile_overlap=40)
    with pytest.raises(ValueError, match="precision='fp8'"):
        restore(model, photo, precision="fp8")
    check_options("bf16", tile=64, tile_overlap=32)  # valid: no error


# Tiling against the untiled pass

def test_tile_larger_than_image_is_bit_exact(model, photo, faithful):
    restored, qf = restore(model, photo, tile=512, tile_overlap=64)
    assert np.array_equal(restored, faithful[0]) and qf == faithful[1]


def test_tiled_restore_is_within_one_grey_level(model, photo, faithful, monkeypatch):
    seen = _record_decodes(monkeypatch, model.net)
    restored, qf = restore(model, photo, tile=96, tile_overlap=32)
    assert len(seen) == 3 * 4  # 200x264 in 96-pixel tiles: 3 rows, 4 columns
    diff = _grey_diff(restored, faithful[0])
    assert diff.max() <= 1 and diff.mean() < 0.05
    assert qf == faithful[1]


def test_tiled_restore_with_a_given_qf_is_within_one_grey_level(model, photo):
    expected, _ = restore(model, photo, qf=30)
    restored, _ = restore(model, photo, qf=30, tile=96, tile_overlap=32)
    assert _grey_diff(restored, expected).max() <= 1


def test_tiles_all_receive_the_one_qf_of_the_whole_image(model, photo, faithful, monkeypatch):
    seen = _record_decodes(monkeypatch, model.net)
    _, qf = restore(model, photo, tile=96, tile_overlap=32)
    assert len(seen) == 12 and all(torch.equal(q, seen[0]) for q in seen)
    assert label_to_qf(seen[0][0, 0]) == qf == faithful[1]
    # the image's pooled QF features, not one tile's: it matches the untiled prediction closely
    with torch.no_grad():
        _, label = model.net(torch.from_numpy(photo).permute(2, 0, 1)[None].float() / 255)
    assert abs(float(seen[0][0, 0] - label[0, 0])) < 1e-3
    seen.clear()
    restore(model, photo, qf=30, tile=96, tile_overlap=32)
    assert len(seen) == 12
    assert all(torch.allclose(q, torch.full((1, 1), qf_to_label(30))) for q in seen)


def _count_calls(monkeypatch, net, *names):
    counts = dict.fromkeys(names, 0)
    for name in names:
        original = getattr(net, name)

        def counting(*args, _name=name, _original=original, **kwargs):
            counts[_name] += 1
            return _original(*args, **kwargs)
        monkeypatch.setattr(net, name, counting)
    return counts


@pytest.mark.parametrize("tiles_cached", [0, 3, 11])
def test_tile_encoder_cache_is_bit_exact_and_saves_encodings(model, photo, monkeypatch,
                                                            tiles_cached):
    """96-pixel tiles over 200x264: 12 tiles. The cache holds `tiles_cached` of them (11: all
    but the last, whose encoding is reused anyway); the others are encoded twice."""
    expected, expected_qf = restore(model, photo, tile=96, tile_overlap=32, tile_cache_gib=0)
    counts = _count_calls(monkeypatch, model.net, "encode", "head")
    x = torch.rand(1, 3, 96, 96)
    with torch.no_grad():
        deep = model.net.encode(x, predict_qf=False)[0][1:]
    counts.update(encode=0, head=0)
    per_tile = sum(t.numel() * t.element_size() for t in deep)  # every tile is 96x96 here
    restored, qf = restore(model, photo, tile=96, tile_overlap=32,
                           tile_cache_gib=tiles_cached * per_tile / 2 ** 30)
    assert np.array_equal(restored, expected) and qf == expected_qf
    cached = min(tiles_cached, 11)
    assert counts["encode"] == 12 + 11 - cached  # QF pass, then the tiles not cached
    # inside each encode, and once per cached tile
    assert counts["head"] == 12 + 11 - cached + cached


def test_out_of_memory_with_the_encoder_cache_retries_without_it(model, photo, monkeypatch,
                                                                  caplog):
    expected, expected_qf = restore(model, photo, tile=96, tile_overlap=32)
    calls = []
    tiled = inference.forward_tiled

    def no_room_for_a_cache(fns, x, qf_input, tile, overlap, cache_bytes=0, qf_only=False):
        calls.append((tile, cache_bytes))
        if cache_bytes:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return tiled(fns, x, qf_input, tile, overlap, cache_bytes, qf_only)

    monkeypatch.setattr(inference, "forward_tiled", no_room_for_a_cache)
    with caplog.at_level(logging.WARNING, logger="fbcnn.models.inference"):
        restored, qf = restore(model, photo, tile=96, tile_overlap=32, tile_cache_gib=0.5)
    assert calls == [(96, 2 ** 29), (96, 0)]
    assert "without the encoder cache" in caplog.records[-1].getMessage()
    assert np.array_equal(restored, expected) and qf == expected_qf


def test_cpu_tiles_images_over_the_megapixel_limit(model, photo, monkeypatch):
    monkeypatch.setitem(inference.CPU_PLANS, 16, inference.CpuPlan(96, 1.5, 0.0))
    seen = _record_decodes(monkeypatch, model.net)
    auto, _ = restore(model, photo, max_untiled_megapixels=0.05)  # photo: 0.053 megapixels
    assert len(seen) == 12
    explicit, _ = restore(model, photo, tile=96, tile_overlap=32)
    assert np.array_equal(auto, explicit)
    seen.clear()
    restore(model, photo, max_untiled_megapixels=math.inf)
    assert len(seen) == 1
    net = model.net  # nc[0] 8: the lite plan
    assert plan_tile(photo.shape, "cpu", None, 32, 0.05, net) == (96, 32)
    assert plan_tile(photo.shape, "cpu", None, 64, 0.05, net) == (96, 48)
    assert plan_tile(photo.shape, "cpu", None, 32, 0.06, net) == (None, 32)
    assert plan_tile(photo.shape, "cuda", None, 32, 0.05, net) == (None, 32)
    assert plan_tile(photo.shape, "cpu", 128, 16, 0.05, net) == (128, 16)


def test_each_width_has_its_cpu_plan():
    """The lite width tiles above 1.5 MP with an encoder cache, the released one above 2 MP
    without; a width between takes the next wider plan, a wider one a proportionally smaller
    limit; the plan decides where an image is first tiled."""
    lite, released = _model().net, _model(nc=(64, 128, 256, 512), nb=1).net
    assert cpu_plan(lite) == CpuPlan(768, 1.5, 1.0)
    assert cpu_plan(released) == CpuPlan(512, 2.0, 0.0)
    assert cpu_plan(SimpleNamespace(nc=[32, 64, 128, 256])) == CpuPlan(512, 2.0, 0.0)
    assert cpu_plan(SimpleNamespace(nc=[128, 256, 512, 1024])) == CpuPlan(512, 1.0, 0.0)
    assert cpu_plan(None) == CpuPlan(512, 2.0, 0.0)  # unknown: the released width's
    shape = (1200, 1500)  # 1.8 MP: over the lite limit, under the released one
    assert plan_tile(shape, "cpu", net=lite) == (768, 32)
    assert plan_tile(shape, "cpu", net=released) == (None, 32)


@pytest.mark.parametrize("tile, overlap, fitted", [(None, 32, 32), (16, 32, 8), (40, 32, 16),
                                                   (56, 32, 24), (64, 32, 32), (512, 48, 48)])
def test_fit_overlap_is_the_largest_overlap_check_options_accepts(tile, overlap, fitted):
    assert fit_overlap(tile, overlap) == fitted
    check_options(tile=tile, tile_overlap=fitted)
    if tile is not None and fitted < overlap:
        with pytest.raises(ValueError, match="at most half the tile"):
            check_options(tile=tile, tile_overlap=fitted + 8)


# Out-of-memory fallback

def _oom_above(monkeypatch, net, max_pixels):
    """Make the network raise CUDA's out-of-memory error on inputs over `max_pixels`."""
    encode = net.encode
    sizes = []

    def limited(x, predict_qf=True):
        sizes.append(tuple(x.shape[-2:]))
        if x.shape[-2] * x.shape[-1] > max_pixels:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return encode(x, predict_qf)

    monkeypatch.setattr(net, "encode", limited)
    return sizes


def test_out_of_memory_falls_back_to_tiles_then_smaller_tiles(model, photo, monkeypatch, caplog):
    expected, expected_qf = restore(model, photo, tile=64, tile_overlap=32)
    released = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: released.append(1))
    monkeypatch.setitem(inference.DEFAULT_TILE, "cpu", 128)
    sizes = _oom_above(monkeypatch, model.net, 100 * 100)  # 128-pixel tiles fail, 64 fit
    with caplog.at_level(logging.WARNING, logger="fbcnn.models.inference"):
        # no encoder cache (the lite plan's 1 GiB would be dropped first: the test below)
        restored, qf = restore(model, photo, tile_cache_gib=0)
    # 128-pixel tiles fitted to 200x264 (2 rows of 120, 3 columns of 112), then 64-pixel ones
    assert sizes[0] == (200, 264) and sizes[1] == (120, 112) and set(sizes[2:]) == {(64, 64)}
    assert len(released) == 2 and len(caplog.records) == 2
    assert "64-pixel tiles" in caplog.records[-1].getMessage()
    assert np.array_equal(restored, expected) and qf == expected_qf


def test_out_of_memory_with_the_smallest_tiles_is_raised(model, photo, monkeypatch):
    _oom_above(monkeypatch, model.net, 32 * 32)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        restore(model, photo, tile=128, tile_overlap=32)


# Precision and layout

@pytest.mark.parametrize("precision, max_levels", [("bf16", 3), ("fp16", 1)])
def test_precision_path_is_close_to_fp32(model, photo, faithful, precision, max_levels):
    restored, qf = restore(model, photo, precision=precision)
    diff = _grey_diff(restored, faithful[0])
    assert diff.max() <= max_levels and diff.mean() < 0.5
    assert diff.any()  # autocast really ran in lower precision
    assert abs(qf - faithful[1]) <= 1


def test_precision_bf16_with_tiles_is_close_to_fp32(model, photo, faithful):
    restored, _ = restore(model, photo, precision="bf16", tile=96, tile_overlap=32)
    assert _grey_diff(restored, faithful[0]).max() <= 3


def test_channels_last_matches_the_default_layout(model, photo, faithful):
    net = model.net
    restored, qf = restore(model, photo, channels_last=True)
    assert net.m_head.weight.is_contiguous(memory_format=torch.channels_last)
    diff = _grey_diff(restored, faithful[0])
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3 and qf == faithful[1]
    restored, _ = restore(model, photo)  # back to the default layout, and to its exact output
    assert net.m_head.weight.is_contiguous()
    assert np.array_equal(restored, faithful[0])


def _compiled_frames():
    """Frames torch.compile has compiled so far in this process (a frame whose compilation
    failed and fell back to eager, e.g. under `suppress_errors`, is not counted)."""
    return torch._dynamo.utils.counters["frames"]["ok"]


@pytest.mark.slow
@pytest.mark.parametrize("tile, entry_points", [(None, 1), (64, 3)])
def test_compile_matches_eager(photo, tile, entry_points):
    """Untiled, `forward` is compiled; tiled, `encode`, `qf_features` and `decode` are."""
    model = _model(nc=(4, 4, 4, 4))
    expected, qf = restore(model, photo[:64, :80], tile=tile)
    before = _compiled_frames()
    restored, qf_compiled = restore(model, photo[:64, :80], compile=True, tile=tile)
    assert _compiled_frames() - before >= entry_points  # compiled, not a silent eager fall-back
    assert _grey_diff(restored, expected).max() <= 1 and qf_compiled == qf


@pytest.mark.parametrize("tile", [None, 64])
def test_restore_runs_the_network_without_autograd(photo, tile, monkeypatch):
    """A recorded graph would hold every activation (and every tile's) until the end: the
    memory bounds of tiling rest on this."""
    model = _model()
    seen = []
    for name in ("forward", "encode", "decode"):
        original = getattr(model.net, name)

        def record(*args, _original=original, **kwargs):
            seen.append(torch.is_grad_enabled())
            return _original(*args, **kwargs)
        monkeypatch.setattr(model.net, name, record)
    restore(model, photo[:96, :120], tile=tile)
    assert seen and not any(seen)


def _cudnn_fp32_mode():
    return "tf32" if torch.backends.cudnn.allow_tf32 else "ieee"


@pytest.mark.parametrize("allowed", [True, False])
def test_tf32_switches_read_the_same_through_the_old_and_new_apis(allowed):
    """Inside `tf32_allowed` both of PyTorch's TF32 APIs can be read and agree (reading the old
    one raised on torch 2.14 when only the new one was set, and torch.compile may read it)."""
    with tf32_allowed(allowed):
        assert torch.backends.cudnn.allow_tf32 is allowed
        assert torch.backends.cuda.matmul.allow_tf32 is allowed
        for owner in (getattr(torch.backends.cudnn, "conv", None), torch.backends.cuda.matmul):
            if owner is not None and hasattr(owner, "fp32_precision"):
                assert (owner.fp32_precision == "tf32") is allowed


@pytest.mark.slow
def test_tf32_with_compile_compiles_and_matches_eager_on_the_cpu(photo):
    model = _model(nc=(4, 4, 4, 4))
    expected, qf = restore(model, photo[:64, :80])
    before = _compiled_frames()
    restored, qf_compiled = restore(model, photo[:64, :80], precision="tf32", compile=True)
    assert _compiled_frames() > before
    assert _grey_diff(restored, expected).max() <= 1 and qf_compiled == qf


@pytest.mark.parametrize("precision, during", [("fp32", "ieee"), ("tf32", "tf32")])
def test_fp32_switches_cudnn_tf32_off_for_the_call(photo, precision, during, monkeypatch):
    """PyTorch lets cuDNN run fp32 convolutions in TF32 by default; the faithful path must not."""
    model = _model()
    before = _cudnn_fp32_mode()
    seen = []
    forward = model.net.forward

    def record(*args, **kwargs):
        seen.append(_cudnn_fp32_mode())
        return forward(*args, **kwargs)
    monkeypatch.setattr(model.net, "forward", record)
    restored, qf = restore(model, photo[:64, :80], precision=precision)
    assert seen == [during] and _cudnn_fp32_mode() == before
    expected, expected_qf = restore(_model(), photo[:64, :80])
    assert np.array_equal(restored, expected) and qf == expected_qf  # the same on a CPU


@pytest.mark.parametrize("tile", [None, 96])
def test_predict_qf_is_restores_qf_without_decoding(model, photo, monkeypatch, tile):
    _, expected = restore(model, photo, tile=tile, tile_overlap=32)
    counts = _count_calls(monkeypatch, model.net, "decode", "forward")
    assert predict_qf(model, photo, tile=tile, tile_overlap=32) == expected
    assert counts == {"decode": 0, "forward": 0}
    assert predict_qf(LoadedModel("jpeg", None, None), photo) is None


def test_jpeg_pseudo_model_returns_its_input(photo):
    restored, qf = restore(LoadedModel("jpeg", None, None), photo, precision="bf16", tile=64,
                           x8=True)
    assert restored is photo and qf is None


# The x8 self-ensemble

def _x8_by_hand(net, img, qf_label=None):
    """KAIR's test_x8 written out with NumPy: the image padded to a multiple of 8 (edge
    replication, as the network pads), turned each of the 8 ways, restored, turned back,
    averaged, cropped. One qf for all eight: `qf_label`, else the unturned image's prediction."""
    h, w = img.shape[:2]
    padded = np.pad(img, ((0, -h % 8), (0, -w % 8), (0, 0)), mode="edge")

    def run(arr, qf):
        x = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)[None].float() / 255
        with torch.no_grad():
            restored, predicted = net(x, qf)
        return restored[0].permute(1, 2, 0).numpy(), predicted

    qf = torch.full((1, 1), qf_label) if qf_label is not None else run(padded, None)[1]
    outputs = []
    for turns in range(4):
        for mirror in (False, True):
            turned = np.rot90(padded, turns)
            restored, _ = run(turned[:, ::-1] if mirror else turned, qf)
            outputs.append(np.rot90(restored[:, ::-1] if mirror else restored, -turns))
    mean = np.mean(outputs, axis=0, dtype=np.float64)[:h, :w]
    return np.round(np.clip(mean, 0, 1) * 255).astype(np.uint8), label_to_qf(qf[0, 0])


@pytest.mark.parametrize("qf", [None, 30])
def test_x8_is_the_mean_of_the_eight_transforms_done_by_hand(model, photo, qf):
    img = photo[:61, :75]  # sides that are not multiples of 8: the padding is turned too
    expected, expected_qf = _x8_by_hand(model.net, img, None if qf is None else qf_to_label(qf))
    restored, reported_qf = restore(model, img, qf=qf, x8=True)
    diff = _grey_diff(restored, expected)
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3  # fp32 sums in another order
    plain, plain_qf = restore(model, img, qf=qf)
    assert _grey_diff(plain, expected).max() > 1  # the ensemble is not the plain pass
    assert reported_qf == plain_qf  # the unturned pass's prediction, as without --x8
    if qf is None:
        assert reported_qf == expected_qf


@pytest.mark.parametrize("qf", [None, 30])
def test_x8_feeds_one_qf_to_all_eight_decoders(model, photo, faithful, monkeypatch, qf):
    seen = _record_decodes(monkeypatch, model.net)
    _, reported_qf = restore(model, photo, qf=qf, x8=True)
    assert len(seen) == 8 and all(torch.equal(q, seen[0]) for q in seen)
    expected = faithful[1] if qf is None else qf
    assert label_to_qf(seen[0][0, 0]) == expected and reported_qf == faithful[1]


@pytest.mark.parametrize("transform", [np.rot90, np.fliplr, lambda a: np.rot90(a, 3)[::-1]])
def test_x8_commutes_with_the_transforms_it_averages_over(model, photo, transform):
    """With a given QF and sides that are multiples of 8, restoring a turned image with x8 is
    turning the x8 restoration (the same eight passes, summed in another order)."""
    img = photo[:64, :80]
    turned = np.ascontiguousarray(transform(img))
    expected = np.ascontiguousarray(transform(restore(model, img, qf=30, x8=True)[0]))
    assert _grey_diff(restore(model, turned, qf=30, x8=True)[0], expected).max() <= 1
    assert _grey_diff(restore(model, turned, qf=30)[0], expected).max() > 1  # could fail


def test_x8_with_tiles_is_within_one_grey_level(model, photo, monkeypatch):
    expected, expected_qf = restore(model, photo, x8=True)
    seen = _record_decodes(monkeypatch, model.net)
    restored, qf = restore(model, photo, x8=True, tile=96, tile_overlap=32)
    # 200x264 and 264x200 both make 3 x 4 tiles of 96 pixels; one qf for all of them
    assert len(seen) == 8 * 12 and all(torch.equal(q, seen[0]) for q in seen)
    assert _grey_diff(restored, expected).max() <= 1 and qf == expected_qf


@pytest.mark.parametrize("options, max_levels", [(dict(precision="bf16"), 3),
                                                 (dict(channels_last=True), 1)])
def test_x8_fast_paths_are_close_to_fp32_x8(model, photo, options, max_levels):
    img = photo[:64, :80]
    expected, expected_qf = restore(model, img, x8=True)
    restored, qf = restore(model, img, x8=True, **options)
    assert _grey_diff(restored, expected).max() <= max_levels and abs(qf - expected_qf) <= 1
    restore(model, img)  # back to the default layout for the other tests


# The pipelined runner

def test_pipeline_keeps_order_with_uneven_task_times():
    rng = np.random.default_rng(0)
    delays = rng.uniform(0, 0.01, size=24)
    threads, finished = set(), []

    def prepare(i):
        time.sleep(delays[i])
        threads.add(threading.get_ident())
        return i

    with Pipeline(3) as pipe:
        for i in pipe.map_prepared(prepare, range(24)):
            pipe.finish(lambda k: (time.sleep(delays[-1 - k]), finished.append(k)), i)
    assert finished == list(range(24))
    assert threading.get_ident() not in threads  # prepared on worker threads


def test_pipeline_raises_a_workers_error():
    def fail(i):
        raise OSError(f"disk full at {i}")

    with pytest.raises(OSError, match="disk full at 0"):
        with Pipeline(2) as pipe:
            for i in pipe.map_prepared(lambda i: i, range(5)):
                pipe.finish(fail, i)


@pytest.fixture(scope="module")
def crops(tmp_path_factory, testsets_dir):
    """Six small LIVE1 crops of different sizes: enough for the pipeline to reorder things."""
    folder = tmp_path_factory.mktemp("crops")
    names = sorted(os.listdir(os.path.join(testsets_dir, "LIVE1_color")))[:6]
    for k, name in enumerate(names):
        img = imread_uint(os.path.join(testsets_dir, "LIVE1_color", name), 3)
        imwrite(str(folder / name), img[:40 + 8 * k, :56 + 5 * k])
    return folder


def test_overlapped_runner_equals_serial_runner(tmp_path, crops, capsys):
    path = tmp_path / "tiny.pth"
    torch.save(_model().net.state_dict(), path)
    outputs = {}
    for workers in (0, 3):
        out = tmp_path / f"w{workers}"
        assert main(COLOR, ["--model", str(path), "--testset", str(crops), "--qf", "10", "30",
                            "50", "--workers", str(workers), "--results", str(out),
                            "--json", str(out / "r.json")]) == 0
        (log,) = [f for f in os.listdir(out) if f.endswith(".log")]
        log = (out / log).read_text().splitlines()
        pngs = {os.path.join(d, f): (out / d / f).read_bytes()
                for d in sorted(os.listdir(out)) if (out / d).is_dir()
                for f in sorted(os.listdir(out / d))}
        outputs[workers] = (json.loads((out / "r.json").read_text()),
                            [line.split(" ", 3)[3] for line in log[1:-1]],  # drop timestamps
                            pngs, capsys.readouterr().out.splitlines()[1:-1])
    serial, overlapped = outputs[0], outputs[3]
    # per setting: the line that opens its block, six images, the average
    assert len(serial[0]) == 3 and len(serial[1]) == 3 * 8 and len(serial[2]) == 18
    assert serial[0] == overlapped[0]  # JSON summaries
    assert serial[1] == overlapped[1]  # per-image and average log lines, in order
    assert serial[2] == overlapped[2]  # PNG files, byte for byte
    assert serial[3] == overlapped[3]  # console lines


@pytest.mark.gpu
@pytest.mark.parametrize("precision, max_levels", [("fp32", 1), ("tf32", 3), ("bf16", 3),
                                                   ("fp16", 1)])
def test_cuda_precisions_are_close_to_the_cpu_fp32_reference(photo, faithful, precision,
                                                             max_levels):
    """On CUDA: fp32 (TF32 off) within a grey level of the CPU's fp32 (other convolution
    algorithms), each fast path within the issue's bounds, and fp32 itself repeatable."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    model = _model()
    model.net.cuda()
    restored, qf = restore(model, photo, device="cuda", precision=precision)
    diff = _grey_diff(restored, faithful[0])
    assert diff.max() <= max_levels and abs(qf - faithful[1]) <= 1
    if precision == "fp32":
        assert np.array_equal(restore(model, photo, device="cuda")[0], restored)


@pytest.mark.gpu
def test_cuda_out_of_memory_really_falls_back_to_tiles(photo, caplog):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    model = _model(nc=(64, 128, 256, 512), nb=4)
    model.net.cuda()
    big = np.tile(photo, (8, 8, 1))  # 1600x2112: about 5 GiB untiled in fp32
    expected, _ = restore(model, big, device="cuda")
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(2.5 * 2 ** 30 / torch.cuda.mem_get_info()[1])
    try:
        with caplog.at_level(logging.WARNING, logger="fbcnn.models.inference"):
            restored, _ = restore(model, big, device="cuda")
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    assert "out of memory" in caplog.text
    assert _grey_diff(restored, expected).max() <= 1


def test_resolve_device_follows_cuda_availability(monkeypatch):
    from models.inference import resolve_device
    from utils.errors import UserError
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu" and resolve_device("cpu") == "cpu"
    with pytest.raises(UserError, match="--device cuda"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == "cuda"


def test_bit_depth_16_is_the_same_output_at_65535_levels(model, photo, faithful):
    """The 16-bit output rounds to the 8-bit one within a level (both round the same float
    output) and keeps what lies between levels; the jpeg pseudo-model scales by 257."""
    sixteen, qf = restore(model, photo, bit_depth=16)
    assert sixteen.dtype == np.uint16 and qf == faithful[1]
    assert np.abs(np.rint(sixteen / 257.0) - faithful[0]).max() <= 1
    inside = sixteen[(sixteen > 0) & (sixteen < 65535)]  # the untrained network clips many
    assert inside.size > 1000 and (inside % 257 != 0).mean() > 0.9
    identity = LoadedModel("jpeg", None, None)
    np.testing.assert_array_equal(restore(identity, photo, bit_depth=16)[0],
                                  photo.astype(np.uint16) * 257)
    with pytest.raises(ValueError, match="bit_depth 12"):
        restore(model, photo, bit_depth=12)


def test_a_batch_restores_each_image_as_restore_does_with_its_own_qf(model, photo):
    """Four crops in one forward pass: each image's output and predicted QF as `restore` gives
    them alone, blind (each decoder conditioned on its own prediction) and with a QF per image;
    the batched convolutions sum in another order, so outputs may differ by one grey level."""
    crops = [np.ascontiguousarray(photo[8 * k:8 * k + 96, 16 * k:16 * k + 128]) for k in range(4)]
    for qfs in (None, [10, 30, 50, 90]):
        batch = restore_batch(model, crops, qfs)
        alone = [restore(model, img, qf=None if qfs is None else qfs[k])
                 for k, img in enumerate(crops)]
        assert [qf for _, qf in batch] == [qf for _, qf in alone]
        assert max(_grey_diff(b, a).max() for (b, _), (a, _) in zip(batch, alone)) <= 1
    fed = restore_batch(model, crops, [10, 30, 50, 90])
    assert not np.array_equal(fed[0][0], restore(model, crops[0], qf=90)[0])  # its own QF
    with pytest.raises(ValueError, match="differ in size"):
        restore_batch(model, [crops[0], photo])
