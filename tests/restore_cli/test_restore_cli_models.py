"""main_restore.py / runners/restore.py: which model restores which file, the QF modes and
--qf-estimate, the speed flags, the bundled lite model offline, batching."""
import hashlib
import json
import os
import re

import cv2
import numpy as np
import pytest
import torch

from models import consistency
from data.jpeg import jpeg, jpeg_decode, jpeg_encode, shift_crop
from models.engines import openvino_available
from models.inference import restore
from models import model_zoo
from models.model_zoo import MODEL_ZOO, ZooEntry, load_model
from models.network_fbcnn import FBCNN
from utils import REPO_ROOT
from utils.checkpoint import save_network
from utils.image import imread_uint
from utils.metrics import psnr

from tests.restore_cli.restore_support import (IDENTITY, TINY, read_rgb, restored_and_projected,
                                               run, write_jpeg)


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
