"""Tests of the training half: runners/training.py, models/model_fbcnn.py, models/select_network.py,
utils/checkpoint.py, utils/dist.py and main_train_fbcnn.py, on tiny networks and images (CPU)."""
import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import default_collate

import main_train_fbcnn
from data.dataset_jpeg import IterationBatchSampler, define_dataset
from data.jpeg import jpeg
from models.inference import restore
from models.loss_ssim import SSIMLoss
from models.model_fbcnn import ModelFBCNN, masked_qf_loss, regularizer_clip
from models.model_zoo import (LoadedModel, build_from_state_dict, infer_fbcnn_kwargs, load_model,
                              load_state_dict_file, read_fbcnn_kwargs)
from models.network_fbcnn import FBCNN
from models.select_network import define_G, init_weights, merge_bn, net_act_mode
from runners.train_options import load_options
from runners.training import train
from utils import checkpoint as ckpt
from utils.checkpoint import save_network
from utils.cpu import native_bf16
from utils.dist import DistInfo
from utils.errors import UserError
from utils.image import imread_uint
from utils.logger import progress_bar
from utils.metrics import psnr, psnrb, ssim

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN = os.path.join(ROOT, "main_train_fbcnn.py")
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}


pytestmark = pytest.mark.usefixtures("one_thread")


def _write_images(folder, count, shape, seed):
    folder.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(count):
        img = cv2.GaussianBlur((rng.random(shape) * 255).astype(np.uint8), (5, 5), 1.5)
        cv2.imwrite(str(folder / f"im{i}.png"), img)
    return str(folder)


@pytest.fixture(scope="module")
def option_file(tmp_path_factory):
    """A tiny colour run: nc [8,16,32,64], nb 1, 16x16 patches, batch 4, lr halved after 3."""
    base = tmp_path_factory.mktemp("train")
    opt = {
        "task": "tiny", "gpu_ids": [],
        "path": {"root": str(base / "runs")},
        "datasets": {
            "train": {"dataset_type": "jpeg", "H_size": 16, "dataloader_batch_size": 4,
                      "dataloader_num_workers": 0,
                      "dataroot_H": _write_images(base / "train", 6, (40, 48, 3), 1)},
            "test": {"dataset_type": "jpeg", "name": "tinytest",
                     "dataroot_H": _write_images(base / "test", 2, (24, 32, 3), 2)}},
        "netG": {"nc": [8, 16, 32, 64], "nb": 1, "act_mode": "R"},
        "train": {"G_optimizer_lr": 1e-3, "G_scheduler_milestones": [3], "total_iter": 6,
                  "checkpoint_print": 1, "checkpoint_save": 2, "checkpoint_test": 3,
                  "manual_seed": 11}}
    path = base / "tiny.json"
    path.write_text("// tiny test run\n" + json.dumps(opt, indent=1))
    return str(path)


def _run(option_file, root, *overrides):
    return train(load_options(option_file, [f"path.root={root}", *overrides]))


def _records(run_dir, kind):
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [r for r in map(json.loads, f) if r["kind"] == kind]


def _losses(run_dir):
    return [(r["iter"], r["loss"]) for r in _records(run_dir, "train")]


def _log(run_dir):
    with open(os.path.join(run_dir, "train.log"), encoding="utf-8") as f:
        return f.read()


@pytest.fixture(scope="module")
def reference_run(option_file, tmp_path_factory):
    """The uninterrupted 6-iteration run every other run is compared with."""
    root = tmp_path_factory.mktemp("reference")
    assert _run(option_file, root) == {"start": 0, "end": 6}
    return os.path.join(root, "tiny")


def test_smoke_run_writes_checkpoints_logs_and_validation(reference_run):
    models = os.path.join(reference_run, "models")
    assert ckpt.complete_checkpoints(models) == [2, 4, 6]
    losses = _losses(reference_run)
    assert [i for i, _ in losses] == [1, 2, 3, 4, 5, 6]
    assert all(np.isfinite(v) for _, v in losses)
    lrs = [r["lr"] for r in _records(reference_run, "train")]
    assert lrs == pytest.approx([1e-3, 1e-3, 5e-4, 5e-4, 5e-4, 5e-4])
    tests = _records(reference_run, "test")
    assert [r["iter"] for r in tests] == [3, 6]
    avg = tests[-1]["average"]
    assert set(avg) >= {"psnr", "ssim", "psnrb", "qf", "jpeg_psnr"} and avg["jpeg_psnr"] > 20
    assert len(tests[-1]["images"]) == 2
    assert os.path.isfile(os.path.join(reference_run, "images", "im0", "im0_6.png"))
    log = _log(reference_run)
    assert "starting from scratch" in log and "tinytest at QF 10: Average PSNR" in log
    assert os.listdir(os.path.join(reference_run, "options"))


def test_tensorboard_holds_the_logged_losses_and_validation(reference_run):
    """The run's tensorboard/ folder, read with TensorBoard's own reader, has the losses of
    metrics.jsonl at their iterations and the validation averages."""
    events = EventAccumulator(os.path.join(reference_run, "tensorboard"),
                              size_guidance={"scalars": 0})
    events.Reload()
    assert {"train/loss", "train/G_loss", "train/QF_loss", "train/lr", "test/psnr",
            "test/ssim", "test/qf"} <= set(events.Tags()["scalars"])
    logged = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert logged == [(i, pytest.approx(v, rel=1e-6)) for i, v in _losses(reference_run)]
    tests = _records(reference_run, "test")
    assert [(e.step, e.value) for e in events.Scalars("test/psnr")] == [
        (r["iter"], pytest.approx(r["average"]["psnr"], rel=1e-6)) for r in tests]


def test_resume_continues_with_identical_losses(option_file, reference_run, tmp_path):
    assert _run(option_file, tmp_path, "train.total_iter=4") == {"start": 0, "end": 4}
    assert _run(option_file, tmp_path) == {"start": 4, "end": 6}
    run_dir = os.path.join(tmp_path, "tiny")
    assert "resuming from iteration 4" in _log(run_dir)
    assert _losses(run_dir) == _losses(reference_run)  # exact equality, lr drop included
    resumed = load_state_dict_file(os.path.join(run_dir, "models", "6_G.safetensors"))
    reference = load_state_dict_file(os.path.join(reference_run, "models", "6_G.safetensors"))
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)


def test_should_end_ends_the_run_early_saved_like_total_iter(option_file, reference_run,
                                                           tmp_path):
    """`train(opt, should_end)`: asked before each iteration, true after 3 iterations; the run
    ends at 3 (not a checkpoint iteration: checkpoint_save is 2), saves it and returns, and a
    later start resumes from 3 with the uninterrupted run's losses."""
    asked = []

    def should_end():
        asked.append(1)
        return len(asked) > 3

    opt = load_options(option_file, [f"path.root={tmp_path}"])
    assert train(opt, should_end=should_end) == {"start": 0, "end": 3}
    run_dir = os.path.join(tmp_path, "tiny")
    assert ckpt.complete_checkpoints(os.path.join(run_dir, "models")) == [2, 3]
    assert "stopped at iteration 3 (asked to end early)" in _log(run_dir)
    assert _run(option_file, tmp_path) == {"start": 3, "end": 6}
    assert _losses(run_dir) == _losses(reference_run)


def test_saved_network_loads_like_the_test_scripts_and_matches_validation(option_file,
                                                                         reference_run):
    path = os.path.join(reference_run, "models", "6_G.safetensors")
    net = build_from_state_dict(load_state_dict_file(path), source=path)
    assert (net.nc, net.nb, net.in_nc) == ([8, 16, 32, 64], 1, 3)
    with safe_open(path, framework="pt") as f:
        assert f.metadata()["iteration"] == "6"
    assert read_fbcnn_kwargs(path) == {"in_nc": 3, "out_nc": 3, "nc": [8, 16, 32, 64], "nb": 1,
                                       "act_mode": "R", "downsample_mode": "strideconv",
                                       "upsample_mode": "convtranspose", "global_skip": False}
    loaded = load_model(path)
    assert all(torch.equal(loaded.net.state_dict()[k], v) for k, v in net.state_dict().items())
    first = load_state_dict_file(os.path.join(reference_run, "models", "2_G.safetensors"))
    assert not torch.equal(first["m_head.weight"], net.state_dict()["m_head.weight"])
    state = torch.load(os.path.join(reference_run, "models", "6_state.pth"), weights_only=True)
    assert state["iteration"] == 6 and json.loads(state["options"])["train"]["manual_seed"] == 11
    record = _records(reference_run, "test")[-1]
    test_dir = load_options(option_file)["datasets"]["test"]["dataroot_H"]
    for row in record["images"]:
        H = imread_uint(os.path.join(test_dir, f"{row['name']}.png"), 3)
        E, qf = restore(LoadedModel("tiny", net, 3), jpeg(H, 10))
        assert ((psnr(E, H), ssim(E, H), psnrb(E, H), qf) ==
                pytest.approx((row["psnr"], row["ssim"], row["psnrb"], row["qf"]), abs=1e-9))


@pytest.mark.parametrize("overrides,rel", [(["train.precision=bf16"], 3e-2),
                                           (["train.precision=tf32"], 0),  # fp32 on a CPU
                                           (["train.channels_last=true"], 1e-4),
                                           pytest.param(["train.compile=true"], 1e-4,
                                                        marks=pytest.mark.slow)])
def test_fast_paths_follow_fp32(option_file, reference_run, tmp_path, overrides, rel):
    compiled = torch._dynamo.utils.counters["frames"]["ok"]
    _run(option_file, tmp_path, "train.total_iter=3", "datasets.test=null", *overrides)
    if overrides == ["train.compile=true"]:  # frames compiled, not a silent eager fall-back
        assert torch._dynamo.utils.counters["frames"]["ok"] > compiled
    fast = _losses(os.path.join(tmp_path, "tiny"))
    ref = _losses(reference_run)[:3]
    assert [v for _, v in fast] == pytest.approx([v for _, v in ref], rel=rel)
    warned = "autocast is much slower than fp32" in _log(os.path.join(tmp_path, "tiny"))
    # these runs are on the CPU: bf16 is warned about only where it has no bf16 instructions
    assert warned == (overrides == ["train.precision=bf16"] and not any(native_bf16().values()))


@pytest.mark.slow
def test_ddp_with_batchnorm_finds_the_parameters_identical(option_file, tmp_path):
    """BatchNorm's running statistics differ between processes by design; the parameters do
    not (the check once compared the statistics too and reported an error at every save)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           MAIN, "-opt", option_file, "--set", f"path.root={tmp_path}", "--set",
           "netG.act_mode=BR", "--set", "train.total_iter=2", "--set", "datasets.test=null"]
    result = subprocess.run(cmd, env=SUBPROCESS_ENV, cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    log = _log(os.path.join(tmp_path, "tiny"))
    assert "parameters identical on all 2 processes" in log and "differ" not in log


def test_ddp_two_processes_with_gloo(option_file, reference_run, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           MAIN, "-opt", option_file, "--set", f"path.root={tmp_path}",
           "--set", "train.total_iter=2", "--set", "train.checkpoint_test=2"]
    result = subprocess.run(cmd, env=SUBPROCESS_ENV, cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = os.path.join(tmp_path, "tiny")
    log = _log(run_dir)
    assert "batch 4 on 2 process(es)" in log
    assert "parameters identical on all 2 processes" in log
    assert [i for i, _ in _losses(run_dir)] == [1, 2]  # rank 0 alone writes
    assert [v for _, v in _losses(run_dir)] == pytest.approx(
        [v for _, v in _losses(reference_run)[:2]], rel=1e-5)
    assert [r["iter"] for r in _records(run_dir, "test")] == [2]
    ddp = load_state_dict_file(os.path.join(run_dir, "models", "2_G.safetensors"))
    single = load_state_dict_file(os.path.join(reference_run, "models", "2_G.safetensors"))
    assert not any(k.startswith("module.") for k in ddp)
    for key, value in single.items():
        torch.testing.assert_close(ddp[key], value, rtol=1e-4, atol=1e-6)


def test_two_nodes_on_localhost_train_as_one_two_process_launch(option_file, tmp_path):
    """Two torchrun launches acting as two nodes (`--nnodes 2`, c10d rendezvous on 127.0.0.1,
    one process each) train as one launch of two processes: same losses, same weights."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = [MAIN, "-opt", option_file, "--set", "train.total_iter=2", "--set",
           "datasets.test=null"]
    node = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node",
            "1", "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}",
            "--rdzv_id", "fbcnn-two-nodes", *run, "--set", f"path.root={tmp_path / 'nodes'}"]
    nodes = [subprocess.Popen(node, env=SUBPROCESS_ENV, cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [proc.communicate(timeout=300) for proc in nodes]
    assert [proc.returncode for proc in nodes] == [0, 0], outputs[0][1][-3000:]
    one = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node", "2", *run, "--set", f"path.root={tmp_path / 'one'}"],
                         env=SUBPROCESS_ENV, cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    nodes_dir, one_dir = tmp_path / "nodes" / "tiny", tmp_path / "one" / "tiny"
    assert "batch 4 on 2 process(es)" in _log(str(nodes_dir))
    assert "parameters identical on all 2 processes" in _log(str(nodes_dir))
    assert _losses(str(nodes_dir)) == _losses(str(one_dir))
    a = load_state_dict_file(str(nodes_dir / "models" / "2_G.safetensors"))
    b = load_state_dict_file(str(one_dir / "models" / "2_G.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in b)


def _wait_for(predicate, timeout, proc):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.2)
    return False


# Runs main_train_fbcnn.py with os.replace patched to block before moving argv[1] into place,
# so the test can SIGKILL the process in the middle of a checkpoint (no hook in the product).
_PAUSE_BEFORE_REPLACE = """
import os, sys, time
real_replace = os.replace
def replace(src, dst, *args, **kwargs):
    if os.path.basename(os.fsdecode(dst)) == PAUSE_AT:
        sys.stderr.write("PAUSED before moving %s into place\\n" % os.fsdecode(dst))
        sys.stderr.flush()
        while True:
            time.sleep(1)
    return real_replace(src, dst, *args, **kwargs)
PAUSE_AT = sys.argv.pop(1)
os.replace = replace
import main_train_fbcnn
sys.exit(main_train_fbcnn.main(sys.argv[1:]))
"""


def test_sigkill_while_saving_resumes_from_last_complete_checkpoint(option_file, tmp_path):
    opt_args = ["-opt", option_file, "--set", f"path.root={tmp_path}",
                "--set", "train.manual_seed=null", "--set", "datasets.test=null"]
    run_dir = os.path.join(tmp_path, "tiny")
    models = os.path.join(run_dir, "models")
    err_path = tmp_path / "first.err"
    with open(err_path, "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", _PAUSE_BEFORE_REPLACE, "4_state.pth",
                                 *opt_args], env=SUBPROCESS_ENV, cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=err)
        try:
            paused = _wait_for(lambda: "PAUSED before moving" in err_path.read_text(), 180, proc)
            assert paused, err_path.read_text()[-3000:]
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert os.path.isfile(os.path.join(models, "4_G.safetensors"))  # in place, but no marker
    assert not os.path.exists(os.path.join(models, "4_state.pth"))
    assert any(n.startswith(".4_state.pth.tmp-") for n in os.listdir(models))
    assert ckpt.latest_checkpoint(models) == 2

    result = subprocess.run([sys.executable, MAIN, *opt_args], env=SUBPROCESS_ENV, cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    log = _log(run_dir)
    assert "resuming from iteration 2" in log and "removed 1 temporary file" in log
    assert ckpt.complete_checkpoints(models) == [2, 4, 6]
    assert not [n for n in os.listdir(models) if ".tmp-" in n]
    losses = _losses(run_dir)
    assert [i for i, _ in losses] == [1, 2, 3, 4, 3, 4, 5, 6]
    assert losses[2:4] == losses[4:6]  # redone iterations repeat exactly, with the stored seed


def test_options_are_validated_before_any_work(option_file, tmp_path, capsys):
    status = main_train_fbcnn.main(["-opt", option_file, "--set", f"path.root={tmp_path}",
                                    "--set", "datasets.train.dataroot_H=/no/such/folder"])
    assert status == 2
    assert ("datasets.train.dataroot_H: training folder '/no/such/folder' does not exist" in
            capsys.readouterr().err)
    assert os.listdir(tmp_path) == []


def test_a_missing_training_folder_says_where_training_images_come_from(tmp_path, capsys,
                                                                         monkeypatch):
    monkeypatch.chdir(tmp_path)  # the lite recipes' relative trainsets/train_pack is not here
    lite = os.path.join(ROOT, "options", "train_fbcnn_color_lite.json")
    assert main_train_fbcnn.main(["-opt", lite]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: {lite}: datasets.train.dataroot_H: training folder "
                           f"'trainsets/train_pack' does not exist (relative to {tmp_path}); ")
    assert "not in the repository" in line and "runners.prepare_subimages" in line
    assert "shared" not in line  # the message names only folders the user has
    assert line.endswith("--set datasets.train.dataroot_H=DIR")
    assert os.listdir(tmp_path) == []


def test_a_file_where_the_run_folder_should_be_is_one_error_line(option_file, tmp_path, capsys):
    blocker = tmp_path / "runs"
    blocker.write_text("not a folder")
    status = main_train_fbcnn.main(["-opt", option_file, "--set", f"path.root={blocker}"])
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err
    assert (f"error: {blocker}{os.sep}tiny: cannot create this folder ({blocker} is a file, "
            "not a folder)" in err)


def test_validation_with_no_readable_image_is_skipped_not_fatal(option_file, tmp_path, caplog):
    broken = tmp_path / "broken"
    broken.mkdir()
    ok, png = cv2.imencode(".png", np.full((24, 32, 3), 128, np.uint8))
    # a sound header (the start-up check passes) but no image data: unreadable at validation
    (broken / "cut.png").write_bytes(png.tobytes()[:40])
    with caplog.at_level(logging.WARNING):
        assert _run(option_file, tmp_path, "train.total_iter=3",
                    f"datasets.test.dataroot_H={broken}") == {"start": 0, "end": 3}
    assert "no image of" in caplog.text and "validation skipped" in caplog.text
    assert _records(os.path.join(tmp_path, "tiny"), "test") == []


def test_validation_keeps_same_named_images_of_two_subfolders_apart(option_file, tmp_path):
    test_dir = tmp_path / "set"
    test_dir.mkdir()
    _write_images(test_dir / "x", 1, (24, 32, 3), seed=1)
    _write_images(test_dir / "y", 1, (24, 32, 3), seed=2)  # y/im0.png: other content
    _run(option_file, tmp_path, "train.total_iter=2", "train.checkpoint_test=2",
         f"datasets.test.dataroot_H={test_dir}", "datasets.test.save_images=true")
    (record,) = _records(os.path.join(tmp_path, "tiny"), "test")
    rows = {row["name"]: row for row in record["images"]}
    assert sorted(rows) == [os.path.join("x", "im0"), os.path.join("y", "im0")]
    for name, row in rows.items():
        H = imread_uint(str(test_dir / f"{name}.png"), 3)
        assert row["jpeg_psnr"] == pytest.approx(psnr(jpeg(H, 10), H), abs=1e-9)
    images = os.path.join(tmp_path, "tiny", "images")
    assert sorted(os.listdir(os.path.join(images, "x", "im0"))) == ["im0_2.png"]
    assert sorted(os.listdir(os.path.join(images, "y", "im0"))) == ["im0_2.png"]


def test_merge_bn_and_checkpoint_keep(option_file, tmp_path):
    common = ["netG.act_mode=BR", "merge_bn=true", "merge_bn_startpoint=3",
              "train.checkpoint_keep=1", "train.checkpoint_test=4", "netG.global_skip=true"]
    _run(option_file, tmp_path, "train.total_iter=2", *common)
    assert "merge_bn_startpoint 3 is after train.total_iter 2" in _log(
        os.path.join(tmp_path, "tiny"))
    models = os.path.join(tmp_path, "tiny", "models")
    assert (build_from_state_dict(load_state_dict_file(os.path.join(models, "2_G.safetensors")))
            .m_down1[0].res[1].__class__.__name__ == "BatchNorm2d")
    _run(option_file, tmp_path, "train.total_iter=4", *common)
    _run(option_file, tmp_path, "train.total_iter=5", *common)
    assert ckpt.complete_checkpoints(models) == [5]
    kwargs = read_fbcnn_kwargs(os.path.join(models, "5_G.safetensors"))
    assert kwargs["act_mode"] == "R" and kwargs["global_skip"]  # the fold keeps the skip
    net = load_model(os.path.join(models, "5_G.safetensors")).net
    assert net.global_skip and not any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    log = _log(os.path.join(tmp_path, "tiny"))
    assert "BatchNorm folded" in log and "resuming from iteration 4" in log
    assert all(np.isfinite(v) for _, v in _losses(os.path.join(tmp_path, "tiny")))


def test_merge_bn_restarts_adam_but_keeps_the_learning_rate_schedule(option_file):
    model = _tiny_model(option_file, "netG.act_mode=BR", "train.G_scheduler_type=CosineAnnealingLR",
                        "train.G_scheduler_eta_min=1e-5", "train.total_iter=6")
    lrs = []
    for step in range(1, 7):
        if step == 4:
            model.merge_bnorm()
            assert net_act_mode(model.bare) == "R" and not model.G_optimizer.state
        model.optimize_parameters(step)
        lrs.append(model.current_learning_rate())
        model.update_learning_rate()
    assert lrs == pytest.approx([_cosine(t, 6) for t in range(6)], rel=1e-12)


def test_rerunning_a_finished_folded_run_reports_no_changed_option(option_file, tmp_path):
    """A recipe that folds BatchNorm, run to its end and started again unchanged: the
    optimiser's base rate is still train.G_optimizer_lr (not the rate at the fold)."""
    common = ["netG.act_mode=BR", "merge_bn=true", "merge_bn_startpoint=2", "datasets.test=null",
              "train.G_scheduler_type=CosineAnnealingLR", "train.total_iter=3"]
    _run(option_file, tmp_path, *common)
    state = ckpt.load_training_state(os.path.join(tmp_path, "tiny", "models"), 3)[1]
    assert [g["initial_lr"] for g in state["optimizer"]["param_groups"]] == [1e-3]
    assert _run(option_file, tmp_path, *common) == {"start": 3, "end": 3}
    log = _log(os.path.join(tmp_path, "tiny"))
    assert "nothing to do" in log and "the options differ" not in log


def test_moving_merge_bn_startpoint_across_the_checkpoint_resumes(option_file, tmp_path):
    common = ["netG.act_mode=BR", "merge_bn=true", "datasets.test=null"]
    folded, later = tmp_path / "folded", tmp_path / "later"
    # folded at 2, then the start point moved after the checkpoint: stays folded
    _run(option_file, folded, *common, "merge_bn_startpoint=2", "train.total_iter=3")
    _run(option_file, folded, *common, "merge_bn_startpoint=5", "train.total_iter=6")
    # not folded by 2, then the start point moved before the checkpoint: folded at the resume
    _run(option_file, later, *common, "merge_bn_startpoint=9", "train.total_iter=2")
    _run(option_file, later, *common, "merge_bn_startpoint=1", "train.total_iter=3")
    assert "BatchNorm folded now" in _log(os.path.join(later, "tiny"))
    for root, last in ((folded, 6), (later, 3)):
        weights = os.path.join(root, "tiny", "models", f"{last}_G.safetensors")
        assert read_fbcnn_kwargs(weights)["act_mode"] == "R"
        assert all(np.isfinite(v) for _, v in _losses(os.path.join(root, "tiny")))


def test_a_second_run_on_the_same_folder_stops(option_file, tmp_path):
    import fcntl
    run_dir = tmp_path / "tiny"
    run_dir.mkdir()
    with open(run_dir / ".lock", "a+") as held:  # as the first run holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("pid 12345 on elsewhere\n")
        held.flush()
        with pytest.raises(UserError, match=r"another training run is using this folder "
                                            r"\(pid 12345 on elsewhere\)"):
            _run(option_file, tmp_path, "train.total_iter=1", "datasets.test=null")
    assert sorted(os.listdir(run_dir)) == [".lock"]  # nothing written, the log neither
    _run(option_file, tmp_path, "train.total_iter=1", "datasets.test=null")  # released: runs
    _run(option_file, tmp_path, "train.total_iter=2", "datasets.test=null")
    assert len(os.listdir(run_dir / "options")) == 2  # both starts recorded, same second or not


def test_an_interrupted_run_says_where_it_will_resume(option_file, tmp_path, monkeypatch):
    real = ModelFBCNN.optimize_parameters

    def stop_at_4(self, step):
        if step == 4:
            raise KeyboardInterrupt
        return real(self, step)

    monkeypatch.setattr(ModelFBCNN, "optimize_parameters", stop_at_4)
    with pytest.raises(KeyboardInterrupt):
        _run(option_file, tmp_path, "train.total_iter=6", "train.checkpoint_save=2",
             "datasets.test=null")
    assert "interrupted at iteration 4; the next start resumes from iteration 2" in _log(
        os.path.join(tmp_path, "tiny"))


def test_sigterm_saves_the_iteration_reached_and_the_resumed_run_goes_on_as_uninterrupted(
        option_file, reference_run, tmp_path, monkeypatch):
    """SIGTERM during iteration 3 (checkpoint_save is 2): the run finishes the iteration, saves
    it and stops; the next start resumes from 3 and its losses and weights are the
    uninterrupted run's."""
    real = ModelFBCNN.optimize_parameters

    def signalled_in_3(self, step):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, step)

    monkeypatch.setattr(ModelFBCNN, "optimize_parameters", signalled_in_3)
    with pytest.raises(KeyboardInterrupt):
        _run(option_file, tmp_path)
    run_dir = os.path.join(tmp_path, "tiny")
    assert ckpt.complete_checkpoints(os.path.join(run_dir, "models")) == [2, 3]
    assert "interrupted at iteration 3; the next start resumes from iteration 3" in _log(run_dir)
    monkeypatch.setattr(ModelFBCNN, "optimize_parameters", real)
    assert _run(option_file, tmp_path) == {"start": 3, "end": 6}
    assert _losses(run_dir) == _losses(reference_run)
    resumed = load_state_dict_file(os.path.join(run_dir, "models", "6_G.safetensors"))
    reference = load_state_dict_file(os.path.join(reference_run, "models", "6_G.safetensors"))
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)


@pytest.mark.slow
def test_sigterm_stops_training_like_ctrl_c(option_file, tmp_path):
    cmd = [sys.executable, MAIN, "-opt", option_file, "--set", f"path.root={tmp_path}", "--set",
           "datasets.test=null", "--set", "train.checkpoint_save=1", "--set",
           "train.total_iter=100000"]
    proc = subprocess.Popen(cmd, env=SUBPROCESS_ENV, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    models = os.path.join(tmp_path, "tiny", "models")
    deadline = time.time() + 120
    while not (os.path.isdir(models) and ckpt.complete_checkpoints(models)):
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err, err[-3000:]
    assert "the next start resumes from iteration" in _log(os.path.join(tmp_path, "tiny"))


# Runs main_train_fbcnn.py with one moment of the run (a training step, a save, a validation)
# announced on stderr and made long, so that the test can signal the run inside it. The step
# spends about 10 s in one C call that releases the GIL and never returns to Python meanwhile,
# as a long network step does (Python's own signal handler waits for it); a save or a
# validation is held until the test has seen the stop announced and creates the release file.
_SLOW_MOMENT = """
import hashlib, os, sys, time
MOMENT = sys.argv.pop(1)
import main_train_fbcnn
from models.model_fbcnn import ModelFBCNN
from utils import checkpoint

def slow(where):
    sys.stderr.write("AT %s\\n" % where)
    sys.stderr.flush()
    if where == "step":
        hashlib.pbkdf2_hmac("sha256", b"x", b"y", 24_000_000)
    else:
        deadline = time.time() + 120
        while not os.path.exists(os.environ["FBCNN_TEST_RELEASE"]) and time.time() < deadline:
            time.sleep(0.05)
    sys.stderr.write("LEFT %s\\n" % where)
    sys.stderr.flush()

def wrap(owner, name, moment, when):
    real = getattr(owner, name)
    calls = []
    def patched(*args, **kwargs):
        calls.append(1)
        if MOMENT == moment and when(args, len(calls)):
            slow(moment)
        return real(*args, **kwargs)
    setattr(owner, name, patched)

wrap(ModelFBCNN, "optimize_parameters", "step", lambda args, n: args[1] == 3)
wrap(checkpoint, "save_checkpoint", "save", lambda args, n: n == 1)
wrap(ModelFBCNN, "test", "validation", lambda args, n: n == 1)
sys.exit(main_train_fbcnn.main(sys.argv[1:]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("moment, stopped_at", [("step", 3), ("save", 2), ("validation", 2)])
def test_sigterm_to_the_whole_run_stops_it_cleanly(option_file, tmp_path, moment, stopped_at):
    """SIGTERM to the run's process group, loader workers included (as `timeout` and a terminal
    send it): said at once, the iteration finishes, the workers are shut down, one exit 130."""
    cmd = [sys.executable, "-c", _SLOW_MOMENT, moment, "-opt", option_file,
           "--set", f"path.root={tmp_path}", "--set", "datasets.train.dataloader_num_workers=2",
           "--set", "train.checkpoint_save=2", "--set", "train.checkpoint_test=2",
           "--set", "train.total_iter=100"]
    err_path, release = tmp_path / "err.txt", tmp_path / "release"
    env = {**SUBPROCESS_ENV, "FBCNN_TEST_RELEASE": str(release)}
    with open(err_path, "w") as err:
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=err, start_new_session=True)
        try:
            reached = _wait_for(lambda: f"AT {moment}" in err_path.read_text(), 180, proc)
            assert reached, err_path.read_text()[-3000:]
            os.killpg(proc.pid, signal.SIGTERM)
            if moment != "step":  # held until the stop is announced (or a minute has passed)
                _wait_for(lambda: "stopping after" in err_path.read_text(), 60, proc)
                release.touch()
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    err = err_path.read_text()
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "Error" not in err, err[-3000:]
    said = err.index("SIGTERM: stopping after this iteration")
    assert said < err.index(f"LEFT {moment}")  # at once, not once the moment is over
    assert err.rstrip().endswith("interrupted")
    # the iteration reached is saved (2 already was, by checkpoint_save)
    assert (f"interrupted at iteration {stopped_at}; the next start resumes from iteration "
            f"{stopped_at}" in _log(os.path.join(tmp_path, "tiny")))
    assert ckpt.complete_checkpoints(os.path.join(tmp_path, "tiny", "models")) == sorted(
        {2, stopped_at})
    if moment == "validation":
        assert "iteration 2: validation abandoned (stopping)" in err
    deadline = time.time() + 10
    while True:  # the workers ended with the run: its process group is empty
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        assert time.time() < deadline, "loader workers outlived the run"
        time.sleep(0.2)


def test_pretrained_netG_is_the_starting_point(option_file, reference_run, tmp_path):
    pretrained = os.path.join(reference_run, "models", "6_G.safetensors")
    _run(option_file, tmp_path, "train.total_iter=1", "datasets.test=null",
         f"path.pretrained_netG={pretrained}")
    (_, logged), = _losses(os.path.join(tmp_path, "tiny"))
    opt = load_options(option_file)
    dataset = define_dataset(opt["datasets"]["train"], "train", 3, seed=11)
    batch = default_collate([dataset[k] for k in IterationBatchSampler(6, 4, seed=11).batch(1)])
    net = build_from_state_dict(load_state_dict_file(pretrained)).train()
    with torch.no_grad():
        E, qf = net(batch["L"].float() / 255)
    expected = F.l1_loss(E, batch["H"].float() / 255) + 0.001 * F.l1_loss(qf, batch["qf"])
    assert logged == pytest.approx(float(expected), rel=1e-5)
    assert "starting from pretrained netG" in _log(os.path.join(tmp_path, "tiny"))


def test_an_original_run_folder_resumes_at_its_iteration_with_a_fresh_optimiser(option_file,
                                                                               tmp_path):
    """A run folder of the original holds `models/<N>_G.pth` alone (torch.save of the state
    dict): training resumes at the newest N, from those weights, with a fresh Adam and the
    learning rate of the schedule at N (milestone 3: halved), and says so."""
    opt = load_options(option_file)
    models = tmp_path / "tiny" / "models"
    models.mkdir(parents=True)
    weights = {}
    for n, seed in ((2, 1), (4, 2)):
        torch.manual_seed(seed)
        weights[n] = define_G(opt["netG"]).state_dict()
        torch.save(weights[n], models / f"{n}_G.pth")
    assert ckpt.resume_point(str(models)) == (4, True)
    assert _run(option_file, tmp_path, "train.total_iter=6",
                "datasets.test=null") == {"start": 4, "end": 6}
    run_dir = os.path.join(tmp_path, "tiny")
    assert (f"resuming from iteration 4: {models / '4_G.pth'}, weights only (a checkpoint of the "
            f"original): the optimiser starts fresh, the learning rate is the schedule's at "
            f"iteration 4 (5.000e-04)") in _log(run_dir)
    records = _records(run_dir, "train")
    assert [(r["iter"], r["lr"]) for r in records] == [(5, 5e-4), (6, 5e-4)]
    dataset = define_dataset(opt["datasets"]["train"], "train", 3, seed=11)
    batch = default_collate([dataset[k] for k in IterationBatchSampler(6, 4, seed=11).batch(5)])
    net = build_from_state_dict(weights[4]).train()
    with torch.no_grad():
        E, qf = net(batch["L"].float() / 255)
    expected = F.l1_loss(E, batch["H"].float() / 255) + 0.001 * F.l1_loss(qf, batch["qf"])
    assert records[0]["loss"] == pytest.approx(float(expected), rel=1e-5)
    state = torch.load(models / "6_state.pth", weights_only=True)
    assert {int(s["step"]) for s in state["optimizer"]["state"].values()} == {2}  # fresh at 5
    assert ckpt.complete_checkpoints(str(models)) == [6]
    assert (models / "2_G.pth").exists() and (models / "4_G.pth").exists()  # left as they were


def test_resume_point_is_the_newest_complete_or_weights_only_checkpoint(tmp_path):
    models = str(tmp_path / "models")
    assert ckpt.resume_point(models) is None
    ckpt.save_checkpoint(models, 4, {"w": torch.zeros(2)}, {"iteration": 4})
    torch.save({"w": torch.ones(2)}, os.path.join(models, "2_G.pth"))  # older: not taken
    assert ckpt.resume_point(models) == (4, False)
    torch.save({"w": torch.ones(2)}, os.path.join(models, "6_G.pth"))
    assert ckpt.weights_only_checkpoints(models) == [2, 6]
    assert ckpt.resume_point(models) == (6, True)
    # an older version's save cut short after the network: not a checkpoint of the original
    torch.save({"w": torch.ones(2)}, os.path.join(models, "8_G.pth"))
    torch.save({"iteration": 8}, os.path.join(models, "8_state.pth"))
    assert ckpt.resume_point(models) == (6, True)


def test_masked_qf_loss_skips_nan_labels():
    est = torch.tensor([[0.2], [0.5], [0.9]], requires_grad=True)
    loss, count = masked_qf_loss(est, torch.tensor([[0.3], [float("nan")], [0.5]]))
    assert loss.item() == pytest.approx((0.1 + 0.4) / 2) and int(count) == 2
    loss.backward()
    assert est.grad.flatten().tolist() == pytest.approx([-0.5, 0.0, 0.5])
    est.grad = None
    loss, count = masked_qf_loss(est, torch.full((3, 1), float("nan")))
    loss.backward()
    assert loss.item() == 0 and int(count) == 0 and torch.all(est.grad == 0)
    labels = torch.tensor([[0.1], [0.2], [0.3]])
    assert masked_qf_loss(est, labels)[0].item() == pytest.approx(F.l1_loss(est, labels).item())
    assert (masked_qf_loss(est, labels, "l2")[0].item() ==
            pytest.approx(F.mse_loss(est, labels).item()))
    assert (masked_qf_loss(est, labels, "l2sum")[0].item() ==
            pytest.approx(F.mse_loss(est, labels, reduction="sum").item()))


def test_masked_l2sum_qf_loss_sums_over_the_labelled_samples_only():
    est = torch.tensor([[0.2], [0.5], [0.9], [0.4]], requires_grad=True)
    labels = torch.tensor([[0.3], [float("nan")], [0.5], [0.1]])
    loss, count = masked_qf_loss(est, labels, "l2sum")
    assert loss.item() == pytest.approx(0.1 ** 2 + 0.4 ** 2 + 0.3 ** 2) and int(count) == 3
    loss.backward()
    assert est.grad.flatten().tolist() == pytest.approx([-0.2, 0.0, 0.8, 0.6])
    assert masked_qf_loss(est, torch.full((4, 1), float("nan")), "l2sum")[0].item() == 0
    with pytest.raises(UserError, match="QF_lossfn_type 'l3' is unknown; known: l1, l2, l2sum"):
        masked_qf_loss(est, labels, "l3")


def _tiny_model(option_file, *overrides):
    opt = load_options(option_file, list(overrides))
    torch.manual_seed(0)
    model = ModelFBCNN(opt, torch.device("cpu"))
    g = torch.Generator().manual_seed(1)
    H = (torch.rand(2, 3, 16, 16, generator=g) * 255).to(torch.uint8)
    model.feed_data({"H": H, "L": (H.float() * 0.9).to(torch.uint8),
                     "qf": torch.tensor([[0.5], [float("nan")]])})
    return model


def _tf32_switches():
    """(cuDNN convolutions, cuBLAS matrix products): "tf32" or "ieee", read through the old API,
    which models.inference.tf32_allowed keeps in step with the new one."""
    return tuple("tf32" if flag else "ieee" for flag in (torch.backends.cudnn.allow_tf32,
                                                          torch.backends.cuda.matmul.allow_tf32))


@pytest.mark.parametrize("precision, during, dtype", [("fp32", "ieee", torch.float32),
                                                      ("tf32", "tf32", torch.float32),
                                                      ("bf16", "ieee", torch.bfloat16),
                                                      ("fp16", "ieee", torch.float16)])
def test_precision_sets_tf32_around_the_whole_step_and_autocasts_the_forward(
        option_file, precision, during, dtype):
    """PyTorch lets cuDNN run fp32 convolutions in TF32 by default: fp32 must switch that off
    for the forward pass, the backward pass and the update, then put the switches back."""
    model = _tiny_model(option_file, f"train.precision={precision}")
    before = _tf32_switches()
    seen = {}
    model.bare.register_forward_hook(
        lambda module, args, out: seen.update(forward=_tf32_switches(), dtype=out[0].dtype))
    model.bare.m_head.weight.register_hook(lambda grad: seen.update(backward=_tf32_switches()))
    model.G_optimizer.register_step_pre_hook(
        lambda optimizer, args, kwargs: seen.update(update=_tf32_switches()))
    model.optimize_parameters(1)
    assert seen == {"forward": (during, during), "backward": (during, during),
                    "update": (during, during), "dtype": dtype}
    assert _tf32_switches() == before
    assert model.scaler.is_enabled() == (precision == "fp16")
    seen.clear()
    model.test(model.L[:1].mul(255).to(torch.uint8))  # validation: IEEE fp32 whatever the run's
    assert (seen["forward"], seen["dtype"]) == (("ieee", "ieee"), torch.float32)
    assert _tf32_switches() == before


def test_gradient_clipping_bounds_the_update(option_file):
    clipped = _tiny_model(option_file, "train.G_optimizer_clipgrad=0.001")
    clipped.optimize_parameters(1)
    after = torch.norm(torch.stack([p.grad.norm() for p in clipped.bare.parameters()]))
    assert float(clipped.grad_norm) > 0.001 >= float(after) * (1 - 1e-5)
    free = _tiny_model(option_file)
    free.optimize_parameters(1)
    free_norm = torch.norm(torch.stack([p.grad.norm() for p in free.bare.parameters()]))
    assert float(free_norm) == pytest.approx(float(clipped.grad_norm), rel=1e-5)
    assert free.grad_norm is None


def test_trainable_trains_only_the_named_parameters(option_file):
    model = _tiny_model(option_file, 'train.trainable=["qf_pred"]',
                        "train.G_regularizer_clipstep=1", "train.G_regularizer_orthstep=1")
    with torch.no_grad():  # a weight beyond the clip regulariser's bound, outside the QF head
        model.bare.m_head.weight[0, 0, 0, 0] = 3.0
    before = {k: v.clone() for k, v in model.bare.state_dict().items()}
    for step in (1, 2):
        model.optimize_parameters(step)
    after = model.bare.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("qf_pred.") for k in changed)
    assert sum(p.numel() for g in model.G_optimizer.param_groups for p in g["params"]) == sum(
        v.numel() for k, v in after.items() if k.startswith("qf_pred."))


def test_a_trainable_prefix_that_names_nothing_is_refused(option_file):
    with pytest.raises(UserError, match=r"train\.trainable: 'qf_head' names no parameter.*qf_pred"):
        _tiny_model(option_file, 'train.trainable=["qf_head"]')


def test_step_loss_is_l1_plus_weighted_masked_qf(option_file):
    model = _tiny_model(option_file, "train.QF_lossfn_weight=0.5")
    with torch.no_grad():
        E, qf = model.bare(model.L)
    logs = model.optimize_parameters(1)
    expected = F.l1_loss(E, model.H) + 0.5 * (qf[0, 0] - 0.5).abs()
    assert float(logs["loss"]) == pytest.approx(float(expected), rel=1e-5)
    assert int(logs["QF_labelled"]) == 1


@pytest.mark.parametrize("kind", ["l1", "l2", "l2sum", "ssim", "charbonnier"])
def test_every_image_loss_type_is_its_direct_computation(option_file, kind):
    model = _tiny_model(option_file, f"train.G_lossfn_type={kind}", "train.G_lossfn_weight=2")
    with torch.no_grad():
        E, _ = model.bare(model.L)
    d = (E - model.H).double()
    expected = {"l1": d.abs().mean(), "l2": (d * d).mean(), "l2sum": (d * d).sum(),
                "ssim": 1 - SSIMLoss().ssim(E.double(), model.H.double()),
                "charbonnier": torch.sqrt(d * d + 1e-9).mean()}[kind]
    assert float(model.optimize_parameters(1)["G_loss"]) == pytest.approx(2 * float(expected),
                                                                         rel=1e-5)


@pytest.mark.parametrize("kind", ["l1", "l2", "l2sum"])
def test_every_qf_loss_type_is_its_direct_computation(option_file, kind):
    model = _labelled(_tiny_model(option_file, f"train.QF_lossfn_type={kind}"),
                      [[0.9], [0.2]])
    with torch.no_grad():
        _, qf = model.bare(model.L)
    d = (qf - torch.tensor([[0.9], [0.2]])).double()
    expected = {"l1": d.abs().mean(), "l2": (d * d).mean(), "l2sum": (d * d).sum()}[kind]
    logs = model.optimize_parameters(1)
    assert float(logs["QF_loss"]) == pytest.approx(float(expected), rel=1e-5)
    assert int(logs["QF_labelled"]) == 2


def _labelled(model, labels):
    model.feed_data({"H": model.H.mul(255).round().to(torch.uint8),
                     "L": model.L.mul(255).round().to(torch.uint8), "qf": torch.tensor(labels)})
    return model


def test_qf_input_prob_feeds_the_true_labels_to_the_decoder(option_file):
    forced = _labelled(_tiny_model(option_file, "train.qf_input_prob=1",
                                   "train.QF_lossfn_weight=0"), [[0.9], [0.2]])
    with torch.no_grad():
        E_true, _ = forced.bare(forced.L, forced.qf)
    seen = []
    forced.bare.register_forward_hook(lambda module, args, out: seen.append(args))
    logs = forced.optimize_parameters(1)
    assert len(seen) == 1 and torch.equal(seen[0][1], torch.tensor([[0.9], [0.2]]))
    assert float(logs["G_loss"]) == pytest.approx(F.l1_loss(E_true, forced.H).item(), rel=1e-6)
    # the image loss no longer reaches the QF head: its only gradient was the QF loss, weight 0
    assert not any(p.grad.any() for p in forced.bare.qf_pred.parameters())
    blind = _labelled(_tiny_model(option_file, "train.QF_lossfn_weight=0"), [[0.9], [0.2]])
    blind.optimize_parameters(1)
    assert any(p.grad.any() for p in blind.bare.qf_pred.parameters())


def test_qf_input_prob_skips_unlabelled_batches_and_draws_by_iteration(option_file):
    double = _tiny_model(option_file, "train.qf_input_prob=1")  # one label is NaN
    assert double.teacher_qf_input(1) is None
    off = _labelled(_tiny_model(option_file), [[0.9], [0.2]])
    assert off.teacher_qf_input(1) is None
    half = _labelled(_tiny_model(option_file, "train.qf_input_prob=0.5"), [[0.9], [0.2]])
    drawn = [step for step in range(1, 401) if half.teacher_qf_input(step) is not None]
    assert 140 < len(drawn) < 260  # binomial(400, 0.5): mean 200, sd 10
    again = _labelled(_tiny_model(option_file, "train.qf_input_prob=0.5"), [[0.1], [0.3]])
    assert [step for step in range(1, 401) if again.teacher_qf_input(step) is not None] == drawn
    # not the stream of the training sample with the same number (its crop and QF)
    sample_stream = [step for step in range(1, 401) if np.random.default_rng(
        np.random.SeedSequence([half.seed, step])).random() < 0.5]
    assert drawn != sample_stream


def _cosine(t, total, lr0=1e-3, eta_min=1e-5):  # lr0: the tiny options' G_optimizer_lr
    return eta_min + (lr0 - eta_min) * (1 + math.cos(math.pi * t / total)) / 2


def test_cosine_schedule_decays_to_eta_min_at_total_iter(option_file):
    model = _tiny_model(option_file, "train.G_scheduler_type=CosineAnnealingLR",
                        "train.total_iter=4", "train.G_scheduler_eta_min=1e-5")
    lrs = []
    for _ in range(4):
        model.G_optimizer.step()
        model.update_learning_rate()
        lrs.append(model.current_learning_rate())
    assert lrs == pytest.approx([_cosine(t, 4) for t in range(1, 5)], rel=1e-9)
    assert lrs[-1] == pytest.approx(1e-5, rel=1e-9)


@pytest.mark.parametrize("stopped_at", [3, 4])  # 4: the old end, where the rate is eta_min
def test_resume_with_a_longer_total_iter_stretches_the_cosine(option_file, stopped_at):
    common = ["train.G_scheduler_type=CosineAnnealingLR", "train.G_scheduler_eta_min=1e-5"]
    first = _tiny_model(option_file, *common, "train.total_iter=4")
    for _ in range(stopped_at):
        first.G_optimizer.step()
        first.update_learning_rate()
    resumed = _tiny_model(option_file, *common, "train.total_iter=8")
    resumed.load_state(first.bare.state_dict(), first.training_state())
    assert resumed.G_scheduler.last_epoch == stopped_at  # the progress came from the checkpoint
    assert resumed.current_learning_rate() == pytest.approx(_cosine(stopped_at, 8), rel=1e-9)
    lrs = []
    for _ in range(8 - stopped_at):
        resumed.G_optimizer.step()
        resumed.update_learning_rate()
        lrs.append(resumed.current_learning_rate())
    assert lrs == pytest.approx([_cosine(t, 8) for t in range(stopped_at + 1, 9)], rel=1e-9)


def test_resume_takes_the_options_learning_rate_betas_and_weight_decay(option_file, caplog):
    first = _tiny_model(option_file, "train.G_scheduler_milestones=[2]")
    for _ in range(3):
        first.G_optimizer.step()
        first.update_learning_rate()
    assert first.current_learning_rate() == pytest.approx(1e-3 * 0.5, rel=1e-12)
    resumed = _tiny_model(option_file, "train.G_scheduler_milestones=[2]",
                          "train.G_optimizer_lr=0.01", "train.G_optimizer_wd=0.1",
                          "train.G_optimizer_betas=[0.5,0.9]")
    with caplog.at_level(logging.INFO):
        resumed.load_state(first.bare.state_dict(), first.training_state())
    (group,) = resumed.G_optimizer.param_groups
    assert (group["betas"], group["weight_decay"]) == ((0.5, 0.9), 0.1)
    assert resumed.current_learning_rate() == pytest.approx(0.01 * 0.5, rel=1e-12)
    resumed.G_optimizer.step()
    resumed.update_learning_rate()
    assert resumed.current_learning_rate() == pytest.approx(0.01 * 0.5, rel=1e-12)
    assert "train.G_optimizer_wd 0.0 -> 0.1" in caplog.text


def test_changed_optimizer_options_are_told_against_the_checkpoints_options(option_file,
                                                                          caplog):
    """A change is told against the checkpoint's recorded options, not its optimizer state (an
    initial_lr that no option said): unchanged options report nothing; a real change does."""
    first = _tiny_model(option_file)
    state = {**first.training_state(), "options": json.dumps(first.opt)}
    for group in state["optimizer"]["param_groups"]:
        group["initial_lr"] = 2.3918e-05
    with caplog.at_level(logging.INFO):
        _tiny_model(option_file).load_state(first.bare.state_dict(), state)
    assert "differ" not in caplog.text
    resumed = _tiny_model(option_file, "train.G_optimizer_lr=0.01")
    with caplog.at_level(logging.INFO):
        resumed.load_state(first.bare.state_dict(), state)
    assert "train.G_optimizer_lr 0.001 -> 0.01: the options differ" in caplog.text
    assert resumed.G_optimizer.param_groups[0]["initial_lr"] == 0.01


def test_resume_with_the_same_schedule_keeps_the_learning_rate_bit_for_bit(option_file):
    for schedule in (["train.G_scheduler_type=CosineAnnealingLR", "train.total_iter=7"],
                     ["train.G_scheduler_milestones=[2,3]", "train.G_scheduler_gamma=0.3"]):
        first = _tiny_model(option_file, *schedule)
        for _ in range(4):
            first.G_optimizer.step()
            first.update_learning_rate()
        resumed = _tiny_model(option_file, *schedule)
        resumed.load_state(first.bare.state_dict(), first.training_state())
        assert resumed.current_learning_rate() == first.current_learning_rate()
        assert resumed.scheduled_lrs()[0] == pytest.approx(first.current_learning_rate(),
                                                            rel=1e-12)


def test_resume_with_new_milestones_follows_them(option_file):
    first = _tiny_model(option_file, "train.G_scheduler_milestones=[2,3]",
                        "train.G_scheduler_gamma=0.5")
    for _ in range(4):
        first.G_optimizer.step()
        first.update_learning_rate()
    assert first.current_learning_rate() == pytest.approx(1e-3 * 0.25)
    resumed = _tiny_model(option_file, "train.G_scheduler_milestones=[5]",
                          "train.G_scheduler_gamma=0.5")
    resumed.load_state(first.bare.state_dict(), first.training_state())
    assert resumed.current_learning_rate() == pytest.approx(1e-3)  # no milestone passed yet
    resumed.G_optimizer.step()
    resumed.update_learning_rate()
    assert resumed.current_learning_rate() == pytest.approx(1e-3 * 0.5)


@pytest.mark.parametrize("name, in_nc", [("color_lite", 3), ("gray_lite", 1)])
def test_lite_option_files_train_and_save_the_lite_network(name, in_nc, tmp_path):
    """options/train_fbcnn_*_lite.json (the bundled models' recipe) as they are, on tiny data."""
    path = os.path.join(ROOT, "options", f"train_fbcnn_{name}.json")
    images = _write_images(tmp_path / "images", 3, (48, 56, 3), 4)
    opt = load_options(path, [f"path.root={tmp_path}", f"datasets.train.dataroot_H={images}",
                              f"datasets.test.dataroot_H={images}", "datasets.train.H_size=32",
                              "datasets.train.dataloader_batch_size=2",
                              "datasets.train.dataloader_num_workers=0", "train.total_iter=2",
                              "merge_bn_startpoint=2", "train.checkpoint_save=2",
                              "train.checkpoint_test=2", "gpu_ids=[]"])
    assert opt["train"]["G_scheduler_type"] == "CosineAnnealingLR"
    assert opt["netG"]["act_mode"] == "BR" and opt["merge_bn"]  # trained with BatchNorm...
    assert opt["train"]["checkpoint_keep"] == 3  # 65 MB each: not 20 of them (issue #17)
    assert train(opt) == {"start": 0, "end": 2}
    run_dir = os.path.join(tmp_path, f"fbcnn_{name}")
    weights = ckpt.network_file(os.path.join(run_dir, "models"), 2)
    assert read_fbcnn_kwargs(weights) == {"in_nc": in_nc, "out_nc": in_nc,  # ...saved folded
                                          "nc": [16, 32, 64, 128], "nb": 4, "act_mode": "R",
                                          "downsample_mode": "strideconv",
                                          "upsample_mode": "convtranspose",
                                          "global_skip": False}
    net = load_model(weights).net
    # gray: the head conv has 2 x 16 x 9 fewer weights, the tail conv 2 x 16 x 9 + 2 biases
    assert sum(p.numel() for p in net.parameters()) == 5_375_652 - (3 - in_nc) * (288 + 1)
    assert len(_records(run_dir, "test")) >= 1


@pytest.mark.parametrize("name, in_nc, dataset_type", [("color", 3, "jpegdouble"),
                                                       ("gray", 1, "jpeggraydouble")])
def test_all_qf_recipes_fine_tune_the_first_stage_over_the_whole_range(name, in_nc, dataset_type,
                                                                       tmp_path):
    """options/train_fbcnn_*_lite_cpu_allqf.json as they are, from a first-stage network (here
    an untrained one of the same shape), on tiny data: QF 5..100, identity samples, a share of
    double JPEG, and the first stage's folded layout kept."""
    path = os.path.join(ROOT, "options", f"train_fbcnn_{name}_lite_cpu_allqf.json")
    torch.manual_seed(0)
    first = FBCNN(in_nc, in_nc, [8, 16, 32, 64], 2, act_mode="R")
    start = save_network(str(tmp_path / "first.safetensors"), first.state_dict(),
                         infer_fbcnn_kwargs(first.state_dict()))
    images = _write_images(tmp_path / "images", 3, (48, 56, 3), 4)
    opt = load_options(path, [f"path.root={tmp_path}", f"path.pretrained_netG={start}",
                              f"datasets.train.dataroot_H={images}",
                              f"datasets.test.dataroot_H={images}", "datasets.train.H_size=32",
                              "datasets.train.dataloader_num_workers=0", "train.total_iter=2",
                              "train.checkpoint_save=2", "train.checkpoint_test=2"])
    train_set = opt["datasets"]["train"]
    assert (train_set["dataset_type"], train_set["qf_range"], train_set["identity_prob"],
            train_set["double_prob"]) == (dataset_type, [5, 100], 0.05, 0.3)
    assert opt["gpu_ids"] == [] and opt["netG"]["act_mode"] == "R" and not opt["merge_bn"]
    assert train(opt) == {"start": 0, "end": 2}
    weights = ckpt.network_file(os.path.join(tmp_path, f"fbcnn_{name}_lite_cpu_allqf", "models"),
                                2)
    tuned = load_model(weights).net
    assert sum(p.numel() for p in tuned.parameters()) == sum(
        p.numel() for p in first.parameters())
    assert not torch.equal(tuned.m_head.weight, first.m_head.weight)  # it trained from there


def test_the_colour_qf_head_recipe_goes_on_from_the_second_stage(tmp_path):
    """options/train_fbcnn_color_lite_cpu_qfhead.json as it is, from a second-stage network
    (here an untrained one of the same shape), on tiny data: 128x128 patches in batches of 8,
    more identity samples, the QF loss at 0.1, and the folded layout kept."""
    path = os.path.join(ROOT, "options", "train_fbcnn_color_lite_cpu_qfhead.json")
    torch.manual_seed(0)
    second = FBCNN(3, 3, [8, 16, 32, 64], 2, act_mode="R")
    start = save_network(str(tmp_path / "second.safetensors"), second.state_dict(),
                         infer_fbcnn_kwargs(second.state_dict()))
    images = _write_images(tmp_path / "images", 3, (152, 160, 3), 4)  # H_size + 16 (the shift)
    opt = load_options(path, [f"path.root={tmp_path}", f"path.pretrained_netG={start}",
                              f"datasets.train.dataroot_H={images}",
                              f"datasets.test.dataroot_H={images}",
                              "datasets.train.dataloader_num_workers=0", "train.total_iter=1",
                              "train.checkpoint_save=1", "train.checkpoint_test=1"])
    train_set = opt["datasets"]["train"]
    assert (train_set["dataset_type"], train_set["H_size"], train_set["dataloader_batch_size"],
            train_set["qf_range"], train_set["identity_prob"]) == ("jpegdouble", 128, 8,
                                                                    [5, 100], 0.2)
    assert opt["train"]["QF_lossfn_weight"] == 0.1 and opt["netG"]["act_mode"] == "R"
    assert train(opt) == {"start": 0, "end": 1}
    tuned = load_model(ckpt.network_file(os.path.join(tmp_path, "fbcnn_color_lite_cpu_qfhead",
                                                      "models"), 1)).net
    assert not torch.equal(tuned.m_head.weight, second.m_head.weight)


@pytest.mark.parametrize("init_type", ["orthogonal", "normal", "uniform", "xavier_normal",
                                       "xavier_uniform", "kaiming_normal", "kaiming_uniform"])
def test_init_types_as_kair(init_type):
    torch.manual_seed(0)
    net = init_weights(FBCNN(3, 3, [8, 16, 32, 64], 1, act_mode="BR"), init_type, "uniform", 0.2)
    layers = [m for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    weights = [m.weight.detach() for m in layers]
    assert all(float(m.bias.detach().abs().max()) == 0 for m in layers)
    bns = [m.weight.detach() for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(0.1 <= float(w.min()) and float(w.max()) <= 1.0 for w in bns)
    if init_type == "orthogonal":
        w = net.qf_embed[2].weight.detach()
        torch.testing.assert_close(w @ w.T, 0.04 * torch.eye(512), atol=1e-5, rtol=0)
    elif init_type == "uniform":
        assert max(float(w.abs().max()) for w in weights) <= 0.2 * 0.2
    elif init_type in ("normal", "kaiming_normal"):
        assert max(float(w.abs().max()) for w in weights) <= 0.2 + 1e-6
    elif init_type == "xavier_normal":
        assert max(float(w.abs().max()) for w in weights) <= 1.0


def test_init_gain_linear_sets_the_qf_paths_apart_from_the_convolutions():
    torch.manual_seed(0)
    net = init_weights(FBCNN(1, 1, [8, 16, 32, 64], 1), "orthogonal", "uniform", 0.2,
                       linear_gain=1.0)
    linear = [m.weight.detach() for m in net.modules() if isinstance(m, torch.nn.Linear)]
    convs = [m.weight.detach().flatten(1) for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(linear) == 3 + 3 + 6  # QF head MLP, QF embedding, gamma and beta of 3 scales
    for w, gain in [(w, 1.0) for w in linear] + [(w, 0.2) for w in convs]:
        # an orthogonal init times the gain: every singular value equals the gain
        torch.testing.assert_close(torch.linalg.svdvals(w), torch.full((min(w.shape),), gain),
                                   atol=1e-5, rtol=0)


def test_init_gain_qf_head_sets_the_qf_head_apart_from_the_other_qf_paths():
    torch.manual_seed(0)
    net = init_weights(FBCNN(1, 1, [8, 16, 32, 64], 1), "orthogonal", "uniform", 0.2,
                       linear_gain=1.0, qf_head_gain=0.3)
    head = {id(m) for m in net.qf_pred.modules()}
    linear = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    assert sum(id(m) in head for m in linear) == 3
    for m in linear:
        w = m.weight.detach()
        gain = 0.3 if id(m) in head else 1.0
        torch.testing.assert_close(torch.linalg.svdvals(w), torch.full((min(w.shape),), gain),
                                   atol=1e-5, rtol=0)


@pytest.mark.parametrize("global_skip", [False, True])
def test_registry_and_merge_bn_equivalence(global_skip):
    with pytest.raises(UserError, match="'dncnn' is unknown; known: fbcnn"):
        define_G({"net_type": "dncnn"})
    net = define_G({"net_type": "fbcnn", "in_nc": 1, "out_nc": 1, "nc": [8, 16, 32, 64], "nb": 1,
                    "act_mode": "BR", "downsample_mode": "strideconv",
                    "upsample_mode": "convtranspose", "global_skip": global_skip,
                    "init_type": "orthogonal",
                    "init_bn_type": "uniform", "init_gain": 0.2,
                    "init_gain_linear": None, "init_gain_qf_head": None})
    x = torch.rand(3, 1, 24, 24)
    with torch.no_grad():
        net(x)  # training-mode pass moves the running statistics away from their init
        net.eval()
        merged = merge_bn(net).eval()
        (e1, q1), (e2, q2) = net(x), merged(x)
    assert merged.global_skip == global_skip
    torch.testing.assert_close(e1, e2, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(q1, q2, atol=1e-6, rtol=1e-5)


def test_regularizer_clip_nudges_large_weights():
    layer = torch.nn.Linear(2, 1)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[2.0, 0.5]]))
        layer.bias.fill_(-3.0)
    regularizer_clip(layer)
    assert layer.weight.tolist()[0] == pytest.approx([2.0 - 1e-4, 0.5])
    assert layer.bias.item() == pytest.approx(-3.0 + 1e-4)


def test_progress_bar_only_on_a_terminal(monkeypatch):
    assert progress_bar(0, 10) is None  # pytest captures stderr: not a terminal

    class FakeTTY:
        def isatty(self):
            return True

        def write(self, text):
            return len(text)

        def flush(self):
            pass

    monkeypatch.setattr(sys, "stderr", FakeTTY())
    bar = progress_bar(3, 10)
    assert bar is not None and bar.n == 3 and bar.total == 10
    bar.close()


def test_double_jpeg_iterations_skip_the_qf_loss(option_file, tmp_path):
    _run(option_file, tmp_path, "datasets.train.dataset_type=jpeggraydouble", "netG.in_nc=1",
         "netG.out_nc=1", "train.total_iter=8", "train.checkpoint_save=8", "datasets.test=null")
    sampler = IterationBatchSampler(6, 4, seed=11, double_prob=0.5)
    doubles = [sampler.is_double(t) for t in range(1, 9)]
    assert any(doubles) and not all(doubles)
    records = _records(os.path.join(tmp_path, "tiny"), "train")
    for record, double in zip(records, doubles):
        assert np.isfinite(record["loss"])
        assert (record["QF_loss"] is None) == double
        assert double or record["QF_loss"] > 0


def test_save_network_writes_fp16_with_its_architecture(tmp_path):
    """utils.checkpoint.save_network: the state dict in fp16 with fbcnn_kwargs, loadable by
    name-free load_model (the architecture comes from the file), equal to the fp32 network
    rounded to fp16."""
    net = FBCNN(in_nc=3, out_nc=3, nc=[8, 16, 32, 64], nb=1)
    kwargs = infer_fbcnn_kwargs(net.state_dict())
    path = save_network(str(tmp_path / "lite.safetensors"), net.state_dict(), kwargs,
                        metadata={"trained_on": "test"}, dtype=torch.float16)
    with safe_open(path, framework="pt") as f:
        assert json.loads(f.metadata()["fbcnn_kwargs"]) == kwargs
        assert f.metadata()["trained_on"] == "test"
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    loaded = load_model(path)
    for key, value in net.state_dict().items():
        assert torch.equal(loaded.net.state_dict()[key], value.half().float())


def test_gpu_ids_without_cuda_is_refused_as_device_cuda_is(option_file, tmp_path, monkeypatch,
                                                             capsys):
    """`"gpu_ids": [0]` on a machine without CUDA stops with one line saying how to train on
    the CPU, as `--device cuda` is refused by the other scripts; nothing is written."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    status = main_train_fbcnn.main(["-opt", option_file, "--set", f"path.root={tmp_path}",
                                    "--set", "gpu_ids=[0]"])
    assert status == 2
    err = capsys.readouterr().err
    assert err == ('error: gpu_ids [0]: no CUDA device on this machine; to train on the CPU '
                   'set "gpu_ids": [] (or --set gpu_ids=[])\n')
    assert os.listdir(tmp_path) == []


def test_loader_workers_are_capped_at_the_machines_cores(option_file, monkeypatch, caplog):
    from runners import training
    opt = load_options(option_file, ["datasets.train.dataloader_num_workers=8"])
    dataset = define_dataset(opt["datasets"]["train"], "train", 3)
    sampler = IterationBatchSampler(len(dataset), 4)
    info = DistInfo(0, 1, 0, torch.device("cpu"))
    monkeypatch.setattr(training, "usable_cores", lambda: 3)
    with caplog.at_level(logging.WARNING):
        loader = training.make_loader(dataset, sampler, opt["datasets"]["train"], info)
    assert loader.num_workers == 3
    assert ("datasets.train.dataloader_num_workers 8: this machine has 3 core(s) for 1 training "
            "process(es); using 3 loader process(es) each") in caplog.text
    monkeypatch.setattr(training, "usable_cores", lambda: 16)
    assert training.make_loader(dataset, sampler, opt["datasets"]["train"], info).num_workers == 8


def test_precision_auto_is_bf16_only_where_the_device_has_it(monkeypatch):
    import models.model_fbcnn as model_fbcnn
    cpu = torch.device("cpu")
    for flags, expected in (({"avx512_bf16": True, "amx_bf16": False}, "bf16"),
                            ({"avx512_bf16": False, "amx_bf16": True}, "bf16"),
                            ({"avx512_bf16": False, "amx_bf16": False}, "fp32")):
        monkeypatch.setattr(model_fbcnn, "native_bf16", lambda flags=flags: flags)
        assert model_fbcnn.training_precision("auto", cpu) == expected
        assert model_fbcnn.training_precision("fp32", cpu) == "fp32"  # a choice stays a choice
    assert load_options("options/train_fbcnn_color_lite_cpu.json",
                        ["train.precision=auto"], check_paths=False)["train"]["precision"] == "auto"
