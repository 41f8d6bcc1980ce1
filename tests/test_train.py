"""Tests of a training run as a whole: runners/training.py and main_train_fbcnn.py on the tiny
run of tests/train_support.py (CPU): its checkpoints, logs and validation, resuming, the fast
paths, DDP, option errors, merge_bn and the run folder's rules. Interruptions (SIGKILL, SIGTERM)
are in test_train_interrupts.py, one step's arithmetic in test_train_step.py, the recipes and
the network's set-up in test_train_recipes.py."""
import json
import logging
import os
import socket
import subprocess
import sys

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
from models.model_fbcnn import ModelFBCNN
from models.model_zoo import (LoadedModel, build_from_state_dict, load_model,
                              load_state_dict_file, read_fbcnn_kwargs)
from models.select_network import define_G, net_act_mode
from runners.train_options import load_options
from runners.training import train
from utils import checkpoint as ckpt
from utils.cpu import native_bf16
from utils.errors import UserError
from utils.image import imread_uint
from utils.metrics import psnr, psnrb, ssim

from tests.train_support import (MAIN, ROOT, SUBPROCESS_ENV, cosine, run_log, run_losses,
                                 run_records, run_tiny, tiny_model, write_images)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_smoke_run_writes_checkpoints_logs_and_validation(reference_run):
    models = os.path.join(reference_run, "models")
    assert ckpt.complete_checkpoints(models) == [2, 4, 6]
    losses = run_losses(reference_run)
    assert [i for i, _ in losses] == [1, 2, 3, 4, 5, 6]
    assert all(np.isfinite(v) for _, v in losses)
    lrs = [r["lr"] for r in run_records(reference_run, "train")]
    assert lrs == pytest.approx([1e-3, 1e-3, 5e-4, 5e-4, 5e-4, 5e-4])
    tests = run_records(reference_run, "test")
    assert [r["iter"] for r in tests] == [3, 6]
    avg = tests[-1]["average"]
    assert set(avg) >= {"psnr", "ssim", "psnrb", "qf", "jpeg_psnr"} and avg["jpeg_psnr"] > 20
    assert len(tests[-1]["images"]) == 2
    assert os.path.isfile(os.path.join(reference_run, "images", "im0", "im0_6.png"))
    log = run_log(reference_run)
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
    assert logged == [(i, pytest.approx(v, rel=1e-6)) for i, v in run_losses(reference_run)]
    tests = run_records(reference_run, "test")
    assert [(e.step, e.value) for e in events.Scalars("test/psnr")] == [
        (r["iter"], pytest.approx(r["average"]["psnr"], rel=1e-6)) for r in tests]


def test_resume_continues_with_identical_losses(option_file, reference_run, tmp_path):
    assert run_tiny(option_file, tmp_path, "train.total_iter=4") == {"start": 0, "end": 4}
    assert run_tiny(option_file, tmp_path) == {"start": 4, "end": 6}
    run_dir = os.path.join(tmp_path, "tiny")
    assert "resuming from iteration 4" in run_log(run_dir)
    assert run_losses(run_dir) == run_losses(reference_run)  # exact equality, lr drop included
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
    assert "stopped at iteration 3 (asked to end early)" in run_log(run_dir)
    assert run_tiny(option_file, tmp_path) == {"start": 3, "end": 6}
    assert run_losses(run_dir) == run_losses(reference_run)


def test_saved_network_loads_like_the_test_scripts_and_matches_validation(option_file,
                                                                         reference_run):
    path = os.path.join(reference_run, "models", "6_G.safetensors")
    net = build_from_state_dict(load_state_dict_file(path), source=path)
    assert (net.nc, net.nb, net.in_nc) == ([8, 16, 32, 64], 1, 3)
    with safe_open(path, framework="pt") as f:
        assert f.metadata()["iteration"] == "6"
    assert read_fbcnn_kwargs(path) == {"in_nc": 3, "out_nc": 3, "nc": [8, 16, 32, 64], "nb": 1,
                                       "act_mode": "R", "downsample_mode": "strideconv",
                                       "upsample_mode": "convtranspose", "global_skip": False,
                                       "skip_gate": False}
    loaded = load_model(path)
    assert all(torch.equal(loaded.net.state_dict()[k], v) for k, v in net.state_dict().items())
    first = load_state_dict_file(os.path.join(reference_run, "models", "2_G.safetensors"))
    assert not torch.equal(first["m_head.weight"], net.state_dict()["m_head.weight"])
    state = torch.load(os.path.join(reference_run, "models", "6_state.pth"), weights_only=True)
    assert state["iteration"] == 6 and json.loads(state["options"])["train"]["manual_seed"] == 11
    record = run_records(reference_run, "test")[-1]
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
    run_tiny(option_file, tmp_path, "train.total_iter=3", "datasets.test=null", *overrides)
    if overrides == ["train.compile=true"]:  # frames compiled, not a silent eager fall-back
        assert torch._dynamo.utils.counters["frames"]["ok"] > compiled
    fast = run_losses(os.path.join(tmp_path, "tiny"))
    ref = run_losses(reference_run)[:3]
    assert [v for _, v in fast] == pytest.approx([v for _, v in ref], rel=rel)
    warned = "autocast is much slower than fp32" in run_log(os.path.join(tmp_path, "tiny"))
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
    log = run_log(os.path.join(tmp_path, "tiny"))
    assert "parameters identical on all 2 processes" in log and "differ" not in log


def test_ddp_two_processes_with_gloo(option_file, reference_run, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           MAIN, "-opt", option_file, "--set", f"path.root={tmp_path}",
           "--set", "train.total_iter=2", "--set", "train.checkpoint_test=2"]
    result = subprocess.run(cmd, env=SUBPROCESS_ENV, cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = os.path.join(tmp_path, "tiny")
    log = run_log(run_dir)
    assert "batch 4 on 2 process(es)" in log
    assert "parameters identical on all 2 processes" in log
    assert [i for i, _ in run_losses(run_dir)] == [1, 2]  # rank 0 alone writes
    assert [v for _, v in run_losses(run_dir)] == pytest.approx(
        [v for _, v in run_losses(reference_run)[:2]], rel=1e-5)
    assert [r["iter"] for r in run_records(run_dir, "test")] == [2]
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
    assert "batch 4 on 2 process(es)" in run_log(str(nodes_dir))
    assert "parameters identical on all 2 processes" in run_log(str(nodes_dir))
    assert run_losses(str(nodes_dir)) == run_losses(str(one_dir))
    a = load_state_dict_file(str(nodes_dir / "models" / "2_G.safetensors"))
    b = load_state_dict_file(str(one_dir / "models" / "2_G.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in b)


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
        assert run_tiny(option_file, tmp_path, "train.total_iter=3",
                    f"datasets.test.dataroot_H={broken}") == {"start": 0, "end": 3}
    assert "no image of" in caplog.text and "validation skipped" in caplog.text
    assert run_records(os.path.join(tmp_path, "tiny"), "test") == []


def test_validation_keeps_same_named_images_of_two_subfolders_apart(option_file, tmp_path):
    test_dir = tmp_path / "set"
    test_dir.mkdir()
    write_images(test_dir / "x", 1, (24, 32, 3), seed=1)
    write_images(test_dir / "y", 1, (24, 32, 3), seed=2)  # y/im0.png: other content
    run_tiny(option_file, tmp_path, "train.total_iter=2", "train.checkpoint_test=2",
         f"datasets.test.dataroot_H={test_dir}", "datasets.test.save_images=true")
    (record,) = run_records(os.path.join(tmp_path, "tiny"), "test")
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
    run_tiny(option_file, tmp_path, "train.total_iter=2", *common)
    assert "merge_bn_startpoint 3 is after train.total_iter 2" in run_log(
        os.path.join(tmp_path, "tiny"))
    models = os.path.join(tmp_path, "tiny", "models")
    assert (build_from_state_dict(load_state_dict_file(os.path.join(models, "2_G.safetensors")))
            .m_down1[0].res[1].__class__.__name__ == "BatchNorm2d")
    run_tiny(option_file, tmp_path, "train.total_iter=4", *common)
    run_tiny(option_file, tmp_path, "train.total_iter=5", *common)
    assert ckpt.complete_checkpoints(models) == [5]
    kwargs = read_fbcnn_kwargs(os.path.join(models, "5_G.safetensors"))
    assert kwargs["act_mode"] == "R" and kwargs["global_skip"]  # the fold keeps the skip
    net = load_model(os.path.join(models, "5_G.safetensors")).net
    assert net.global_skip and not any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    log = run_log(os.path.join(tmp_path, "tiny"))
    assert "BatchNorm folded" in log and "resuming from iteration 4" in log
    assert all(np.isfinite(v) for _, v in run_losses(os.path.join(tmp_path, "tiny")))


def test_merge_bn_restarts_adam_but_keeps_the_learning_rate_schedule(option_file):
    model = tiny_model(option_file, "netG.act_mode=BR", "train.G_scheduler_type=CosineAnnealingLR",
                        "train.G_scheduler_eta_min=1e-5", "train.total_iter=6")
    lrs = []
    for step in range(1, 7):
        if step == 4:
            model.merge_bnorm()
            assert net_act_mode(model.bare) == "R" and not model.G_optimizer.state
        model.optimize_parameters(step)
        lrs.append(model.current_learning_rate())
        model.update_learning_rate()
    assert lrs == pytest.approx([cosine(t, 6) for t in range(6)], rel=1e-12)


def test_rerunning_a_finished_folded_run_reports_no_changed_option(option_file, tmp_path):
    """A recipe that folds BatchNorm, run to its end and started again unchanged: the
    optimiser's base rate is still train.G_optimizer_lr (not the rate at the fold)."""
    common = ["netG.act_mode=BR", "merge_bn=true", "merge_bn_startpoint=2", "datasets.test=null",
              "train.G_scheduler_type=CosineAnnealingLR", "train.total_iter=3"]
    run_tiny(option_file, tmp_path, *common)
    state = ckpt.load_training_state(os.path.join(tmp_path, "tiny", "models"), 3)[1]
    assert [g["initial_lr"] for g in state["optimizer"]["param_groups"]] == [1e-3]
    assert run_tiny(option_file, tmp_path, *common) == {"start": 3, "end": 3}
    log = run_log(os.path.join(tmp_path, "tiny"))
    assert "nothing to do" in log and "the options differ" not in log


def test_moving_merge_bn_startpoint_across_the_checkpoint_resumes(option_file, tmp_path):
    common = ["netG.act_mode=BR", "merge_bn=true", "datasets.test=null"]
    folded, later = tmp_path / "folded", tmp_path / "later"
    # folded at 2, then the start point moved after the checkpoint: stays folded
    run_tiny(option_file, folded, *common, "merge_bn_startpoint=2", "train.total_iter=3")
    run_tiny(option_file, folded, *common, "merge_bn_startpoint=5", "train.total_iter=6")
    # not folded by 2, then the start point moved before the checkpoint: folded at the resume
    run_tiny(option_file, later, *common, "merge_bn_startpoint=9", "train.total_iter=2")
    run_tiny(option_file, later, *common, "merge_bn_startpoint=1", "train.total_iter=3")
    assert "BatchNorm folded now" in run_log(os.path.join(later, "tiny"))
    for root, last in ((folded, 6), (later, 3)):
        weights = os.path.join(root, "tiny", "models", f"{last}_G.safetensors")
        assert read_fbcnn_kwargs(weights)["act_mode"] == "R"
        assert all(np.isfinite(v) for _, v in run_losses(os.path.join(root, "tiny")))


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
            run_tiny(option_file, tmp_path, "train.total_iter=1", "datasets.test=null")
    assert sorted(os.listdir(run_dir)) == [".lock"]  # nothing written, the log neither
    run_tiny(option_file, tmp_path, "train.total_iter=1", "datasets.test=null")  # released: runs
    run_tiny(option_file, tmp_path, "train.total_iter=2", "datasets.test=null")
    assert len(os.listdir(run_dir / "options")) == 2  # both starts recorded, same second or not


def test_an_interrupted_run_says_where_it_will_resume(option_file, tmp_path, monkeypatch):
    real = ModelFBCNN.optimize_parameters

    def stop_at_4(self, step):
        if step == 4:
            raise KeyboardInterrupt
        return real(self, step)

    monkeypatch.setattr(ModelFBCNN, "optimize_parameters", stop_at_4)
    with pytest.raises(KeyboardInterrupt):
        run_tiny(option_file, tmp_path, "train.total_iter=6", "train.checkpoint_save=2",
             "datasets.test=null")
    assert "interrupted at iteration 4; the next start resumes from iteration 2" in run_log(
        os.path.join(tmp_path, "tiny"))


@pytest.mark.parametrize("gated", [False, True])
def test_pretrained_netG_is_the_starting_point(option_file, reference_run, tmp_path, gated):
    """Also for a netG with a skip gate from weights without one: the gate starts closed, so
    the first loss is the pretrained network's own."""
    pretrained = os.path.join(reference_run, "models", "6_G.safetensors")
    gate = ["netG.global_skip=true", "netG.skip_gate=true"] if gated else []
    run_tiny(option_file, tmp_path, "train.total_iter=1", "datasets.test=null",
             f"path.pretrained_netG={pretrained}", *gate)
    (_, logged), = run_losses(os.path.join(tmp_path, "tiny"))
    opt = load_options(option_file)
    dataset = define_dataset(opt["datasets"]["train"], "train", 3, seed=11)
    batch = default_collate([dataset[k] for k in IterationBatchSampler(6, 4, seed=11).batch(1)])
    net = build_from_state_dict(load_state_dict_file(pretrained)).train()
    with torch.no_grad():
        E, qf = net(batch["L"].float() / 255)
    expected = F.l1_loss(E, batch["H"].float() / 255) + 0.001 * F.l1_loss(qf, batch["qf"])
    assert logged == pytest.approx(float(expected), rel=1e-5)
    log = run_log(os.path.join(tmp_path, "tiny"))
    assert "starting from pretrained netG" in log
    assert ("has no skip gate: it starts closed" in log) == gated


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
    assert run_tiny(option_file, tmp_path, "train.total_iter=6",
                "datasets.test=null") == {"start": 4, "end": 6}
    run_dir = os.path.join(tmp_path, "tiny")
    assert (f"resuming from iteration 4: {models / '4_G.pth'}, weights only (a checkpoint of the "
            f"original): the optimiser starts fresh, the learning rate is the schedule's at "
            f"iteration 4 (5.000e-04)") in run_log(run_dir)
    records = run_records(run_dir, "train")
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
