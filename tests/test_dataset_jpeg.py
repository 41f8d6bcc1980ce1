"""Tests of data/dataset_jpeg.py, runners/prepare_subimages.py and the sampling in data/jpeg.py."""
import dataclasses
import math

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from data import dataset_jpeg
from data.dataset_jpeg import (DATASET_PRESETS, DatasetJPEG, Degradation, IterationBatchSampler,
                               SampleKey, define_dataset, rgb_to_training_gray)
from data.jpeg import (SAMPLINGS, augment_img, jpeg, qf_to_label, random_crop, random_offset,
                       sample_qf)
from runners import prepare_subimages
from utils.errors import UserError
from utils.image import imread_uint, rgb2y_matlab

P = 16


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    """Four smooth random colour PNGs of 40x48 pixels."""
    folder = tmp_path_factory.mktemp("clean")
    rng = np.random.default_rng(7)
    for i in range(4):
        img = cv2.GaussianBlur((rng.random((40, 48, 3)) * 255).astype(np.uint8), (5, 5), 1.5)
        cv2.imwrite(str(folder / f"img{i}.png"), img)
    return folder


def _dataset(image_dir, name, **kwargs):
    return DatasetJPEG(str(image_dir), DATASET_PRESETS[name], patch_size=P, seed=3, **kwargs)


def _labels(dataset, n, double=False):
    return [float(dataset[SampleKey(i % len(dataset), i, double)]["qf"]) for i in range(n)]


def test_presets_follow_spec_section_2():
    color, gray, gray2, color2 = (DATASET_PRESETS[n] for n in
                                  ("jpeg", "jpeggray", "jpeggraydouble", "jpegdouble"))
    assert ((color.gray, color.qf_range, color.qf_choices, color.double_prob) ==
            (False, (8, 96), (10, 20, 30, 40, 50, 60), 0.0))
    assert ((gray.gray, gray.qf_range, gray.qf_choices, gray.double_prob) ==
            (True, (5, 95), (10, 20, 30, 40, 50, 60), 0.0))
    assert ((gray2.gray, gray2.qf_range, gray2.qf_choices, gray2.double_prob) ==
            (True, (5, 95), (10, 20, 30, 40, 50, 60, 70), 0.5))
    assert ((gray2.double_qf_range, gray2.double_qf_choices, gray2.double_qf_uniform_prob) ==
            ((5, 95), (10, 20, 30, 40, 50, 60, 70), 0.5))
    assert color2 == Degradation(**{**gray2.__dict__, "gray": False})
    for d in (color, gray, gray2, color2):
        assert (d.qf_uniform_prob, d.y_prob, d.shift_prob, d.max_shift) == (0.25, 0.75, 0.5, 8)


def test_sample_qf_mixes_uniform_and_choices():
    rng = np.random.default_rng(0)
    qfs = np.array([sample_qf(rng, (8, 96), (10, 20, 30, 40, 50, 60), 0.25) for _ in range(20000)])
    assert qfs.min() >= 8 and qfs.max() <= 96 and {8, 96} <= set(qfs.tolist())
    off_choice = np.mean(~np.isin(qfs, [10, 20, 30, 40, 50, 60]))
    assert abs(off_choice - 0.25 * (1 - 6 / 89)) < 0.015


def test_training_gray_is_matlab_y_three_times_in_four():
    img = np.random.default_rng(1).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    y, cv_gray = rgb2y_matlab(img), cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    assert not np.array_equal(y, cv_gray)
    rng = np.random.default_rng(2)
    outs = [rgb_to_training_gray(img, rng) for _ in range(4000)]
    assert all(np.array_equal(o, y) or np.array_equal(o, cv_gray) for o in outs)
    assert abs(np.mean([np.array_equal(o, y) for o in outs]) - 0.75) < 0.03


@pytest.mark.parametrize("name,double,largest", [("jpeg", False, 8), ("jpeggray", False, 8),
                                                  ("jpeggraydouble", False, 16),
                                                  ("jpeggraydouble", True, 8),
                                                  ("jpegdouble", False, 16),
                                                  ("jpegdouble", True, 8)])
def test_final_crop_offset_spans_the_patch_at_hand(image_dir, monkeypatch, name, double, largest):
    """The P x P crop's offset is uniform in [0, side - P]: single-JPEG samples of the double
    types keep their P+16 patch until then ([0, 16]), double-JPEG ones are P+8 ([0, 8])."""
    calls, crop = [], dataset_jpeg.crop

    def recording_crop(img, top, left, size):
        calls.append((img.shape[0], top, left, size))
        return crop(img, top, left, size)

    monkeypatch.setattr(dataset_jpeg, "crop", recording_crop)
    dataset = _dataset(image_dir, name)
    offsets = []
    for i in range(600):
        calls.clear()
        item = dataset[SampleKey(i % len(dataset), i, double)]
        assert item["L"].shape[-1] == P
        side, top, left, size = calls[-1]  # the final crop (of H; L's is the same)
        assert size == P and side - P == largest
        offsets += [top, left]
    counts = np.bincount(offsets, minlength=largest + 1)
    assert len(counts) == largest + 1  # nothing beyond the patch
    # offset 0 also comes from the unshifted half: the other values each about 1/4 / (largest+1)
    assert min(counts[1:]) > 0.5 * len(offsets) * 0.5 / (largest + 1)


def test_augment_modes_are_the_eight_symmetries():
    img = np.arange(12, dtype=np.uint8).reshape(3, 4)
    outs = [augment_img(img, m) for m in range(8)]
    assert np.array_equal(outs[0], img) and np.array_equal(outs[2], img[::-1])
    assert len({o.tobytes() + bytes(o.shape) for o in outs}) == 8
    assert all(o.flags["C_CONTIGUOUS"] for o in outs)


@pytest.mark.parametrize("name,channels", [("jpeg", 3), ("jpeggray", 1), ("jpeggraydouble", 1),
                                           ("jpegdouble", 3)])
def test_training_items_shapes_labels_and_determinism(image_dir, name, channels):
    ds = _dataset(image_dir, name)
    item = ds[SampleKey(1, 5, False)]
    assert item["L"].shape == item["H"].shape == (channels, P, P)
    assert item["L"].dtype == item["H"].dtype == torch.uint8
    assert not torch.equal(item["L"], item["H"])
    again = ds[SampleKey(1, 5, False)]
    assert torch.equal(again["L"], item["L"]) and torch.equal(again["H"], item["H"])
    assert not torch.equal(ds[SampleKey(1, 6, False)]["H"], item["H"])
    lo, hi = DATASET_PRESETS[name].qf_range
    qfs = [round(100 - 100 * label) for label in _labels(ds, 60)]
    assert all(lo <= q <= hi for q in qfs)


def test_double_samples_have_nan_labels_and_a_second_jpeg(image_dir):
    ds = _dataset(image_dir, "jpeggraydouble")
    single, double = ds[SampleKey(0, 9, False)], ds[SampleKey(0, 9, True)]
    assert math.isnan(float(double["qf"])) and not math.isnan(float(single["qf"]))
    assert double["L"].shape == single["L"].shape == (1, P, P)
    assert not torch.equal(double["L"], single["L"])
    assert all(math.isnan(v) for v in _labels(ds, 10, double=True))


def test_patch_is_jpeg_of_its_clean_patch(image_dir):
    """Gray, aligned, fixed QF: L must be exactly data.jpeg.jpeg(H) (8x8 blocks are independent)."""
    fixed = Degradation(gray=True, qf_range=(30, 30), qf_choices=(30,), shift_prob=0.0)
    ds = DatasetJPEG(str(image_dir), fixed, patch_size=P, seed=0)
    for position in range(6):
        item = ds[SampleKey(position % 4, position, False)]
        H = item["H"][0].numpy()
        assert np.array_equal(item["L"][0].numpy(), jpeg(H, 30))
        assert float(item["qf"]) == pytest.approx(qf_to_label(30))


def test_double_patch_is_the_second_jpeg_of_the_first(image_dir):
    """Gray, aligned, fixed QFs: a double sample's L is exactly jpeg(jpeg(H, 30), 10), not the
    single JPEG of H; the single sample at the same position stays jpeg(H, 30)."""
    fixed = Degradation(gray=True, qf_range=(30, 30), qf_choices=(30,), double_prob=1.0,
                        double_qf_range=(10, 10), double_qf_choices=(10,), shift_prob=0.0,
                        max_shift=0)
    ds = DatasetJPEG(str(image_dir), fixed, patch_size=P, seed=0)
    for position in range(4):
        double = ds[SampleKey(position, position, True)]
        H = double["H"][0].numpy()
        L = double["L"][0].numpy()
        assert np.array_equal(L, jpeg(jpeg(H, 30), 10))
        assert not np.array_equal(L, jpeg(H, 30))
        assert math.isnan(float(double["qf"]))


def _dihedral_colour_image(side):
    """A colour image every flip and rotation leaves unchanged (each channel a symmetric
    function of the distances to the centre), so the preset's random augmentation cannot
    change it; the three channels differ."""
    d = np.abs(np.arange(side) - (side - 1) / 2) - 0.5
    u, w = np.meshgrid(d, d, indexing="ij")
    channels = [128 + 100 * np.sin(0.7 * (u + w) + k) * np.cos(0.3 * u * w) for k in range(3)]
    return np.clip(np.stack(channels, axis=2), 0, 255).round().astype(np.uint8)


def test_colour_double_jpeg_samples_are_the_second_jpeg_of_the_first(tmp_path):
    """jpegdouble's double branch: an RGB P x P patch, label NaN, and L exactly
    jpeg(crop(jpeg(H, QF1)), QF2); the single-JPEG sample of the same draw is jpeg(H, QF1)."""
    img = _dihedral_colour_image(P + 16)  # the crop of a double type: the whole image
    assert all(np.array_equal(augment_img(img, m), img) for m in range(8))
    cv2.imwrite(str(tmp_path / "sym.png"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    preset = DATASET_PRESETS["jpegdouble"]
    assert not preset.gray and preset.double_prob == 0.5
    fixed = dataclasses.replace(preset, qf_range=(30, 30), qf_choices=(30,),
                                double_qf_range=(10, 10), double_qf_choices=(10,),
                                shift_prob=0.0, max_shift=0)
    ds = DatasetJPEG(str(tmp_path), fixed, patch_size=P, seed=0)
    first = jpeg(img, 30)
    for position in range(3):
        double, single = ds[SampleKey(0, position, True)], ds[SampleKey(0, position, False)]
        assert double["L"].shape == double["H"].shape == (3, P, P)
        assert math.isnan(float(double["qf"])) and float(single["qf"]) == pytest.approx(0.7)
        H, L = (double[k].permute(1, 2, 0).numpy() for k in ("H", "L"))
        assert np.array_equal(H, img[:P, :P]) and not np.array_equal(H[..., 0], H[..., 1])
        assert np.array_equal(L, jpeg(np.ascontiguousarray(first[:P + 8, :P + 8]), 10)[:P, :P])
        assert np.array_equal(single["L"].permute(1, 2, 0).numpy(), first[:P, :P])
        assert not np.array_equal(L, first[:P, :P])  # the second compression is there
    real = DatasetJPEG(str(tmp_path), preset, patch_size=P, seed=0)
    for position in range(8):
        item = real[SampleKey(0, position, True)]
        assert item["L"].shape == (3, P, P) and math.isnan(float(item["qf"]))


def test_test_phase_follows_the_net_channels(image_dir):
    for channels in (1, 3):
        ds = define_dataset({"dataset_type": "jpeg", "dataroot_H": str(image_dir), "qf": 20},
                            "test", n_channels=channels)
        item = ds[2]
        H = imread_uint(ds.paths_H[2], channels)
        assert item["H"].shape == (channels, 40, 48)
        got_H = item["H"].permute(1, 2, 0).numpy().squeeze()
        assert np.array_equal(got_H, H)
        assert np.array_equal(item["L"].permute(1, 2, 0).numpy().squeeze(), jpeg(H, 20))
        assert float(item["qf"]) == pytest.approx(0.8)


def test_memory_cache_gives_the_same_items(image_dir):
    disk, cached = _dataset(image_dir, "jpeg"), _dataset(image_dir, "jpeg", cache="memory")
    assert cached.images is not None and len(cached.images) == 4
    for key in (SampleKey(0, 0, False), SampleKey(3, 17, False)):
        assert torch.equal(disk[key]["L"], cached[key]["L"])


def test_qf_uniform_prob_option_changes_the_share_of_uniform_draws(image_dir):
    """datasets.train.qf_uniform_prob replaces the preset's 0.25: at 1 no QF comes from the
    decades alone, so QFs off the decades appear about 80/89 of the time (jpeg: 8..96)."""
    entry = {"dataset_type": "jpeg", "dataroot_H": str(image_dir), "H_size": P, "cache": "none"}
    off_decades = {}
    for prob in (None, 1.0):
        dataset = define_dataset({**entry, "qf_uniform_prob": prob}, "train", 3, seed=5)
        assert dataset.degradation.qf_uniform_prob == (0.25 if prob is None else prob)
        qfs = [round(100 - 100 * label) for label in _labels(dataset, 400)]
        off_decades[prob] = np.mean([q % 10 != 0 or q > 60 for q in qfs])
    assert off_decades[None] == pytest.approx(0.25 * 80 / 89, abs=0.06)
    assert off_decades[1.0] == pytest.approx(80 / 89, abs=0.06)
    test_set = define_dataset({"dataset_type": "jpeg", "dataroot_H": str(image_dir), "qf": 10},
                              "test", 3)
    assert test_set.degradation is DATASET_PRESETS["jpeg"]  # a training option only


def test_whole_range_options_reach_qf_100_identity_and_the_double_share(image_dir):
    """qf_range, identity_prob and double_prob replace the preset's values; identity samples
    are the clean patch itself with the label of QF 100, and only single-JPEG samples are."""
    entry = {"dataset_type": "jpegdouble", "dataroot_H": str(image_dir), "H_size": P,
             "cache": "none", "qf_uniform_prob": 1.0, "qf_range": [96, 100],
             "identity_prob": 0.3, "double_prob": 0.2}
    dataset = define_dataset(entry, "train", 3, seed=5)
    deg = dataset.degradation
    assert (deg.qf_range, deg.identity_prob, deg.double_prob) == ((96, 100), 0.3, 0.2)
    items = [dataset[SampleKey(i % 4, i, False)] for i in range(300)]
    identity = [it for it in items if torch.equal(it["L"], it["H"])]
    assert len(identity) / len(items) == pytest.approx(0.3, abs=0.08)
    assert all(float(it["qf"]) == 0.0 for it in identity)
    qfs = {round(100 - 100 * float(it["qf"])) for it in items}
    assert qfs == {96, 97, 98, 99, 100}  # every QF of the range, 100 included (JPEG or identity)
    # double-JPEG samples are never left uncompressed
    doubles = [dataset[SampleKey(i % 4, i, True)] for i in range(60)]
    assert not any(torch.equal(it["L"], it["H"]) for it in doubles)
    # left at null, the options keep the preset (the original's values)
    plain = define_dataset({**entry, "qf_uniform_prob": None, "qf_range": None,
                            "identity_prob": None, "double_prob": None}, "train", 3, seed=5)
    assert plain.degradation == DATASET_PRESETS["jpegdouble"]


def test_unknown_dataset_type_and_small_images(image_dir):
    with pytest.raises(UserError, match="'jpg' is unknown; known: jpeg, jpeggray"):
        define_dataset({"dataset_type": "jpg", "dataroot_H": str(image_dir)}, "train", 3)
    with pytest.raises(UserError, match=r"img0\.png: 40x48 pixels is smaller than the 48x48 "
                                        r"crop that H_size 32 needs \(3 more of the 4 files"):
        DatasetJPEG(str(image_dir), DATASET_PRESETS["jpegdouble"], patch_size=32)


def test_sampler_is_resumable_and_splits_ranks():
    full = IterationBatchSampler(10, 4, seed=5, double_prob=0.5)
    resumed = IterationBatchSampler(10, 4, seed=5, double_prob=0.5, start_iter=7)
    it_full, it_resumed = iter(full), iter(resumed)
    batches = [next(it_full) for _ in range(9)]
    assert [next(it_resumed) for _ in range(3)] == batches[6:9]
    ranks = [IterationBatchSampler(10, 4, rank=r, world_size=2, seed=5, double_prob=0.5)
             for r in (0, 1)]
    for t in range(1, 10):
        assert ranks[0].batch(t) + ranks[1].batch(t) == full.batch(t)
    epoch0 = [k.index for t in (1, 2) for k in full.batch(t)] + [full.batch(3)[0].index,
                                                                 full.batch(3)[1].index]
    assert sorted(epoch0) == list(range(10)) and epoch0 != list(range(10))
    doubles = [full.is_double(t) for t in range(1, 401)]
    assert 0.4 < np.mean(doubles) < 0.6
    assert all(len({k.double for k in full.batch(t)}) == 1 for t in range(1, 20))
    assert not any(IterationBatchSampler(10, 4, double_prob=0.0).is_double(t) for t in range(50))


def test_loader_workers_do_not_change_the_batches(image_dir):
    ds = _dataset(image_dir, "jpeggraydouble")
    outs = []
    for workers in (0, 2):
        sampler = IterationBatchSampler(len(ds), 4, seed=1, double_prob=0.5)
        loader = iter(DataLoader(ds, batch_sampler=sampler, num_workers=workers))
        outs.append([next(loader) for _ in range(3)])
    for a, b in zip(*outs):
        assert torch.equal(a["L"], b["L"]) and torch.equal(a["H"], b["H"])
        assert torch.equal(torch.nan_to_num(a["qf"], 9.0), torch.nan_to_num(b["qf"], 9.0))


@pytest.mark.parametrize("max_offset", [1, 8, 16])
def test_random_offsets_cover_zero_to_the_maximum_on_both_axes(max_offset):
    """Rows and columns each take every offset in [0, max_offset], 0 included (the crop may
    start at the patch's first row and column), and nothing beyond."""
    rng = np.random.default_rng(0)
    draws = np.array([random_offset(rng, max_offset) for _ in range(200 * (max_offset + 1))])
    for axis in (0, 1):
        assert sorted(set(draws[:, axis].tolist())) == list(range(max_offset + 1))
    assert random_offset(rng, 0) == (0, 0)


def test_random_crop_stays_inside():
    img = np.arange(20 * 30).reshape(20, 30)
    rng = np.random.default_rng(0)
    corners = {tuple(np.argwhere(img == random_crop(img, 8, rng)[0, 0])[0]) for _ in range(500)}
    assert max(c[0] for c in corners) == 12 and max(c[1] for c in corners) == 22
    assert min(c[0] for c in corners) == 0 and min(c[1] for c in corners) == 0


def test_prepare_subimages_cuts_and_skips_existing(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    img = np.random.default_rng(0).integers(0, 256, (100, 130, 3), dtype=np.uint8)
    cv2.imwrite(str(src / "a.png"), img)
    assert prepare_subimages.window_starts(130, 48, 24, 5) == [0, 24, 48, 72, 82]
    assert prepare_subimages.window_starts(130, 48, 24, 10) == [0, 24, 48, 72]
    assert prepare_subimages.window_starts(100, 48, 24, 5) == [0, 24, 48]
    assert prepare_subimages.window_starts(40, 48, 24, 5) == [0]
    assert prepare_subimages.main([str(src), str(dst), "--size", "48", "--step", "24",
                                   "--thresh", "5", "--workers", "1"]) == 0
    outs = sorted(p.name for p in dst.iterdir())
    assert len(outs) == 16 and outs[:2] == [".prepare.json", "a_s000_000.png"]
    sub = cv2.imread(str(dst / "a_s002_004.png"))
    assert np.array_equal(sub, img[48:96, 82:130])
    assert prepare_subimages.prepare(str(src), str(dst), 48, 24, 5, workers=1,
                                     progress=False) == (1, 0, 15)
    # a restart with all windows present does not decode the image (its pixels are not needed)
    src_bytes = (src / "a.png").read_bytes()
    (src / "a.png").write_bytes(src_bytes[:-12])  # drop IEND: decoding would now fail
    assert prepare_subimages.prepare(str(src), str(dst), 48, 24, 5, workers=1,
                                     progress=False) == (1, 0, 15)


def test_prepare_subimages_restarts_only_with_the_same_settings(tmp_path, capsys):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    cv2.imwrite(str(src / "a.png"), np.zeros((100, 130, 3), np.uint8))
    assert prepare_subimages.prepare(str(src), str(dst), 48, 24, 5, workers=1,
                                     progress=False) == (1, 15, 0)
    assert prepare_subimages.main([str(src), str(dst), "--size", "32", "--step", "24",
                                   "--thresh", "5", "--workers", "1"]) == 2
    assert "holds sub-images cut with --size 48, --step 24, --thresh 5" in capsys.readouterr().err
    assert len(list(dst.glob("*.png"))) == 15  # nothing of the other size was added


def test_prepare_subimages_does_not_read_its_output_inside_the_input(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    cv2.imwrite(str(src / "a.png"), np.zeros((100, 130, 3), np.uint8))
    for _ in range(2):  # a restart reads a.png only, not its own sub-images
        assert prepare_subimages.prepare(str(src), str(src / "sub"), 48, 24, 5, workers=1,
                                         progress=False)[0] == 1
    assert len(list((src / "sub").glob("*.png"))) == 15
    assert prepare_subimages.main([str(src), str(src), "--workers", "1"]) == 2
    assert "the output folder is the input folder" in capsys.readouterr().err


def test_prepare_subimages_refuses_two_images_with_one_stem(tmp_path, capsys):
    src = tmp_path / "src"
    for sub in ("x", "y"):
        (src / sub).mkdir(parents=True)
        cv2.imwrite(str(src / sub / "0001.png"), np.zeros((60, 60, 3), np.uint8))
    assert prepare_subimages.main([str(src), str(tmp_path / "dst"), "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "would both be cut into 0001_s*.png" in err
    assert not (tmp_path / "dst").exists()


def test_samplings_are_drawn_per_jpeg_and_leave_the_presets_streams_alone(tmp_path):
    """With `samplings`, each colour JPEG of a sample is made at one of them, each drawn; left
    empty (every preset), the samples are OpenCV's 4:2:0 ones, as before."""
    img = _dihedral_colour_image(P + 8)  # the crop of a single type: the whole image
    cv2.imwrite(str(tmp_path / "sym.png"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    fixed = dataclasses.replace(DATASET_PRESETS["jpeg"], qf_range=(30, 30), qf_choices=(30,),
                                shift_prob=0.0)
    expected = {s: jpeg(img, 30, s)[:P, :P] for s in SAMPLINGS}
    assert not np.array_equal(expected["444"], expected["420"])
    mixed = DatasetJPEG(str(tmp_path), dataclasses.replace(fixed, samplings=tuple(SAMPLINGS)),
                        patch_size=P, seed=0)
    seen = []
    for position in range(30):
        L = mixed[SampleKey(0, position, False)]["L"].permute(1, 2, 0).numpy()
        seen += [s for s, e in expected.items() if np.array_equal(L, e)]
    assert len(seen) == 30 and set(seen) == set(SAMPLINGS)
    plain = DatasetJPEG(str(tmp_path), fixed, patch_size=P, seed=0)
    for position in range(5):
        L = plain[SampleKey(0, position, False)]["L"].permute(1, 2, 0).numpy()
        assert np.array_equal(L, jpeg(img, 30)[:P, :P])
    entry = {"dataset_type": "jpeg", "dataroot_H": str(tmp_path), "H_size": P, "cache": "none",
             "samplings": ["444", "420"]}
    assert define_dataset(entry, "train", 3).degradation.samplings == ("444", "420")


def test_scale_range_shrinks_a_larger_window_to_the_crop_by_area(tmp_path):
    """Columns alternating 0 and 255: any crop keeps both, a window twice the crop shrunk by
    area averaging to it is flat mid-gray (each output pixel averages two of each); a window the
    image cannot hold is capped at the image."""
    crop = P + 8  # a single type's crop
    stripes = np.zeros((2 * crop + 6, 2 * crop + 6, 3), np.uint8)
    stripes[:, 1::2] = 255
    cv2.imwrite(str(tmp_path / "stripes.png"), stripes)
    base = dataclasses.replace(DATASET_PRESETS["jpeg"], shift_prob=0.0)
    plain = DatasetJPEG(str(tmp_path), base, patch_size=P, seed=0)
    halved = DatasetJPEG(str(tmp_path), dataclasses.replace(base, scale_range=(0.5, 0.5)),
                         patch_size=P, seed=0)
    for position in range(4):
        H = plain[SampleKey(0, position, False)]["H"]
        assert {int(H.min()), int(H.max())} == {0, 255}
        H = halved[SampleKey(0, position, False)]["H"]
        assert H.shape == (3, P, P) and 127 <= int(H.min()) <= int(H.max()) <= 128
    small = tmp_path / "small"
    small.mkdir()
    cv2.imwrite(str(small / "s.png"), stripes[:crop + 2, :crop + 2])
    capped = DatasetJPEG(str(small), dataclasses.replace(base, scale_range=(0.5, 0.5)),
                         patch_size=P, seed=0)
    assert capped[SampleKey(0, 0, False)]["H"].shape == (3, P, P)
    entry = {"dataset_type": "jpeg", "dataroot_H": str(tmp_path), "H_size": P, "cache": "none",
             "scale_range": [0.5, 1.0]}
    assert define_dataset(entry, "train", 3).degradation.scale_range == (0.5, 1.0)


def test_graphics_prob_replaces_that_share_of_clean_patches_and_draws_nothing_at_zero(image_dir):
    """With `graphics_prob` 1 every clean patch is a graphic and its input the JPEG of it; at 0
    (every preset) the samples are the preset's, bit for bit."""
    fixed = dataclasses.replace(DATASET_PRESETS["jpeg"], qf_range=(40, 40), qf_choices=(40,),
                                shift_prob=0.0)
    plain = DatasetJPEG(str(image_dir), fixed, patch_size=P, seed=0)
    zero = DatasetJPEG(str(image_dir), dataclasses.replace(fixed, graphics_prob=0.0),
                       patch_size=P, seed=0)
    every = DatasetJPEG(str(image_dir), dataclasses.replace(fixed, graphics_prob=1.0),
                        patch_size=P, seed=0)
    few_levels = 0
    for position in range(12):
        key = SampleKey(position % 4, position, False)
        a, b, g = plain[key], zero[key], every[key]
        assert torch.equal(a["L"], b["L"]) and torch.equal(a["H"], b["H"])
        assert not torch.equal(a["H"], g["H"])
        H = g["H"].permute(1, 2, 0).numpy()
        few_levels += len(np.unique(H.reshape(-1, 3), axis=0)) <= 27
        assert float(g["qf"]) == pytest.approx(qf_to_label(40))
    assert few_levels >= 6  # the smooth photos have hundreds of colours; most graphics few
    entry = {"dataset_type": "jpeg", "dataroot_H": str(image_dir), "H_size": P, "cache": "none",
             "graphics_prob": 0.1}
    assert define_dataset(entry, "train", 3).degradation.graphics_prob == 0.1
