"""main_restore.py / runners/restore.py: inputs, routing, QF modes, outputs and metadata."""
import hashlib
import json
import os
import re
import struct
import subprocess
import sys
import zlib

import cv2
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import runners.restore as cli
from models import consistency
from data.jpeg import jpeg, jpeg_decode, jpeg_encode, shift_crop
from models.engines import fastest_options, openvino_available
from models.inference import restore
from models import model_zoo
from models.model_zoo import MODEL_ZOO, ZooEntry, load_model
from models.network_fbcnn import FBCNN
from tests.conftest import calibrated_projection
from utils import REPO_ROOT, fileio
from utils.checkpoint import save_network
from utils.image import imread_uint
from utils.image_meta import apply_orientation, read_icc_profile
from utils.metrics import psnr

TINY = dict(nc=[8, 16, 32, 64], nb=1)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """Paths of a tiny colour and a tiny gray FBCNN, saved as safetensors."""
    folder = tmp_path_factory.mktemp("models")
    paths = {}
    for name, n in (("color", 3), ("gray", 1)):
        torch.manual_seed(n)
        net = FBCNN(in_nc=n, out_nc=n, **TINY)
        paths[name] = str(folder / f"tiny_{name}.safetensors")
        save_file(net.state_dict(), paths[name])
    return paths


@pytest.fixture(scope="module")
def photo():
    """A 48x40 colour image with some texture, RGB uint8."""
    rng = np.random.default_rng(1)
    base = cv2.resize(rng.integers(0, 256, (6, 5, 3), dtype=np.uint8), (40, 48),
                      interpolation=cv2.INTER_CUBIC)
    return np.clip(base.astype(int) + rng.integers(-15, 16, base.shape), 0, 255).astype(np.uint8)


def write_jpeg(path, img, qf=50, segments=b""):
    """Write `img` (RGB or gray) as an OpenCV JPEG, with `segments` inserted after SOI."""
    data = jpeg_encode(img, qf)
    path.write_bytes(data[:2] + segments + data[2:])
    return path


def exif_segment(orientation):
    tiff = (b"MM\x00\x2a" + struct.pack(">I", 8) + struct.pack(">H", 1)
            + struct.pack(">HHIHH", 0x0112, 3, 1, orientation, 0) + struct.pack(">I", 0))
    payload = b"Exif\x00\x00" + tiff
    return b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload


def icc_profile(colour_space=b"RGB "):
    """A minimal, well-formed ICC header (132 bytes, no tags) that libpng accepts."""
    header = bytearray(128)
    struct.pack_into(">I", header, 0, 132)
    header[8:12] = b"\x02\x10\x00\x00"
    header[12:16] = b"mntr"
    header[16:20] = colour_space
    header[20:24] = b"XYZ "
    header[36:40] = b"acsp"
    struct.pack_into(">iii", header, 68, 63190, 65536, 54061)  # D50
    return bytes(header) + struct.pack(">I", 0)


def icc_segment(profile):
    payload = b"ICC_PROFILE\x00\x01\x01" + profile
    return b"\xff\xe2" + struct.pack(">H", len(payload) + 2) + payload


def png_iccp(path):
    """The decompressed iCCP profile of a PNG file, read independently of utils/image_meta."""
    data, pos = path.read_bytes(), 8
    while pos < len(data):
        length, kind = struct.unpack_from(">I4s", data, pos)
        if kind == b"iCCP":
            payload = data[pos + 8:pos + 8 + length]
            return zlib.decompress(payload[payload.index(b"\x00") + 2:])
        pos += 12 + length
    return None


def run(argv, capsys):
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def restored_and_projected(model, data, n_channels, **kwargs):
    """What main_restore writes for JPEG bytes by default: the network's restoration of the
    decoded file, projected onto the file's quantization intervals (calibrated on a twin by
    the same network and options), with main_restore's engine and layout."""
    kwargs = fastest_options(kwargs, "cpu")
    restored, _ = restore(model, jpeg_decode(data, n_channels), **kwargs)
    return calibrated_projection(restored, data, lambda x: restore(model, x, **kwargs)[0])


def read_rgb(path):
    return cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


IDENTITY = ["--model", "jpeg", "--gray-model", "jpeg"]


def test_files_folders_globs_and_recursive(tmp_path, photo, capsys):
    src = tmp_path / "in"
    (src / "sub" / "deeper").mkdir(parents=True)
    write_jpeg(src / "a.jpg", photo)
    write_jpeg(src / "sub" / "b.jpg", photo[::-1])
    write_jpeg(src / "sub" / "deeper" / "c.jpeg", photo[:, ::-1])
    (src / "notes.txt").write_text("not an image")
    out = tmp_path / "out"

    code, _, _ = run([str(src), "-o", str(out / "flat"), *IDENTITY], capsys)
    assert code == 0 and sorted(os.listdir(out / "flat")) == ["a.png"]

    code, _, _ = run([str(src), "-r", "-o", str(out / "tree"), *IDENTITY], capsys)
    assert code == 0
    assert (out / "tree" / "sub" / "deeper" / "c.png").is_file()
    restored = read_rgb(out / "tree" / "sub" / "b.png")
    np.testing.assert_array_equal(restored, jpeg_decode(jpeg_encode(photo[::-1], 50), 3))

    code, _, _ = run([str(src / "**" / "*.jp*g"), "-r", "-o", str(out / "glob"), *IDENTITY], capsys)
    assert code == 0 and sorted(os.listdir(out / "glob")) == ["a.png", "b.png", "c.png"]

    code, _, err = run([str(src / "*.bmp"), "-o", str(out / "none"), *IDENTITY], capsys)
    assert code == 1 and "no image files match" in err
    assert not (out / "none").exists()  # nothing to write: no output folder either
    code, _, err = run([str(src / "missing.jpg"), "-o", str(out / "none"), *IDENTITY], capsys)
    assert code == 1 and "no such file or folder" in err and not (out / "none").exists()


def test_a_rerun_clears_only_what_a_killed_run_left(tmp_path, photo, capsys):
    """The output folder's own files (dotfiles, notes, other images) survive a rerun; only
    atomic_write's temporaries of a killed run go."""
    write_jpeg(tmp_path / "a.jpg", photo)
    out = tmp_path / "out"
    out.mkdir()
    users = [".DS_Store", "notes.txt", ".notes.tmp-old", "other.png"]
    for name in users:
        (out / name).write_text("the user's")
    stale = os.path.basename(fileio.temporary_name(str(out / "a.png")))
    (out / stale).write_bytes(b"half")
    code, _, _ = run([str(tmp_path / "a.jpg"), "-o", str(out), *IDENTITY], capsys)
    assert code == 0
    assert sorted(os.listdir(out)) == sorted(users + ["a.png"])
    assert all((out / name).read_text() == "the user's" for name in users)


def test_existing_outputs_are_kept_unless_overwrite(tmp_path, photo, capsys):
    write_jpeg(tmp_path / "a.jpg", photo)
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.png").write_bytes(b"precious")
    code, out_text, _ = run([str(tmp_path / "a.jpg"), "-o", str(out), *IDENTITY], capsys)
    assert code == 0 and "skipped" in out_text
    assert (out / "a.png").read_bytes() == b"precious"
    code, _, _ = run([str(tmp_path / "a.jpg"), "-o", str(out), "--overwrite", *IDENTITY], capsys)
    assert code == 0 and cv2.imread(str(out / "a.png")) is not None


def test_rerun_beside_the_inputs_skips_earlier_results(tmp_path, photo, capsys):
    write_jpeg(tmp_path / "x.jpg", photo)
    write_jpeg(tmp_path / "y.jpg", photo[::-1])
    args = [str(tmp_path), "-o", str(tmp_path), "--suffix", "_fbcnn", *IDENTITY]
    assert run(args, capsys)[0] == 0
    code, out, _ = run(args, capsys)
    assert code == 0 and "0 restored, 2 skipped, 0 failed" in out
    assert sorted(os.listdir(tmp_path)) == ["x.jpg", "x_fbcnn.png", "y.jpg", "y_fbcnn.png"]


def test_an_input_is_never_overwritten(tmp_path, photo, capsys):
    cv2.imwrite(str(tmp_path / "a.png"), photo)
    before = (tmp_path / "a.png").read_bytes()
    code, _, err = run([str(tmp_path / "a.png"), "-o", str(tmp_path), "--overwrite", *IDENTITY],
                       capsys)
    assert code == 1 and "is an input file" in err
    assert (tmp_path / "a.png").read_bytes() == before
    code, _, _ = run([str(tmp_path / "a.png"), "-o", str(tmp_path), "--suffix", "_fbcnn",
                      *IDENTITY], capsys)
    assert code == 0 and (tmp_path / "a_fbcnn.png").is_file()


def test_a_broken_file_fails_alone(tmp_path, photo, tiny_models, capsys):
    src = tmp_path / "in"
    src.mkdir()
    write_jpeg(src / "a.jpg", photo)
    (src / "b.jpg").write_bytes(jpeg_encode(photo, 50)[:200])  # truncated
    (src / "c.png").write_bytes(b"")
    cv2.imwrite(str(src / "d.png"), photo)
    out = tmp_path / "out"
    code, _, err = run([str(src), "-o", str(out), "--model", tiny_models["color"]], capsys)
    assert code == 1
    assert sorted(os.listdir(out)) == ["a.png", "d.png"]
    error_lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 2
    assert any("b.jpg" in line for line in error_lines)
    assert any("c.png" in line for line in error_lines)
    assert "2 restored, 0 skipped, 2 failed" in err


def test_gray_jpeg_goes_to_the_gray_model(tmp_path, photo, tiny_models, capsys):
    gray = cv2.cvtColor(photo, cv2.COLOR_RGB2GRAY)
    write_jpeg(tmp_path / "g.jpg", gray, 30)
    write_jpeg(tmp_path / "c.jpg", photo, 30)
    out = tmp_path / "out"
    code, stdout, _ = run([str(tmp_path / "g.jpg"), str(tmp_path / "c.jpg"), "-o", str(out),
                           "--model", tiny_models["color"], "--gray-model", tiny_models["gray"]],
                          capsys)
    assert code == 0
    # each line says what QF was fed and why, and what the projection did
    assert re.search(r"g\.jpg -> .*g\.png \[gray, QF \d+ \(network estimate\), projected onto "
                     r"the file's DCT\]", stdout)
    restored_gray = cv2.imread(str(out / "g.png"), cv2.IMREAD_UNCHANGED)
    expected = restored_and_projected(load_model(tiny_models["gray"]), jpeg_encode(gray, 30), 1)
    assert restored_gray.ndim == 2
    np.testing.assert_array_equal(restored_gray, expected)
    expected_colour = restored_and_projected(load_model(tiny_models["color"]),
                                             jpeg_encode(photo, 30), 3)
    np.testing.assert_array_equal(read_rgb(out / "c.png"), expected_colour)

    code, _, _ = run([str(tmp_path / "g.jpg"), "-o", str(tmp_path / "forced"), "--channels",
                      "color", "--model", tiny_models["color"]], capsys)
    assert code == 0
    assert cv2.imread(str(tmp_path / "forced" / "g.png"), cv2.IMREAD_UNCHANGED).ndim == 3


def test_wrong_kind_of_model_fails_its_files_with_status_2(tmp_path, photo, tiny_models, capsys):
    write_jpeg(tmp_path / "c.jpg", photo)
    code, _, err = run([str(tmp_path / "c.jpg"), "-o", str(tmp_path / "out"), "--model",
                        tiny_models["gray"]], capsys)
    assert code == 2 and "--model" in err and "1-channel" in err


def test_an_unusable_gray_model_is_named_and_the_colour_files_still_restored(tmp_path, photo,
                                                                           tiny_models, capsys):
    for name in ("a", "c"):
        write_jpeg(tmp_path / f"{name}.jpg", photo)
    write_jpeg(tmp_path / "b.jpg", photo[..., 1])  # grayscale, between the colour ones
    write_jpeg(tmp_path / "d.jpg", photo[..., 0])
    code, out, err = run([str(tmp_path / n) for n in ("a.jpg", "b.jpg", "c.jpg", "d.jpg")]
                         + ["-o", str(tmp_path / "out"), "--model", tiny_models["color"],
                            "--gray-model", "nosuch"], capsys)
    assert code == 2
    assert "b.jpg: --gray-model 'nosuch': not a known model name" in err
    assert "d.jpg: --gray-model nosuch cannot be used (see the first error)" in err
    assert sorted(os.listdir(tmp_path / "out")) == ["a.png", "c.png"]
    assert "2 restored, 0 skipped, 2 failed" in err + out


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied(tmp_path, photo, orientation, capsys):
    path = write_jpeg(tmp_path / "o.jpg", photo, 90, exif_segment(orientation))
    code, _, _ = run([str(path), "-o", str(tmp_path / "out"), *IDENTITY], capsys)
    assert code == 0
    as_opencv_shows_it = cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    restored = read_rgb(tmp_path / "out" / "o.png")
    assert restored.shape == as_opencv_shows_it.shape
    np.testing.assert_array_equal(restored, as_opencv_shows_it)


def test_network_runs_on_the_stored_grid_then_turns(tmp_path, photo, tiny_models, capsys):
    path = write_jpeg(tmp_path / "o.jpg", photo, 20, exif_segment(6))
    code, _, _ = run([str(path), "-o", str(tmp_path / "out"), "--model", tiny_models["color"]],
                     capsys)
    assert code == 0
    expected = apply_orientation(restored_and_projected(load_model(tiny_models["color"]),
                                                        jpeg_encode(photo, 20), 3), 6)
    np.testing.assert_array_equal(read_rgb(tmp_path / "out" / "o.png"), expected)


def test_icc_profile_is_carried(tmp_path, photo, capsys):
    rgb_profile, gray_profile = icc_profile(b"RGB "), icc_profile(b"GRAY")
    write_jpeg(tmp_path / "c.jpg", photo, 80, icc_segment(rgb_profile))
    write_jpeg(tmp_path / "g.jpg", photo[..., 1], 80, icc_segment(gray_profile))
    code, _, _ = run([str(tmp_path / "c.jpg"), str(tmp_path / "g.jpg"), "-o",
                      str(tmp_path / "png"), *IDENTITY], capsys)
    assert code == 0
    assert png_iccp(tmp_path / "png" / "c.png") == rgb_profile
    assert png_iccp(tmp_path / "png" / "g.png") == gray_profile
    assert cv2.imread(str(tmp_path / "png" / "c.png")) is not None

    code, _, _ = run([str(tmp_path / "c.jpg"), "-o", str(tmp_path / "jpg"), "--format", "jpg",
                      *IDENTITY], capsys)
    out_jpg = (tmp_path / "jpg" / "c.jpg").read_bytes()
    assert code == 0 and read_icc_profile(out_jpg) == rgb_profile
    assert b"ICC_PROFILE\x00\x01\x01" + rgb_profile in out_jpg

    code, _, err = run([str(tmp_path / "c.jpg"), "-o", str(tmp_path / "webp"), "--format",
                        "webp", *IDENTITY], capsys)
    assert code == 0 and "ICC profile not carried" in err
    assert (tmp_path / "webp" / "c.webp").is_file()


class RecordingRestore:
    """Stands in for models.inference.restore, recording the keyword arguments it gets."""

    def __init__(self):
        self.calls = []

    def __call__(self, model, img, qf=None, device="cpu", precision="fp32", tile=None,
                 tile_overlap=32, channels_last=False, x8=False, bit_depth=8, engine="torch"):
        self.calls.append(dict(qf=qf, device=device, precision=precision, tile=tile,
                               tile_overlap=tile_overlap, channels_last=channels_last, x8=x8,
                               bit_depth=bit_depth, engine=engine))
        return img, 42


def test_qf_modes_and_speed_flags_reach_restore(tmp_path, photo, monkeypatch, capsys):
    recorder = RecordingRestore()
    monkeypatch.setattr(consistency, "restore", recorder)
    path = write_jpeg(tmp_path / "a.jpg", photo, 37)
    cv2.imwrite(str(tmp_path / "b.png"), cv2.cvtColor(photo, cv2.COLOR_RGB2BGR))

    def qf_used(*args):
        recorder.calls.clear()
        code, _, _ = run([str(path), "-o", str(tmp_path / "out"), "--overwrite", *IDENTITY,
                          *args], capsys)
        assert code == 0
        return recorder.calls[0]

    assert qf_used()["qf"] is None
    assert qf_used("--qf", "12")["qf"] == 12
    assert qf_used("--qf", "header")["qf"] == 37
    call = qf_used("--precision", "bf16", "--tile", "256", "--tile-overlap", "16",
                   "--channels-last", "--device", "cpu", "--x8", "--engine", "torch")
    assert call == dict(qf=None, device="cpu", precision="bf16", tile=256, tile_overlap=16,
                        channels_last=True, x8=True, bit_depth=8, engine="torch")
    assert qf_used()["tile"] is None and qf_used()["precision"] == "fp32"  # restore()'s defaults
    # main_restore's own: the fastest fp32 engine installed, channels_last for PyTorch
    fast = qf_used()
    assert (fast["engine"], fast["channels_last"]) == (
        ("auto", True) if openvino_available() else ("torch", True))
    assert qf_used()["x8"] is False

    code, _, err = run([str(tmp_path / "b.png"), "-o", str(tmp_path / "out"), "--qf", "header",
                        *IDENTITY], capsys)
    assert code == 1 and "b.png" in err and "not a JPEG" in err


def test_x8_restores_with_the_self_ensemble_and_says_so(tmp_path, photo, tiny_models, capsys):
    path = write_jpeg(tmp_path / "a.jpg", photo, 20)
    model = load_model(tiny_models["color"])
    img = jpeg_decode(path.read_bytes(), 3)
    assert not np.array_equal(restore(model, img)[0], restore(model, img, x8=True)[0])
    for flags, x8 in (([], False), (["--x8"], True)):
        code, out, _ = run([str(path), "-o", str(tmp_path / "out"), "--overwrite", "--model",
                            tiny_models["color"], "--device", "cpu", *flags], capsys)
        assert code == 0 and ("network estimate" in out) and (", x8]" in out) == x8
        assert ("(x8 self-ensemble)" in out) == x8
        expected = restored_and_projected(model, path.read_bytes(), 3, x8=x8)
        np.testing.assert_array_equal(read_rgb(tmp_path / "out" / "a.png"), expected)


@pytest.mark.parametrize("flags, message", [
    (["--tile", "60"], "argument --tile: 60 is not a multiple of 8"),
    (["--tile", "8"], "argument --tile: 8 is not at least 16"),
    (["--tile-overlap", "12"], "argument --tile-overlap: 12 is not a multiple of 8"),
    (["--tile-cache-gib", "-1"], "argument --tile-cache-gib: -1 is not a finite number >= 0"),
])
def test_tile_flags_off_the_jpeg_grid_are_usage_errors(tmp_path, photo, capsys, flags,
                                                       message):
    path = write_jpeg(tmp_path / "a.jpg", photo)
    with pytest.raises(SystemExit) as exit_:
        cli.main([str(path), "-o", str(tmp_path / "out"), *flags, *IDENTITY])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_folder_restored_into_itself_reports_the_file_that_would_be_overwritten(
        tmp_path, photo, capsys):
    folder = tmp_path / "same"
    folder.mkdir()
    cv2.imwrite(str(folder / "shot.png"), photo)
    write_jpeg(folder / "photo.jpg", photo)
    before = (folder / "shot.png").read_bytes()
    code, out, err = run([str(folder), "-o", str(folder), *IDENTITY], capsys)
    assert code == 1 and "shot.png" in err and "is an input file" in err
    assert "1 restored, 0 skipped, 1 failed" in err + out
    assert (folder / "shot.png").read_bytes() == before and (folder / "photo.png").is_file()


def test_an_output_that_appears_meanwhile_is_kept_and_reported(tmp_path, photo, capsys,
                                                               monkeypatch):
    path = write_jpeg(tmp_path / "a.jpg", photo)
    dest = tmp_path / "out" / "a.png"
    real_atomic_write = fileio.atomic_write

    def racing(target, write, **kwargs):  # another process writes the output while we do
        def write_and_race(f):
            write(f)
            dest.write_bytes(b"theirs")
        return real_atomic_write(target, write_and_race, **kwargs)

    monkeypatch.setattr(fileio, "atomic_write", racing)
    code, out, _ = run([str(path), "-o", str(tmp_path / "out"), *IDENTITY], capsys)
    assert code == 0 and "appeared meanwhile" in out and "0 restored, 1 skipped" in out
    assert dest.read_bytes() == b"theirs" and os.listdir(dest.parent) == ["a.png"]


def test_flags_that_do_not_fit_together_stop_before_any_file(tmp_path, photo, capsys):
    path = write_jpeg(tmp_path / "a.jpg", photo)
    code, _, err = run([str(path), "-o", str(tmp_path / "out"), "--tile", "96",
                        "--tile-overlap", "64", *IDENTITY], capsys)
    assert code == 2 and err.startswith("error: --tile-overlap 64: must be at most half the "
                                        "tile (--tile 96, so at most 48)")
    assert not (tmp_path / "out").exists()


def test_qf_estimate_json(tmp_path, testsets_dir, tiny_models, capsys):
    gray = cv2.imread(os.path.join(testsets_dir, "LIVE1_gray", "monarch.png"), cv2.IMREAD_GRAYSCALE)
    crop = np.ascontiguousarray(gray[100:243, 200:343])
    write_jpeg(tmp_path / "q37.jpg", crop, 37)
    cv2.imwrite(str(tmp_path / "clean.png"), crop)
    out_json = tmp_path / "qf.json"
    code, out, _ = run(["--qf-estimate", str(tmp_path / "q37.jpg"), str(tmp_path / "clean.png"),
                        "--gray-model", tiny_models["gray"], "--json", str(out_json)], capsys)
    assert code == 0
    rows = json.loads(out_json.read_text())
    assert [sorted(r) for r in rows] == [["dominant_qf", "file", "header_qf", "network_qf"]] * 2
    by_name = {os.path.basename(r["file"]): r for r in rows}
    assert by_name["q37.jpg"]["header_qf"] == 37 and by_name["q37.jpg"]["dominant_qf"] == 37
    stored = jpeg_decode(jpeg_encode(crop, 37), 1)
    expected_network = restore(load_model(tiny_models["gray"]), stored)[1]
    assert by_name["q37.jpg"]["network_qf"] == expected_network
    assert by_name["clean.png"]["header_qf"] is None and by_name["clean.png"]["dominant_qf"] is None
    assert "q37.jpg" in out


def test_main_restore_script_exit_status(tmp_path, repo_root, photo):
    write_jpeg(tmp_path / "a.jpg", photo)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff")
    result = subprocess.run(
        [sys.executable, os.path.join(repo_root, "main_restore.py"), str(tmp_path / "a.jpg"),
         str(tmp_path / "broken.jpg"), "-o", str(tmp_path / "out"), *IDENTITY],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "broken.jpg" in result.stderr and (tmp_path / "out" / "a.png").is_file()
    assert not (tmp_path / "out" / "broken.png").exists()


@pytest.mark.parametrize("quality", ["0", "101"])
def test_output_quality_is_a_jpeg_quality(quality, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.build_parser().parse_args(["in.jpg", "-o", str(tmp_path), "--quality", quality])
    assert exit_info.value.code == 2
    assert "--quality" in capsys.readouterr().err


def test_rerun_into_the_input_folder_skips_or_replaces_earlier_results(tmp_path, photo, capsys):
    write_jpeg(tmp_path / "x.jpg", photo)
    before = (tmp_path / "x.jpg").read_bytes()
    args = [str(tmp_path), "-o", str(tmp_path), *IDENTITY]
    assert run(args, capsys)[0] == 0
    code, out, err = run(args, capsys)  # x.png is x.jpg's earlier result, not a new input
    assert (code, err) == (0, "") and "0 restored, 1 skipped, 0 failed" in out
    code, out, err = run([*args, "--overwrite"], capsys)
    assert (code, err) == (0, "") and "1 restored, 0 skipped, 0 failed" in out
    assert sorted(os.listdir(tmp_path)) == ["x.jpg", "x.png"]
    assert (tmp_path / "x.jpg").read_bytes() == before


def test_qf_estimate_never_writes_its_json_over_an_input(tmp_path, photo, capsys):
    for name in ("p1.jpg", "p2.jpg"):
        write_jpeg(tmp_path / name, photo)
    before = (tmp_path / "p1.jpg").read_bytes()
    # what `--json *.jpg` becomes after the shell expands the glob
    code, _, err = run(["--qf-estimate", "--no-network", "--json", str(tmp_path / "p1.jpg"),
                        str(tmp_path / "p2.jpg")], capsys)
    assert code == 2 and f"--json {tmp_path / 'p1.jpg'}: is an image or input file" in err
    assert (tmp_path / "p1.jpg").read_bytes() == before
    report = tmp_path / "qf.json"
    report.write_text("earlier")
    code, _, err = run(["--qf-estimate", "--no-network", str(tmp_path / "p2.jpg"), "--json",
                        str(report)], capsys)
    assert code == 2 and "exists (--overwrite replaces it)" in err
    assert report.read_text() == "earlier"
    assert run(["--qf-estimate", "--no-network", str(tmp_path / "p2.jpg"), "--json",
                str(report), "--overwrite"], capsys)[0] == 0
    assert json.loads(report.read_text())[0]["header_qf"] == 50


@pytest.mark.parametrize("recursive", [False, True])
def test_a_folder_that_cannot_be_listed_fails_alone(tmp_path, photo, capsys, monkeypatch,
                                                    recursive):
    top = tmp_path / "top"
    (top / "locked").mkdir(parents=True)
    write_jpeg(top / "a.jpg", photo)
    write_jpeg(tmp_path / "b.jpg", photo)
    locked = str(top if not recursive else top / "locked")
    for name in ("listdir", "scandir"):  # os.walk lists with scandir
        real = getattr(os, name)

        def refuse(path=".", real=real):
            if os.fspath(path) == locked:
                raise PermissionError(13, "Permission denied", os.fspath(path))
            return real(path)
        monkeypatch.setattr(os, name, refuse)
    code, out, err = run([str(top), str(tmp_path / "b.jpg"), "-o", str(tmp_path / "out"),
                          *(["--recursive"] if recursive else []), *IDENTITY], capsys)
    assert code == 1 and f"error: {locked}: cannot list this folder (Permission denied)" in err
    assert "no image files" not in err
    restored = ["a.png", "b.png"] if recursive else ["b.png"]
    assert sorted(os.listdir(tmp_path / "out")) == restored
    assert f"{len(restored)} restored, 0 skipped, 1 failed" in out + err


def test_qf_dominant_without_a_jpeg_trace_says_so(tmp_path, photo, tiny_models, capsys):
    cv2.imwrite(str(tmp_path / "clean.png"), photo)  # never compressed
    code, out, _ = run([str(tmp_path / "clean.png"), "-o", str(tmp_path / "out"), "--qf",
                        "dominant", "--model", tiny_models["color"]], capsys)
    assert code == 0 and "(network estimate: no JPEG trace found for --qf dominant)" in out
    assert "not a JPEG file: no JPEG trace read" in out


def test_the_jpeg_model_is_not_reported_as_a_network(tmp_path, photo, capsys):
    write_jpeg(tmp_path / "c.jpg", photo)
    write_jpeg(tmp_path / "g.jpg", photo[..., 0])
    code, out, _ = run([str(tmp_path / "c.jpg"), str(tmp_path / "g.jpg"), "-o",
                        str(tmp_path / "out"), *IDENTITY], capsys)
    assert code == 0
    assert "c.png [colour, unchanged: --model jpeg runs no network]" in out
    assert "g.png [gray, unchanged: --gray-model jpeg runs no network]" in out
    assert "network's" not in out and "QF" not in out


def test_qf_estimate_offline_still_reports_header_and_dominant(tmp_path, photo, capsys,
                                                               offline_zoo):
    """`--qf-estimate` naming the released model, without its weights and offline."""
    write_jpeg(tmp_path / "photo.jpg", photo, 37)
    write_jpeg(tmp_path / "other.jpg", photo[::-1], 37)
    files = [str(tmp_path / "photo.jpg"), str(tmp_path / "other.jpg")]
    code, out, err = run(["--qf-estimate", "--model", "fbcnn_color", *files], capsys)
    assert code == 0  # no file failed
    rows = [line.split() for line in out.splitlines()[1:]]
    assert [os.path.basename(r[0]) for r in rows] == ["photo.jpg", "other.jpg"]
    assert all(r[1] == "37" and r[2] == "-" for r in rows)  # header QF; no network QF
    assert run(["--qf-estimate", "--no-network", *files], capsys)[1] == out  # dominant too
    (warning,) = err.splitlines()
    assert warning.startswith("warning: no network QF for colour files: --model fbcnn_color: "
                              f"cannot download {os.environ['FBCNN_MODEL_URL']}fbcnn_color.pth")
    assert "FBCNN_MODEL_DIR" in warning and warning.endswith(
        "--no-network leaves the network out without trying")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff")
    code, out, err = run(["--qf-estimate", "--model", "fbcnn_color", str(tmp_path / "photo.jpg"),
                          str(tmp_path / "broken.jpg")], capsys)
    assert code == 1 and "1 file(s) failed" in err and "broken.jpg" in err
    assert os.path.basename(out.splitlines()[1].split()[0]) == "photo.jpg"


def test_qf_dominant_feeds_the_first_qf_of_a_non_aligned_double_jpeg(tmp_path, testsets_dir,
                                                                     tiny_models, capsys,
                                                                     monkeypatch):
    """FBCNN-D end to end: a gray file stored at QF 30 after a QF-10 JPEG shifted by (4, 4)
    (the paper's protocol); `--qf dominant` finds 10 and the network receives 1 - 10/100."""
    gray = cv2.imread(os.path.join(testsets_dir, "LIVE1_gray", "monarch.png"),
                      cv2.IMREAD_GRAYSCALE)
    first = jpeg(np.ascontiguousarray(gray[100:175, 200:275]), 10)
    path = tmp_path / "double.jpg"
    path.write_bytes(jpeg_encode(np.ascontiguousarray(shift_crop(first, 4)), 30))
    received = []
    forward = FBCNN.forward

    def recording(net, x, qf_input=None):
        received.append((x.shape[1], None if qf_input is None else qf_input.tolist()))
        return forward(net, x, qf_input)

    monkeypatch.setattr(FBCNN, "forward", recording)
    for mode, qf in (("dominant", 10), ("header", 30)):  # the file's own tables say 30
        received.clear()
        code, out, _ = run([str(path), "-o", str(tmp_path / mode), "--qf", mode, "--gray-model",
                            tiny_models["gray"], "--device", "cpu", "--engine", "torch"], capsys)
        assert code == 0 and f"[gray, QF {qf} ({mode}; network estimate" in out
        # the restoration, then its twin for the projection's calibration: both fed the QF
        assert received == [(1, [[pytest.approx(1 - qf / 100)]])] * 2
    expected = restored_and_projected(load_model(tiny_models["gray"]), path.read_bytes(), 1,
                                      qf=10, engine="torch")
    np.testing.assert_array_equal(cv2.imread(str(tmp_path / "dominant" / "double.png"),
                                             cv2.IMREAD_GRAYSCALE), expected)


def test_a_corrupt_model_file_is_named_with_its_flag(tmp_path, photo, capsys):
    write_jpeg(tmp_path / "a.jpg", photo)
    bad = tmp_path / "corrupt.pth"
    bad.write_bytes(b"PK\x03\x04 not a zip")
    code, _, err = run([str(tmp_path / "a.jpg"), "-o", str(tmp_path / "out"), "--model",
                        str(bad)], capsys)
    assert code == 2 and f"a.jpg: --model: {bad}: " in err


def test_automatic_tiling_is_shown_as_in_the_test_scripts(tmp_path, photo, tiny_models, capsys,
                                                          monkeypatch):
    import logging

    import models.inference
    monkeypatch.setitem(models.inference.CPU_PLANS, 16, models.inference.CpuPlan(512, 0.001, 0))
    write_jpeg(tmp_path / "a.jpg", photo)
    code, out, _ = run([str(tmp_path / "a.jpg"), "-o", str(tmp_path / "out"), "--model",
                        tiny_models["color"], "--device", "cpu"], capsys)
    assert code == 0 and "40x48 image is over 0.0 megapixels: tiling it" in out
    assert not logging.getLogger("fbcnn").handlers  # only while main_restore runs


def test_without_model_flags_the_bundled_lite_model_stands_in_for_missing_released_weights(
        tmp_path, photo, capsys, monkeypatch, offline_zoo):
    """No --model, no released weights in the model folder: the bundled colour lite model
    restores the image, and the run says so once; nothing is downloaded."""
    repo_zoo = tmp_path / "repo_zoo"
    torch.manual_seed(5)
    net = FBCNN(in_nc=3, out_nc=3, **TINY).eval()
    path = save_network(str(repo_zoo / "lite.safetensors"), net.state_dict(),
                        model_zoo.infer_fbcnn_kwargs(net.state_dict()))
    sha = hashlib.sha256(open(path, "rb").read()).hexdigest()
    monkeypatch.setattr(model_zoo, "DEFAULT_MODEL_DIR", str(repo_zoo))
    monkeypatch.setitem(MODEL_ZOO, "fbcnn_color_lite", ZooEntry("lite.safetensors", sha, 3,
                                                                bundled=True))
    src = write_jpeg(tmp_path / "a.jpg", photo, qf=30)
    for name in ("b.jpg", "c.jpg"):
        (tmp_path / name).write_bytes(src.read_bytes())
    code, out, err = run([str(tmp_path / n) for n in ("a.jpg", "b.jpg", "c.jpg")]
                         + ["-o", str(tmp_path / "out")], capsys)
    assert code == 0, err
    assert out.count("using the bundled fbcnn_color_lite") == 1
    assert "--model fbcnn_color_lite" in out  # the loaded line names what ran
    expected = restored_and_projected(load_model(path), (tmp_path / "a.jpg").read_bytes(), 3)
    assert np.array_equal(read_rgb(tmp_path / "out" / "a.png"), expected)


def test_the_shipped_lite_model_restores_a_photo_offline_without_model_flags(tmp_path, capsys,
                                                                               offline_zoo):
    """The bundled fbcnn_color_lite as shipped: `main_restore.py photo.jpg -o out` with no model
    flags and no released weights restores a QF 23 JPEG of LIVE1's parrots more than 0.5 dB
    above the JPEG's PSNR, without a download."""
    clean = imread_uint(os.path.join(REPO_ROOT, "testsets", "LIVE1_color", "parrots.png"))
    src = write_jpeg(tmp_path / "photo.jpg", clean, qf=23)
    code, out, err = run([str(src), "-o", str(tmp_path / "out"), "--device", "cpu"], capsys)
    assert code == 0, err
    assert "using the bundled fbcnn_color_lite" in out
    jpeg_psnr = psnr(jpeg_decode(src.read_bytes(), 3), clean)
    restored_psnr = psnr(read_rgb(tmp_path / "out" / "photo.png"), clean)
    assert restored_psnr > jpeg_psnr + 0.5, (restored_psnr, jpeg_psnr)


def test_options_that_do_nothing_here_are_named(tmp_path, photo, capsys):
    path = write_jpeg(tmp_path / "a.jpg", photo)
    code, _, err = run([str(path), "-o", str(tmp_path / "out"), "--json", str(tmp_path / "q.json"),
                        "--no-network", "--quality", "80", *IDENTITY], capsys)
    assert code == 0
    assert "warning: --json has no effect without --qf-estimate" in err
    assert "warning: --no-network has no effect without --qf-estimate" in err
    assert "warning: --quality has no effect on png output (only jpg and webp)" in err
    assert not (tmp_path / "q.json").exists()
    code, _, err = run([str(path), "-o", str(tmp_path / "jpg"), "--format", "jpg", "--quality",
                        "80", *IDENTITY], capsys)
    assert code == 0 and "has no effect" not in err
    code, _, err = run([str(path), "--qf-estimate", "--no-network", "-o", str(tmp_path / "x"),
                        "--suffix", "_r"], capsys)
    assert code == 0
    assert "warning: -o has no effect with --qf-estimate (nothing is restored)" in err
    assert "warning: --suffix has no effect with --qf-estimate" in err and "--quality" not in err


def test_what_folder_inputs_pass_over_is_one_line(tmp_path, photo, capsys):
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    write_jpeg(folder / "a.jpg", photo)
    write_jpeg(folder / "sub" / "b.jpg", photo)
    (folder / "notes.txt").write_text("x")
    (folder / ".hidden").write_text("x")
    code, out, _ = run([str(folder), "-o", str(folder / "out"), *IDENTITY], capsys)
    assert code == 0  # the output folder inside the input folder is not counted
    assert ("passed over in the input folders: 1 file(s) without an image extension; "
            "1 sub-folder(s) (--recursive descends into them)") in out
    code, out, _ = run([str(folder / "sub"), str(folder / "a.jpg"), str(folder / "notes.txt"),
                        "-o", str(tmp_path / "out2"), "-r", *IDENTITY], capsys)
    assert code == 1  # notes.txt, named, is tried (and fails): never passed over in silence
    assert "passed over" not in out


def test_a_jpeg_that_cannot_be_projected_is_still_restored_and_named(tmp_path, photo,
                                                                      tiny_models, capsys):
    """A CMYK JPEG (four components): restored as the network made it, one warning naming the
    file and the reason, and its line says it was not projected."""
    from PIL import Image
    path = tmp_path / "cmyk.jpg"
    Image.fromarray(photo).convert("CMYK").save(path, "JPEG", quality=60)
    code, out, err = run([str(path), "-o", str(tmp_path / "out"), "--model",
                          tiny_models["color"], "--device", "cpu"], capsys)
    assert code == 0 and (tmp_path / "out" / "cmyk.png").is_file()
    assert ("cmyk.jpg: not projected onto the file's DCT (4 components (CMYK or YCCK)); "
            "written as the network restored it") in err
    assert "not projected onto the file's DCT]" in out


def test_bit_depth_16_keeps_the_levels_between_8_bit_ones(tmp_path, testsets_dir, tiny_models,
                                                          capsys):
    """`--bit-depth 16`: a 16-bit PNG (and TIFF) whose rounding to 8 bits is the 8-bit run's
    output within one level (the network's output rounded twice), and which holds values
    between 8-bit levels; projected, it stays within rounding of the 8-bit projection (which
    starts from the rounded restoration). A format that holds 8 bits is refused."""
    clean = imread_uint(os.path.join(testsets_dir, "LIVE1_color", "monarch.png"))[:96, :128]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "m.jpg").write_bytes(jpeg_encode(clean, 30))
    common = [str(tmp_path / "in"), "--model", tiny_models["color"], "--device", "cpu"]
    for projection in ("--no-projection", "--projection"):
        assert run([*common, "-o", str(tmp_path / f"o8{projection}"), projection], capsys)[0] == 0
        eight = cv2.imread(str(tmp_path / f"o8{projection}" / "m.png"), cv2.IMREAD_UNCHANGED)
        for fmt in ("png", "tif"):
            out = tmp_path / f"o16{fmt}{projection}"
            code, stdout, _ = run([*common, "-o", str(out), "--bit-depth", "16", "--format", fmt,
                                   projection], capsys)
            assert code == 0 and ("projected onto" in stdout) == (projection == "--projection")
            sixteen = cv2.imread(str(out / f"m.{fmt}"), cv2.IMREAD_UNCHANGED)
            assert sixteen.dtype == np.uint16 and sixteen.shape == eight.shape
            diff = np.abs(np.rint(sixteen / 257.0) - eight)
            if projection == "--no-projection":
                assert diff.max() <= 1
            else:
                assert diff.max() <= 2 and diff.mean() < 0.2
            inside = sixteen[(sixteen > 0) & (sixteen < 65535)]  # the test network clips many
            assert inside.size > 1000 and (inside % 257 != 0).mean() > 0.9
    code, _, err = run([*common, "-o", str(tmp_path / "oj"), "--bit-depth", "16", "--format",
                        "jpg"], capsys)
    assert code == 2 and "--bit-depth 16: jpg holds 8 bits" in err


def test_batch_restores_same_size_inputs_together_as_one_by_one(tmp_path, testsets_dir,
                                                                tiny_models, capsys,
                                                                monkeypatch):
    """`--batch 4` on crops of two sizes, colour and gray, JPEG and PNG: the inputs of a chunk of
    four (in name order) of one size and model go through the network (and their twins
    through it again) in one pass, each with its own QF; every output is within one grey
    level of `--batch 1`'s."""
    clean = imread_uint(os.path.join(testsets_dir, "LIVE1_color", "bikes.png"))
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(7):
        rows = slice(24 * i, 24 * i + (64 if i < 5 else 80))
        crop = np.ascontiguousarray(clean[rows, 32 * i:32 * i + 96])
        (folder / f"c{i}.jpg").write_bytes(jpeg_encode(crop, 10 + 12 * i))
    gray = np.ascontiguousarray(cv2.cvtColor(clean[:64, :96], cv2.COLOR_RGB2GRAY))
    for i in range(2):
        (folder / f"g{i}.jpg").write_bytes(jpeg_encode(gray[:, i:i + 90], 30 + 40 * i))
    cv2.imwrite(str(folder / "p.png"), cv2.cvtColor(clean[:64, :96], cv2.COLOR_RGB2BGR))
    batches = []
    real = FBCNN.forward

    def counting(net, x, qf_input=None):
        batches.append(x.shape[0])
        return real(net, x, qf_input)

    monkeypatch.setattr(FBCNN, "forward", counting)
    common = [str(folder), "--model", tiny_models["color"], "--gray-model", tiny_models["gray"],
              "--device", "cpu", "--engine", "torch"]  # PyTorch's forward counts the batches
    for qf in ("auto", "header"):
        outputs = {}
        for batch in ("1", "4"):
            batches.clear()
            out = tmp_path / f"{qf}_{batch}"
            args = [*common, "-o", str(out), "--qf", qf, "--batch", batch]
            code, _, _ = run(args, capsys)
            assert code == (0 if qf == "auto" else 1)  # --qf header fails the PNG only
            outputs[batch] = {name: cv2.imread(str(out / name), cv2.IMREAD_UNCHANGED)
                              for name in sorted(os.listdir(out))}
            if batch == "4":  # chunks of 4 in name order: c0-c3 | c4, c5+c6, g0 | g1, p
                # (each pass twice, the twins'; the PNG has no twin, and fails --qf header)
                assert sorted(batches) == sorted([4, 4, 2, 2] + [1] * (7 if qf == "auto" else 6))
        assert outputs["1"].keys() == outputs["4"].keys() and len(outputs["4"]) >= 9
        assert max(np.abs(outputs["1"][n].astype(int) - outputs["4"][n]).max()
                   for n in outputs["1"]) <= 1
    code, _, err = run([*common, "-o", str(tmp_path / "x"), "--batch", "4", "--tile", "64"],
                       capsys)
    assert code == 2 and "--batch 4: not with --tile or --x8" in err


def test_each_jpegs_coefficients_are_read_once(tmp_path, photo, tiny_models, capsys,
                                               monkeypatch):
    """The twin of the calibration and the projection share one read of the file's DCT."""
    for name, qf in (("a.jpg", 20), ("b.jpg", 80)):
        write_jpeg(tmp_path / name, photo, qf)
    reads = []
    real = consistency.read_coefficients
    monkeypatch.setattr(consistency, "read_coefficients",
                        lambda data: reads.append(1) or real(data))
    code, out, _ = run([str(tmp_path / "a.jpg"), str(tmp_path / "b.jpg"), "-o",
                        str(tmp_path / "out"), "--model", tiny_models["color"], "--device",
                        "cpu"], capsys)
    assert code == 0 and out.count("projected onto the file's DCT") == 2
    assert len(reads) == 2
