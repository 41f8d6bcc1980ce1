"""Robustness of whole runs (docs/robustness.md): a test set full of bad files, bad training
images, a full disk under the runner and under checkpoints, NaN losses, crafted weight files."""
import json
import os
import re
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

import main_train_fbcnn
from models import model_fbcnn as model_module
from models.model_fbcnn import ModelFBCNN, NonFiniteLossError
from models.network_fbcnn import FBCNN
from runners import evaluation
from runners.evaluation import COLOR, GRAY, main
from runners.train_options import load_options
from runners.training import train
from tests.conftest import REPO_ROOT
from tests.test_image import IMG, _encode, _FullDisk, _png_claiming
from utils import checkpoint as ckpt
from utils import fileio
from utils.errors import UserError
from utils.fileio import WriteError
from utils.image import imread_uint

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    folder = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    paths = {}
    for channels in (1, 3):
        paths[channels] = str(folder / f"tiny{channels}.pth")
        torch.save(FBCNN(in_nc=channels, out_nc=channels, nc=[8, 16, 32, 64], nb=1).state_dict(),
                   paths[channels])
    return paths


GOOD = {"rgb.png": IMG.shape, "one.png": (1, 1, 3), "odd.jpg": (7, 9, 3), "deep16.png": IMG.shape,
        "alpha.png": IMG.shape}
BAD = {"empty.png": "empty file (0 bytes)", "cut.jpg": "truncated JPEG file (no EOI marker)",
       "noise.jpg": "not an image OpenCV can decode",
       "bomb.png": "the PNG header claims 30000x30000 = 900,000,000 pixels"}


@pytest.fixture(scope="module")
def bad_set(tmp_path_factory):
    """A test set mixing every kind of bad file with small but valid unusual images."""
    folder = tmp_path_factory.mktemp("bad_set")
    jpeg = _encode(".jpg", IMG)
    rgba = np.dstack([cv2.cvtColor(IMG, cv2.COLOR_RGB2BGR), np.full(IMG.shape[:2], 7, np.uint8)])
    files = {"rgb.png": _encode(".png", IMG), "one.png": _encode(".png", IMG[:1, :1]),
             "odd.jpg": _encode(".jpg", IMG[:7, :9]),
             "deep16.png": _encode(".png", IMG.astype(np.uint16) * 257),
             "alpha.png": cv2.imencode(".png", rgba)[1].tobytes(),
             "empty.png": b"", "cut.jpg": jpeg[:len(jpeg) // 2],
             "noise.jpg": np.random.default_rng(3).bytes(3000),
             "bomb.png": _png_claiming(30000, 30000)}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


def _outputs(folder):
    return sorted(n for n in os.listdir(folder))


def test_runner_reports_each_bad_file_and_restores_the_rest(bad_set, tiny_weights, tmp_path,
                                                           capsys):
    results, summary_path = tmp_path / "res", tmp_path / "r.json"
    code = main(COLOR, ["--model", tiny_weights[3], "--testset", str(bad_set), "--qf", "20",
                        "--json", str(summary_path), "--results", str(results)])
    out = capsys.readouterr()
    assert code == 0, out.err
    (summary,) = json.loads(summary_path.read_text())
    assert summary["n_images"] == len(GOOD)
    assert summary["skipped"] == sorted(BAD)
    for name, reason in BAD.items():
        assert f"skipped {bad_set}/{name}: {reason}" in out.out, name
    written = results / f"{bad_set.name}_tiny3_qf20"
    assert _outputs(written) == sorted(os.path.splitext(n)[0] + ".png" for n in GOOD)
    for name, shape in GOOD.items():
        restored = imread_uint(os.path.join(written, os.path.splitext(name)[0] + ".png"), 3)
        assert restored.shape == shape
    assert not [n for n in os.listdir(results) if fileio.is_temporary_name(n)]


@pytest.fixture
def set_with_a_folder(tmp_path):
    folder = tmp_path / "set"
    (folder / "folder.png").mkdir(parents=True)  # a folder named like an image
    (folder / "rgb.png").write_bytes(_encode(".png", IMG))
    return folder


def test_runner_goes_on_past_a_folder_named_like_an_image(set_with_a_folder, tiny_weights,
                                                          tmp_path):
    summary_path = tmp_path / "r.json"
    assert main(COLOR, ["--model", tiny_weights[3], "--testset", str(set_with_a_folder),
                        "--qf", "20", "--json", str(summary_path),
                        "--results", str(tmp_path / "res")]) == 0
    assert json.loads(summary_path.read_text())[0]["n_images"] == 1
    assert os.listdir(tmp_path / "res" / "set_tiny3_qf20") == ["rgb.png"]


def test_runner_reports_a_folder_named_like_an_image(set_with_a_folder, tiny_weights, tmp_path,
                                                     capsys):
    summary_path = tmp_path / "r.json"
    assert main(COLOR, ["--model", tiny_weights[3], "--testset", str(set_with_a_folder),
                        "--qf", "20", "--json", str(summary_path),
                        "--results", str(tmp_path / "res")]) == 0
    assert (f"skipped {set_with_a_folder}/folder.png: a folder, not an image file" in
            capsys.readouterr().out)
    assert json.loads(summary_path.read_text())[0]["skipped"] == ["folder.png"]


def test_runner_restores_a_file_whose_name_is_not_utf8(bad_set, tiny_weights, tmp_path, capsys):
    folder = tmp_path / "set"
    folder.mkdir()
    for name, data in ((b"caf\xe9.png", _encode(".png", IMG)), (b"bad\xff.jpg", b"\xff\xd8 no")):
        with open(os.path.join(os.fsencode(folder), name), "wb") as f:
            f.write(data)
    summary_path = tmp_path / "r.json"
    code = main(COLOR, ["--model", tiny_weights[3], "--testset", str(folder), "--qf", "20",
                        "--json", str(summary_path), "--results", str(tmp_path / "res")])
    out = capsys.readouterr().out
    assert code == 0 and "caf\\xe9.png - PSNR" in out
    assert f"skipped {folder}/bad\\xff.jpg: not an image OpenCV can decode" in out
    assert os.listdir(tmp_path / "res" / "set_tiny3_qf20") == ["caf\udce9.png"]
    (summary,) = json.loads(summary_path.read_text())
    assert summary["n_images"] == 1 and summary["skipped"] == ["bad\udcff.jpg"]


def test_tiny_images_leave_the_average_ssim_defined(bad_set, tiny_weights, tmp_path):
    summary_path = tmp_path / "r.json"
    assert main(COLOR, ["--model", tiny_weights[3], "--testset", str(bad_set), "--qf", "20",
                        "--json", str(summary_path), "--no-save-images",
                        "--results", str(tmp_path / "res")]) == 0
    (summary,) = json.loads(summary_path.read_text())
    assert 0 < summary["ssim"] <= 1


def test_gray_runner_on_the_same_set(bad_set, tiny_weights, tmp_path, capsys):
    summary_path = tmp_path / "r.json"
    assert main(GRAY, ["--model", tiny_weights[1], "--testset", str(bad_set), "--qf", "30",
                       "--json", str(summary_path), "--results", str(tmp_path / "res"),
                       "--workers", "0"]) == 0
    (summary,) = json.loads(summary_path.read_text())
    assert summary["n_images"] == len(GOOD) and summary["skipped"] == sorted(BAD)
    written = tmp_path / "res" / f"{bad_set.name}_tiny1_qf30"
    assert imread_uint(str(written / "one.png"), 1).shape == (1, 1)
    assert imread_uint(str(written / "odd.png"), 1).shape == (7, 9)


def test_runner_full_disk_is_one_error_line_and_no_partial_file(bad_set, tiny_weights, tmp_path,
                                                                monkeypatch, capsys):
    monkeypatch.setattr(fileio, "open", _FullDisk(100, free_files=2), raising=False)
    results, summary_path = tmp_path / "res", tmp_path / "r.json"
    code = main(COLOR, ["--model", tiny_weights[3], "--testset", str(bad_set), "--qf", "20",
                        "--results", str(results), "--json", str(summary_path), "--workers", "0"])
    err = capsys.readouterr().err
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err
    written = results / f"{bad_set.name}_tiny3_qf20"
    third = sorted(GOOD)[2]  # the images are restored and written in name order
    assert lines[0] == (f"error: {written / os.path.splitext(third)[0]}.png: cannot write (No "
                        f"space left on device); the file was not written or keeps its previous "
                        f"content")
    assert _outputs(written) == sorted(os.path.splitext(n)[0] + ".png" for n in sorted(GOOD)[:2])
    for name in sorted(GOOD)[:2]:  # the two written before the disk filled are whole
        path = os.path.join(written, os.path.splitext(name)[0] + ".png")
        assert imread_uint(path, 3).shape == GOOD[name]
    assert not summary_path.exists()


def test_runner_full_disk_on_the_summary_is_one_error_line(bad_set, tiny_weights, tmp_path,
                                                           monkeypatch, capsys):
    full = _FullDisk(10)
    monkeypatch.setattr(fileio, "open", full, raising=False)
    monkeypatch.setattr(evaluation, "open", full, raising=False)
    code = main(COLOR, ["--model", tiny_weights[3], "--testset", str(bad_set), "--qf", "20",
                        "--no-save-images", "--results", str(tmp_path / "res"),
                        "--json", str(tmp_path / "out" / "r.json")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"error: {tmp_path / 'out' / 'r.json'}: cannot write")
    assert os.listdir(tmp_path / "out") == []


def _training_options(tmp_path, train_dir, **train):
    test_images = tmp_path / "val"
    test_images.mkdir(exist_ok=True)
    cv2.imwrite(str(test_images / "v.png"), cv2.cvtColor(IMG, cv2.COLOR_RGB2BGR))
    opt = {"task": "t", "gpu_ids": [], "path": {"root": str(tmp_path / "runs")},
           "datasets": {"train": {"dataset_type": "jpeg", "H_size": 16,
                                  "dataloader_batch_size": 2, "dataloader_num_workers": 0,
                                  "dataroot_H": str(train_dir)},
                        "test": {"dataset_type": "jpeg", "dataroot_H": str(test_images)}},
           "netG": {"nc": [8, 16, 32, 64], "nb": 1},
           "train": {"total_iter": 4, "checkpoint_print": 1, "checkpoint_save": 2,
                     "checkpoint_test": 4, "manual_seed": 1, **train}}
    path = tmp_path / "opt.json"
    path.write_text(json.dumps(opt))
    return str(path)


@pytest.fixture
def train_dir(tmp_path):
    folder = tmp_path / "train"
    folder.mkdir()
    for i in range(3):
        cv2.imwrite(str(folder / f"im{i}.png"), np.roll(IMG, 5 * i, axis=1))
    return folder


@pytest.mark.parametrize("name,data,message", [
    ("zz_empty.png", b"", r"zz_empty\.png: empty file \(0 bytes\)"),
    ("zz_noise.jpg", b"\x00" * 50, r"zz_noise\.jpg: not a PNG, JPEG, BMP"),
    ("zz_bomb.png", _png_claiming(30000, 30000), r"zz_bomb\.png: the PNG header claims"),
    ("zz_small.png", _encode(".png", IMG[:20, :20]), r"zz_small\.png: 20x20 pixels is smaller "
                                                     r"than the 24x24 crop that H_size 16 needs"),
])
def test_bad_training_image_stops_before_any_work(tmp_path, train_dir, capsys, name, data,
                                                  message):
    (train_dir / name).write_bytes(data)
    assert main_train_fbcnn.main(["-opt", _training_options(tmp_path, train_dir)]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and re.search(message, lines[0]), err
    assert "Traceback" not in err
    assert not os.path.exists(tmp_path / "runs" / "t" / "models")


def test_image_that_fails_to_decode_mid_run_costs_one_image(tmp_path, train_dir, caplog):
    jpeg = _encode(".jpg", IMG)
    (train_dir / "im1.png").unlink()
    (train_dir / "im1.jpg").write_bytes(jpeg[:len(jpeg) - 2])  # header fine, truncated
    result = train(load_options(_training_options(tmp_path, train_dir)))
    assert result == {"start": 0, "end": 4}
    warnings = [r.getMessage() for r in caplog.records if "im1.jpg" in r.getMessage()]
    assert warnings and "truncated JPEG file" in warnings[0]
    assert "next readable image in its place" in warnings[0]
    assert ckpt.complete_checkpoints(str(tmp_path / "runs" / "t" / "models")) == [2, 4]


def _nan_on_calls(monkeypatch, calls):
    """Make the image loss NaN on the given (1-based) calls of any loss function."""
    real = model_module.image_loss
    counter = {"n": 0}

    def image_loss(kind):
        loss = real(kind)

        def patched(x, y):
            counter["n"] += 1
            value = loss(x, y)
            return value * float("nan") if counter["n"] in calls else value
        return patched

    monkeypatch.setattr(model_module, "image_loss", image_loss)


def test_nan_loss_skips_the_update_with_a_warning(tmp_path, train_dir, caplog):
    opt = load_options(_training_options(tmp_path, train_dir))
    torch.manual_seed(0)
    model = ModelFBCNN(opt, torch.device("cpu"))
    H = torch.from_numpy(IMG[:16, :16].transpose(2, 0, 1).copy())[None].repeat(2, 1, 1, 1)
    model.feed_data({"H": H, "L": H, "qf": torch.tensor([[0.5], [0.5]])})
    before = {k: v.clone() for k, v in model.bare.state_dict().items()}
    adam_before = len(model.G_optimizer.state)
    model.H[0, 0, 0, 0] = float("nan")
    logs = model.optimize_parameters(1)
    assert torch.isnan(logs["loss"]) and model.nonfinite_streak == 1
    assert all(torch.equal(before[k], v) for k, v in model.bare.state_dict().items())
    assert len(model.G_optimizer.state) == adam_before == 0  # Adam took no step
    assert "iteration 1: non-finite loss (loss nan" in caplog.text
    model.H[0, 0, 0, 0] = float("inf")
    model.optimize_parameters(2)
    assert model.nonfinite_streak == 2 and "iteration 2: non-finite loss" in caplog.text
    model.H[0, 0, 0, 0] = 0.5
    model.optimize_parameters(3)  # finite: updates, and the streak starts again
    assert model.nonfinite_streak == 0 and model.skipped_steps == 2
    assert not torch.equal(before["m_head.weight"], model.bare.state_dict()["m_head.weight"])


def test_repeated_nan_losses_stop_the_run_with_one_error_line(tmp_path, train_dir, monkeypatch,
                                                             capsys):
    _nan_on_calls(monkeypatch, calls={2, 4, 5, 6})
    options = _training_options(tmp_path, train_dir, max_nonfinite_steps=3, total_iter=8,
                                checkpoint_test=100)
    assert main_train_fbcnn.main(["-opt", options]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert lines == ["error: train.max_nonfinite_steps: the loss was NaN or infinite in 3 "
                     "consecutive iterations (4 to 6); stopping. The network was not updated "
                     "by them; restarting resumes from the last complete checkpoint. Check the "
                     "training images, or lower train.G_optimizer_lr, or use train.precision "
                     "\"fp32\" if it is fp16"]
    assert "iteration 2: non-finite loss" in err and "(1 in a row" in err
    assert "iteration 6: non-finite loss" in err and "(3 in a row" in err
    assert ckpt.complete_checkpoints(str(tmp_path / "runs" / "t" / "models")) == [2, 4]
    assert issubclass(NonFiniteLossError, UserError)


_NAN_ON_RANK0 = """
import os, sys
import models.model_fbcnn as model_module
real, calls = model_module.image_loss, []
def image_loss(kind):
    loss = real(kind)
    def patched(x, y):
        calls.append(1)
        nan = os.environ["RANK"] == "0" and len(calls) == 2
        return loss(x, y) * float("nan") if nan else loss(x, y)
    return patched
model_module.image_loss = image_loss
import main_train_fbcnn
sys.exit(main_train_fbcnn.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_nan_loss_on_one_process_is_skipped_by_all(tmp_path, train_dir):
    """DDP: every process must skip the same iteration, or the gradient all-reduce hangs."""
    script = tmp_path / "nan_on_rank0.py"
    script.write_text(_NAN_ON_RANK0)
    options = _training_options(tmp_path, train_dir, checkpoint_test=100)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO_ROOT}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node", "2", str(script), "-opt", options],
                         env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "iteration 2: non-finite loss (loss nan" in out.stderr  # rank 0
    assert "iteration 2: non-finite loss on another process" in out.stderr  # rank 1
    assert out.stderr.count("non-finite loss") == 2
    assert out.stderr.count("parameters identical on all 2 processes") == 2  # at 2 and at 4
    assert ckpt.complete_checkpoints(str(tmp_path / "runs" / "t" / "models")) == [2, 4]


def test_full_disk_during_a_checkpoint_keeps_the_previous_one(tmp_path, train_dir, monkeypatch):
    models = str(tmp_path / "models")
    net = {"w": torch.arange(1000, dtype=torch.float32)}
    ckpt.save_checkpoint(models, 2, net, {"iteration": 2})
    before = {n: open(os.path.join(models, n), "rb").read() for n in os.listdir(models)}
    for room in (100, 5000):  # fails in the network file, then in the state file
        monkeypatch.setattr(fileio, "open", _FullDisk(room), raising=False)
        with pytest.raises(WriteError) as err:
            ckpt.save_checkpoint(models, 4, {"w": torch.zeros(1000)}, {"iteration": 4,
                                                                        "big": torch.zeros(4000)})
        monkeypatch.undo()
        assert "No space left on device" in str(err.value) and "4_" in str(err.value)
        assert ckpt.complete_checkpoints(models) == [2]
        assert not [n for n in os.listdir(models) if fileio.is_temporary_name(n)]
        assert {n: open(os.path.join(models, n), "rb").read()
                for n in os.listdir(models) if n.startswith("2_")} == before
    net_state, state = ckpt.load_training_state(models, 2)
    assert torch.equal(net_state["w"], net["w"]) and state["iteration"] == 2


@pytest.mark.slow
def test_training_on_a_full_disk_stops_with_one_line_and_resumes(tmp_path, train_dir):
    """A real kernel refusal: the file size limit (RLIMIT_FSIZE) fails the 2nd checkpoint's
    network file mid-write; the run stops, then resumes from checkpoint 2 once there is room."""
    options = _training_options(tmp_path, train_dir, checkpoint_test=100)
    models = tmp_path / "runs" / "t" / "models"
    code = ("import resource, signal, sys\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            "from utils import checkpoint\n"
            "save = checkpoint.save_checkpoint\n"
            "def limited(models_dir, iteration, *args, **kwargs):\n"
            "    if iteration == 4:\n"
            "        resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))\n"
            "    return save(models_dir, iteration, *args, **kwargs)\n"
            "checkpoint.save_checkpoint = limited\n"
            "import main_train_fbcnn\n"
            "sys.exit(main_train_fbcnn.main(sys.argv[1:]))\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO_ROOT}
    out = subprocess.run([sys.executable, "-c", code, "-opt", options], env=env, cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "4_G.safetensors: cannot write (File too large)" in errors[0]
    assert "Traceback" not in out.stderr
    assert ckpt.complete_checkpoints(str(models)) == [2]
    assert sorted(os.listdir(models)) == ["2_G.safetensors", "2_done.json", "2_state.pth"]
    resumed = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "main_train_fbcnn.py"),
                              "-opt", options], env=env, cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from iteration 2" in resumed.stderr
    assert ckpt.complete_checkpoints(str(models)) == [2, 4]
