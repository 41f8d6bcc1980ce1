"""runners/evaluation.py and the four main_test_fbcnn_*.py scripts: the paper's JPEG rows,
outputs on disk, and one clear error line for bad input."""
import hashlib
import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from data.jpeg import double_jpeg_file, jpeg, jpeg_file
from data.jpeg_projection import read_coefficients
from models.inference import restore
from models.model_zoo import load_model
from models.network_fbcnn import FBCNN
from models import consistency
from runners import evaluation
from runners.evaluation import COLOR, COLOR_REAL, GRAY, GRAY_DOUBLE, EvalSettings, main, run
from tests.conftest import REFERENCE, REPO_ROOT, calibrated_projection, shared_testset
from utils.image import imread_uint, imwrite


def _script(name, *args, cwd=None):
    return subprocess.run([sys.executable, os.path.join(REPO_ROOT, name), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def _rounded(summary):
    return round(summary["psnr"], 2), round(summary["ssim"], 3), round(summary["psnrb"], 2)


def test_gray_script_reproduces_classic5_jpeg_rows(tmp_path):
    out = _script("main_test_fbcnn_gray.py", "--model", "jpeg", "--testset", "Classic5",
                  "--qf", "10", "40", "--json", "r.json", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "27.82|0.760|25.21" in out.stdout and "32.43|0.885|29.92" in out.stdout
    summaries = json.loads((tmp_path / "r.json").read_text())
    assert [s["qf"] for s in summaries] == [10, 40]
    assert [_rounded(s) for s in summaries] == [(27.82, 0.760, 25.21), (32.43, 0.885, 29.92)]
    for s in summaries:
        assert s["testset"] == "Classic5" and s["model"] == "jpeg" and s["n_images"] == 5
        assert s["qf_pred_mean"] is None
    assert len(os.listdir(tmp_path / "test_results" / "Classic5_jpeg_qf10")) == 5
    assert (tmp_path / "test_results" / "Classic5_jpeg.log").is_file()


def test_color_script_reproduces_live1_jpeg_row(tmp_path):
    path = tmp_path / "r.json"
    assert main(COLOR, ["--model", "jpeg", "--qf", "10", "--json", str(path),
                        "--results", str(tmp_path), "--no-save-images"]) == 0
    (summary,) = json.loads(path.read_text())
    assert summary["testset"] == "LIVE1_color" and summary["n_images"] == 29
    assert _rounded(summary) == (25.69, 0.743, 24.20)
    assert not (tmp_path / "LIVE1_color_jpeg_qf10").exists()


def test_color_script_reproduces_bsds500_jpeg_row(tmp_path):
    path = tmp_path / "r.json"
    assert main(COLOR, ["--model", "jpeg", "--testset", shared_testset("BSDS500_color"), "--qf",
                        "10", "--json", str(path), "--results", str(tmp_path),
                        "--no-save-images"]) == 0
    (summary,) = json.loads(path.read_text())
    assert summary["testset"] == "BSDS500_color" and summary["n_images"] == 200
    assert _rounded(summary) == (25.84, 0.741, 24.12)


def test_double_jpeg_script_reproduces_jpeg_inputs(tmp_path):
    path = tmp_path / "r.json"
    assert main(GRAY_DOUBLE, ["--model", "jpeg", "--qf1", "10", "30", "--qf2", "30", "10",
                              "--json", str(path), "--results", str(tmp_path),
                              "--no-save-images"]) == 0
    rows = {(s["qf1"], s["qf2"]): s for s in json.loads(path.read_text())}
    assert set(rows) == {(10, 30), (10, 10), (30, 30), (30, 10)}
    assert round(rows[10, 30]["psnr"], 2) == 27.55  # the paper's JPEG input rows
    assert round(rows[30, 10]["psnr"], 2) == 27.49
    assert all(s["shift"] == 4 for s in rows.values())


@pytest.fixture
def tiny_models(tmp_path):
    torch.manual_seed(0)
    paths = {}
    for channels in (1, 3):
        net = FBCNN(in_nc=channels, out_nc=channels, nc=[8, 16, 32, 64], nb=1)
        paths[channels] = tmp_path / f"tiny{channels}.pth"
        torch.save(net.state_dict(), paths[channels])
    return paths


@pytest.fixture
def small_set(tmp_path, testsets_dir):
    """Two small crops of LIVE1_color, plus a broken .png and a text file."""
    folder = tmp_path / "small"
    folder.mkdir()
    for name in ("monarch.png", "parrots.png"):
        img = imread_uint(os.path.join(testsets_dir, "LIVE1_color", name), 3)
        imwrite(str(folder / name), img[:45, :61])
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_bad_files_are_reported_and_skipped(tmp_path, small_set, tiny_models, capsys):
    path = tmp_path / "r.json"
    code = main(COLOR, ["--model", str(tiny_models[3]), "--testset", str(small_set),
                        "--qf", "20", "--json", str(path), "--results", str(tmp_path / "res")])
    assert code == 0
    (summary,) = json.loads(path.read_text())
    assert summary["n_images"] == 2 and summary["skipped"] == ["broken.png", "notes.txt"]
    assert 0 <= summary["qf_pred_mean"] <= 100 and summary["psnr"] > 0
    stdout = capsys.readouterr().out
    assert "broken.png" in stdout and "notes.txt" in stdout
    written = sorted(os.listdir(tmp_path / "res" / "small_tiny3_qf20"))
    assert written == ["monarch.png", "parrots.png"]
    restored = imread_uint(str(tmp_path / "res" / "small_tiny3_qf20" / "monarch.png"), 3)
    assert restored.shape == (45, 61, 3)


def test_real_script_writes_blind_and_controlled_results(tmp_path, small_set, tiny_models):
    path = tmp_path / "r.json"
    assert main(COLOR_REAL, ["--model", str(tiny_models[3]), "--testset", str(small_set),
                             "--qf-control", "10", "90", "--json", str(path),
                             "--results", str(tmp_path / "res")]) == 0
    summaries = json.loads(path.read_text())
    assert [s["qf_control"] for s in summaries] == [None, 10, 90]
    assert all(s["psnr"] is None and s["n_images"] == 2 for s in summaries)
    a = imread_uint(str(tmp_path / "res" / "small_tiny3_qf10" / "monarch.png"), 3)
    b = imread_uint(str(tmp_path / "res" / "small_tiny3_qf90" / "monarch.png"), 3)
    assert not np.array_equal(a, b)  # the QF control changes the output


def test_real_script_projects_each_file_read_once_for_all_settings(tmp_path, testsets_dir,
                                                                    tiny_models, monkeypatch):
    """--projection on real JPEGs: every setting's output is its restoration projected onto
    the file's own coefficients, which are read once per file, not once per setting."""
    folder = tmp_path / "real"
    folder.mkdir()
    for name in ("1.jpg", "2.jpg"):
        with open(os.path.join(testsets_dir, "Real", name), "rb") as f:
            (folder / name).write_bytes(f.read())
    reads = []
    monkeypatch.setattr(consistency, "read_coefficients",
                        lambda data: reads.append(len(data)) or read_coefficients(data))
    assert main(COLOR_REAL, ["--model", str(tiny_models[3]), "--testset", str(folder),
                             "--qf-control", "10", "90", "--projection", "--workers", "0",
                             "--results", str(tmp_path / "res")]) == 0
    assert len(reads) == 2  # two files, three settings
    model = load_model(str(tiny_models[3]))
    data = (folder / "1.jpg").read_bytes()
    img = imread_uint(str(folder / "1.jpg"), 3)
    for setting, qf in (("blind", None), ("qf10", 10), ("qf90", 90)):
        written = imread_uint(str(tmp_path / "res" / f"real_tiny3_{setting}_proj" / "1.png"), 3)
        expected = calibrated_projection(restore(model, img, qf=qf)[0], data,
                                         lambda x, qf=qf: restore(model, x, qf=qf)[0])
        assert np.array_equal(written, expected), setting


def _blocks(stdout):
    """{setting: its lines} from the `== setting: ...` line that opens each block."""
    blocks, current = {}, None
    for line in stdout.splitlines():
        if line.startswith("== "):
            current = line[3:].split(":")[0]
            blocks[current] = [line]
        elif current is not None:
            blocks[current].append(line)
    return blocks


def test_real_script_labels_each_block_and_shows_the_qf_fed(tmp_path, small_set, tiny_models,
                                                            capsys):
    common = ["--testset", str(small_set), "--qf-control", "10", "--no-save-images",
              "--results", str(tmp_path / "res")]
    assert main(COLOR_REAL, ["--model", str(tiny_models[3]), *common]) == 0
    blocks = _blocks(capsys.readouterr().out)
    assert list(blocks) == ["small_tiny3_blind", "small_tiny3_qf10"]
    blind, qf10 = blocks.values()
    assert blind[0].endswith(": blind: each file restored with the QF the network predicts "
                             "for it; 2 image(s)")
    assert qf10[0].endswith(": QF 10 fed to the network (qf_input) for every file; 2 image(s)")
    assert [line.split(" - ")[0] for line in qf10[1:3]] == ["monarch.png", "parrots.png"]
    assert all(line.endswith("; QF fed: the predicted") for line in blind[1:3])
    assert all(" - predicted QF: " in line and line.endswith("; QF fed: 10") for line in qf10[1:3])
    assert qf10[3].startswith("Average predicted QF - small_tiny3_qf10 -: ")
    assert qf10[3].endswith(" (QF fed: 10)")

    assert main(COLOR_REAL, ["--model", "jpeg", *common]) == 0
    blocks = _blocks(capsys.readouterr().out)
    assert list(blocks) == ["small_jpeg_blind", "small_jpeg_qf10"]
    qf10 = blocks["small_jpeg_qf10"]
    assert qf10[0].endswith("(--model jpeg runs no network, so QF 10 is not used); 2 image(s)")
    assert qf10[1:4] == ["monarch.png - unchanged (--model jpeg)",
                        "parrots.png - unchanged (--model jpeg)",
                        "small_jpeg_qf10 -: 2 image(s) returned unchanged (--model jpeg)"]


def test_one_progress_bar_over_every_setting_and_image(tmp_path, small_set, monkeypatch):
    bars = []

    class Recorder:
        def __init__(self, **kwargs):
            self.kwargs, self.n, self.descriptions = kwargs, 0, []
            bars.append(self)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, n=1):
            self.n += n

        def set_description(self, desc, refresh=True):
            self.descriptions.append(desc)

        def close(self):
            pass

    monkeypatch.setattr(evaluation, "tqdm", Recorder)
    assert main(COLOR, ["--model", "jpeg", "--testset", str(small_set), "--qf", "10", "20", "30",
                        "--no-save-images", "--results", str(tmp_path / "res")]) == 0
    (bar,) = bars
    assert bar.kwargs["total"] == bar.n == 3 * 2  # settings x readable images: one ETA for all
    assert bar.kwargs["disable"] is None  # quiet when stderr is not a terminal
    assert bar.descriptions == ["small_jpeg_qf10", "small_jpeg_qf20", "small_jpeg_qf30"]


def test_speed_flags_reach_restore_and_unset_ones_keep_its_defaults(tmp_path, small_set,
                                                                     tiny_models, monkeypatch):
    calls = []
    real_restore = consistency.restore

    def recording(*args, **kwargs):  # bit_depth: the test scripts write 8-bit PNGs
        calls.append({k: v for k, v in kwargs.items() if k not in ("qf", "bit_depth")})
        assert kwargs["bit_depth"] == 8
        return real_restore(*args, **kwargs)

    monkeypatch.setattr(consistency, "restore", recording)
    base = ["--model", str(tiny_models[3]), "--testset", str(small_set), "--qf", "20",
            "--results", str(tmp_path / "res"), "--no-save-images", "--device", "cpu"]
    assert main(COLOR, base) == 0
    assert calls[0] == dict(device="cpu")
    calls.clear()
    assert main(COLOR, [*base, "--tile", "32", "--tile-cache-gib", "0.5", "--precision",
                        "bf16"]) == 0
    assert calls[0] == dict(device="cpu", tile=32, tile_overlap=16, tile_cache_gib=0.5,
                            precision="bf16")


def test_x8_runs_the_self_ensemble_and_says_so(tmp_path, small_set, tiny_models):
    model = load_model(str(tiny_models[3]))
    img = imread_uint(str(small_set / "monarch.png"), 3)
    rows = {}
    for flags in ([], ["--x8"]):
        path = tmp_path / f"r{len(flags)}.json"
        assert main(COLOR, ["--model", str(tiny_models[3]), "--testset", str(small_set),
                            "--qf", "20", "--json", str(path), "--results", str(tmp_path / "res"),
                            "--device", "cpu", *flags]) == 0
        (rows[bool(flags)],) = json.loads(path.read_text())
    assert rows[False]["x8"] is False and rows[True]["x8"] is True
    assert rows[True]["psnr"] != rows[False]["psnr"]
    for x8, folder in ((False, "small_tiny3_qf20"), (True, "small_tiny3_qf20_x8")):
        written = imread_uint(str(tmp_path / "res" / folder / "monarch.png"), 3)
        assert np.array_equal(written, restore(model, jpeg(img, 20), x8=x8)[0])
    log = (tmp_path / "res" / "small_tiny3.log").read_text()
    assert ", fp32, --x8" in log and "Average PSNR/SSIM/PSNRB - small_tiny3_qf20_x8 -:" in log


@pytest.mark.parametrize("preset, n_channels", [(COLOR, 3), (GRAY_DOUBLE, 1)])
def test_projection_projects_each_restoration_and_names_its_rows(tmp_path, small_set,
                                                                 tiny_models, preset, n_channels):
    """--projection: each restoration projected onto the intervals of the JPEG it came from;
    the rows, folders and JSON say so; without it, the paper's protocol as before."""
    model = load_model(str(tiny_models[n_channels]))
    img = imread_uint(str(small_set / "monarch.png"), n_channels)
    settings = ["--qf", "20"] if preset is COLOR else ["--qf1", "10", "--qf2", "30"]
    name = "small_tiny3_qf20" if preset is COLOR else "small_tiny1_qf10_30_shift4"
    rows = {}
    for flags in ([], ["--projection"]):
        path = tmp_path / f"r{len(flags)}.json"
        assert main(preset, ["--model", str(tiny_models[n_channels]), "--testset", str(small_set),
                             *settings, "--json", str(path), "--results", str(tmp_path / "res"),
                             "--device", "cpu", *flags]) == 0
        (rows[bool(flags)],) = json.loads(path.read_text())
    assert rows[False]["projection"] is False and rows[True]["projection"] is True
    if preset is COLOR:
        img_L, data = jpeg_file(img, 20)
    else:
        img_L, data = double_jpeg_file(img, 10, 30, 4)
    expected = calibrated_projection(restore(model, img_L)[0], data,
                                     lambda x: restore(model, x)[0])
    written = imread_uint(str(tmp_path / "res" / f"{name}_proj" / "monarch.png"), n_channels)
    assert np.array_equal(written, expected)
    assert not np.array_equal(written, restore(model, img_L)[0])
    log = (tmp_path / "res" / f"{name.rsplit('_qf', 1)[0]}.log").read_text()
    assert f"{name}_proj: " in log and "(--projection)" in log


def _one_error_line(out):
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ")
    return lines[0]


def test_missing_testset_is_one_error_line(tmp_path):
    line = _one_error_line(_script("main_test_fbcnn_color.py", "--model", "jpeg", "--testset",
                                   "NoSuchSet", "--results", str(tmp_path)))
    assert "NoSuchSet" in line and "LIVE1_color" in line


def test_a_public_testset_not_in_the_repository_says_where_it_comes_from(tmp_path):
    line = _one_error_line(_script("main_test_fbcnn_color.py", "--model", "jpeg", "--testset",
                                   "BSDS500_color", "--testsets-root", str(tmp_path),
                                   "--results", str(tmp_path / "r")))
    assert f"no folder {tmp_path / 'BSDS500_color'}" in line and "holds no test sets" in line
    assert "berkeley.edu" in line and "--testsets-root" in line


def test_a_file_as_results_folder_is_one_error_line(tmp_path):
    (tmp_path / "afile").write_text("not a folder")
    line = _one_error_line(_script("main_test_fbcnn_gray.py", "--model", "jpeg", "--qf", "10",
                                   "--results", str(tmp_path / "afile")))
    assert str(tmp_path / "afile") in line and "a file of that name is in the way" in line


def test_an_empty_results_folder_is_one_error_line(tmp_path):
    line = _one_error_line(_script("main_test_fbcnn_gray.py", "--model", "jpeg", "--qf", "10",
                                   "--results", ""))
    assert line.startswith("error: --results '': give a folder")


def test_unknown_model_is_one_error_line(tmp_path):
    line = _one_error_line(_script("main_test_fbcnn_gray.py", "--model", "fbcnn_grey",
                                   "--results", str(tmp_path)))
    assert "fbcnn_grey" in line and "fbcnn_gray" in line


def test_corrupt_checkpoint_is_one_error_line(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    line = _one_error_line(_script("main_test_fbcnn_gray.py", "--model", str(bad),
                                   "--results", str(tmp_path)))
    assert line.startswith(f"error: --model: {bad}: ")  # the flag and the file


def test_gray_model_on_colour_set_is_one_error_line(tmp_path, tiny_models):
    line = _one_error_line(_script("main_test_fbcnn_color.py", "--model", str(tiny_models[1]),
                                   "--results", str(tmp_path)))
    assert "grayscale" in line and "main_test_fbcnn_gray.py" in line


def test_bad_quality_factor_is_rejected(tmp_path):
    out = _script("main_test_fbcnn_gray.py", "--model", "jpeg", "--qf", "0",
                  "--results", str(tmp_path))
    assert out.returncode == 2 and "0 is not in 1..100 (the JPEG quality range)" in out.stderr
    assert "Traceback" not in out.stderr


def test_defaults_are_the_originals():
    from runners.evaluation import build_parser
    color = build_parser(COLOR).parse_args([])
    assert (color.testset, color.model, color.qf) == ("LIVE1_color", "fbcnn_color",
                                                      list(range(10, 100, 10)))
    gray = build_parser(GRAY).parse_args([])
    assert (gray.testset, gray.model) == ("Classic5", "fbcnn_gray")
    double = build_parser(GRAY_DOUBLE).parse_args([])
    assert (double.testset, double.qf1, double.qf2, double.shift) == (
        "LIVE1_gray", [10, 30, 50], [10, 30, 50], 4)
    real = build_parser(COLOR_REAL).parse_args([])
    assert (real.testset, real.qf_control) == ("Real", [5, 10, 30, 50, 70, 90])
    # the settings object a benchmark builds has the same defaults as the flags give
    for preset in (COLOR, GRAY, GRAY_DOUBLE, COLOR_REAL):
        flags = EvalSettings.from_args(preset, build_parser(preset).parse_args([]))
        built = EvalSettings.of(preset)
        mode = {"single": "qf", "double": "qf1", "real": "qf_control"}[preset.mode]
        assert (flags.model, flags.testset, list(getattr(flags, mode)), flags.speed) == (
            built.model, built.testset, list(getattr(built, mode)), built.speed)


def test_a_run_from_settings_names_its_rows_once_and_stays_off_stdout(tmp_path, small_set,
                                                                      tiny_models, capsys):
    """x8 and projection rows get their suffixes when made (nothing renamed after); with
    console off the lines go to the log alone."""
    settings = EvalSettings.of(COLOR, model=str(tiny_models[3]), testset=str(small_set),
                               qf=(20,), device="cpu", results=str(tmp_path),
                               save_images=False, projection=True, console=False,
                               speed={"x8": True})
    (summary,) = run(COLOR, settings)
    assert (summary["qf"], summary["x8"], summary["projection"]) == (20, True, True)
    assert capsys.readouterr().out == ""
    log = next(tmp_path.glob("*.log")).read_text()
    assert "Average PSNR/SSIM/PSNRB - small_tiny3_qf20_x8_proj -: " in log


def test_testsets_are_copies_of_shared(testsets_dir):
    """Every file of the repository's test sets, and nothing else, has the SHA-256 recorded from
    the shared copies (tests/reference/testsets.sha256)."""
    with open(os.path.join(REFERENCE, "testsets.sha256"), encoding="utf-8") as f:
        recorded = dict(reversed(line.rstrip("\n").split("  ", 1)) for line in f)
    assert len(recorded) == 5 + 29 + 29 + 6
    ours = {}
    for name in sorted(os.listdir(testsets_dir)):
        for file in sorted(os.listdir(os.path.join(testsets_dir, name))):
            with open(os.path.join(testsets_dir, name, file), "rb") as f:
                ours[f"{name}/{file}"] = hashlib.sha256(f.read()).hexdigest()
    assert sorted(ours) == sorted(recorded)
    for path, digest in recorded.items():
        assert ours[path] == digest, f"testsets/{path} differs from the shared copy"


def test_scripts_are_thin():
    for name in ("main_test_fbcnn_color.py", "main_test_fbcnn_gray.py",
                 "main_test_fbcnn_gray_doublejpeg.py", "main_test_fbcnn_color_real.py"):
        with open(os.path.join(REPO_ROOT, name)) as f:
            code = [line for line in f if line.strip() and not line.startswith((" ", '"', "#"))]
        assert len(code) <= 4, name


def test_images_sharing_a_name_each_keep_their_result(tmp_path, testsets_dir, tiny_models):
    folder = tmp_path / "set"
    folder.mkdir()
    img = imread_uint(os.path.join(testsets_dir, "LIVE1_color", "monarch.png"), 3)
    imwrite(str(folder / "dup.png"), img[:40, :48])
    imwrite(str(folder / "dup.bmp"), img[40:80, :48])
    imwrite(str(folder / "other.png"), img[80:120, :48])
    assert main(COLOR, ["--model", str(tiny_models[3]), "--testset", str(folder), "--qf", "30",
                        "--results", str(tmp_path / "res"), "--device", "cpu"]) == 0
    out = tmp_path / "res" / "set_tiny3_qf30"
    assert sorted(os.listdir(out)) == ["dup.bmp.png", "dup.png.png", "other.png"]
    assert not np.array_equal(imread_uint(str(out / "dup.bmp.png"), 3),
                              imread_uint(str(out / "dup.png.png"), 3))
    assert "images sharing a name keep their extension" in (
        tmp_path / "res" / "set_tiny3.log").read_text()


def test_double_jpeg_skips_images_the_shift_would_empty(tmp_path, testsets_dir):
    folder = tmp_path / "gray"
    folder.mkdir()
    img = imread_uint(os.path.join(testsets_dir, "LIVE1_gray", "monarch.png"), 1)
    imwrite(str(folder / "big.png"), img[:40, :40])
    imwrite(str(folder / "tiny.png"), img[:4, :9])
    path = tmp_path / "r.json"
    assert main(GRAY_DOUBLE, ["--model", "jpeg", "--testset", str(folder), "--qf1", "10",
                              "--qf2", "30", "--json", str(path),
                              "--results", str(tmp_path / "res")]) == 0
    (summary,) = json.loads(path.read_text())
    assert summary["n_images"] == 1 and summary["skipped"] == ["tiny.png"]
    assert "skipped tiny.png: smaller than 5x5" in (tmp_path / "res" / "gray_jpeg.log").read_text()


def test_images_too_small_for_ssim_still_average(tmp_path, testsets_dir, capsys):
    folder = tmp_path / "tiny"
    folder.mkdir()
    img = imread_uint(os.path.join(testsets_dir, "LIVE1_color", "monarch.png"), 3)
    imwrite(str(folder / "a.png"), img[:7, :9])
    path = tmp_path / "r.json"
    assert main(COLOR, ["--model", "jpeg", "--testset", str(folder), "--qf", "10", "--json",
                        str(path), "--results", str(tmp_path / "res")]) == 0
    out, err = capsys.readouterr()
    (summary,) = json.loads(path.read_text())
    assert summary["ssim"] is None and summary["psnr"] > 0
    assert "Logging error" not in err
    assert f"Average PSNR/SSIM/PSNRB - tiny_jpeg_qf10 -: {summary['psnr']:.2f}|-|" in out


def test_infinite_averages_are_null_in_strict_json(tmp_path):
    folder = tmp_path / "flat"
    folder.mkdir()
    imwrite(str(folder / "grey.png"), np.full((32, 32), 128, np.uint8))
    path = tmp_path / "r.json"
    assert main(GRAY, ["--model", "jpeg", "--testset", str(folder), "--qf", "90", "--json",
                       str(path), "--results", str(tmp_path / "res")]) == 0
    assert "PSNR: inf dB" in (tmp_path / "res" / "flat_jpeg.log").read_text()

    def refuse(name):
        raise ValueError(f"not strict JSON: {name}")

    (summary,) = json.loads(path.read_text(), parse_constant=refuse)
    assert summary["psnr"] is None and summary["ssim"] == 1.0


def test_the_runner_logs_automatic_tiling(tmp_path, small_set, tiny_models, monkeypatch):
    import models.inference
    monkeypatch.setitem(models.inference.CPU_PLANS, 16, models.inference.CpuPlan(512, 0.001, 0))
    assert main(COLOR, ["--model", str(tiny_models[3]), "--testset", str(small_set), "--qf",
                        "20", "--results", str(tmp_path / "res"), "--device", "cpu"]) == 0
    log = (tmp_path / "res" / "small_tiny3.log").read_text()
    assert "61x45 image is over 0.0 megapixels: tiling it" in log
    assert not logging.getLogger("fbcnn").handlers  # only for the run's length


@pytest.mark.parametrize("where", ["folder", "below_a_file"])
def test_a_json_path_that_cannot_be_written_fails_before_the_work(tmp_path, small_set, where,
                                                                  monkeypatch, capsys):
    (tmp_path / "afile").write_text("x")
    path = {"folder": tmp_path, "below_a_file": tmp_path / "afile" / "r.json"}[where]
    monkeypatch.setattr(evaluation, "restore_consistent", None)  # never reached
    assert main(COLOR, ["--model", "jpeg", "--testset", str(small_set), "--json", str(path),
                        "--results", str(tmp_path / "res")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "res").exists()


def test_a_model_whose_output_channels_differ_is_one_error_line(tmp_path):
    path = tmp_path / "odd.pth"
    torch.save(FBCNN(in_nc=3, out_nc=1, nc=[8, 16, 32, 64], nb=1).state_dict(), path)
    line = _one_error_line(_script("main_test_fbcnn_color.py", "--model", str(path),
                                   "--results", str(tmp_path)))
    assert "takes 3 channels but returns 1" in line
