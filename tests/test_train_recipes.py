"""Tests of what a run starts from: the shipped lite recipes (options/*_lite*.json), the
initialisation and the QF paths' gains, the network registry and merge_bn, saving, and the
device, worker and precision choices (models/select_network.py, runners/training.py,
utils/checkpoint.py)."""
import json
import logging
import os
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open

import main_train_fbcnn
from data.dataset_jpeg import IterationBatchSampler, define_dataset
from models.model_fbcnn import regularizer_clip
from models.model_zoo import (infer_fbcnn_kwargs, load_model,
                              read_fbcnn_kwargs)
from models.network_fbcnn import FBCNN
from models.select_network import define_G, init_weights, merge_bn
from runners.train_options import load_options
from runners.training import train
from utils import checkpoint as ckpt
from utils.checkpoint import save_network
from utils.dist import DistInfo
from utils.errors import UserError
from utils.logger import progress_bar

from tests.train_support import ROOT, run_records, run_tiny, write_images

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name, in_nc", [("color_lite", 3), ("gray_lite", 1)])
def test_lite_option_files_train_and_save_the_lite_network(name, in_nc, tmp_path):
    """options/train_fbcnn_*_lite.json (the bundled models' recipe) as they are, on tiny data."""
    path = os.path.join(ROOT, "options", f"train_fbcnn_{name}.json")
    images = write_images(tmp_path / "images", 3, (48, 56, 3), 4)
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
                                          "global_skip": False, "skip_gate": False}
    net = load_model(weights).net
    # gray: the head conv has 2 x 16 x 9 fewer weights, the tail conv 2 x 16 x 9 + 2 biases
    assert sum(p.numel() for p in net.parameters()) == 5_375_652 - (3 - in_nc) * (288 + 1)
    assert len(run_records(run_dir, "test")) >= 1


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
    images = write_images(tmp_path / "images", 3, (48, 56, 3), 4)
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
    images = write_images(tmp_path / "images", 3, (152, 160, 3), 4)  # H_size + 16 (the shift)
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


@pytest.mark.parametrize("global_skip, skip_gate", [(False, False), (True, False), (True, True)])
def test_registry_and_merge_bn_equivalence(global_skip, skip_gate):
    with pytest.raises(UserError, match="'dncnn' is unknown; known: fbcnn"):
        define_G({"net_type": "dncnn"})
    net = define_G({"net_type": "fbcnn", "in_nc": 1, "out_nc": 1, "nc": [8, 16, 32, 64], "nb": 1,
                    "act_mode": "BR", "downsample_mode": "strideconv",
                    "upsample_mode": "convtranspose", "global_skip": global_skip,
                    "skip_gate": skip_gate, "init_type": "orthogonal",
                    "init_bn_type": "uniform", "init_gain": 0.2,
                    "init_gain_linear": None, "init_gain_qf_head": None})
    if skip_gate:
        assert not net.to_skip_gate.weight.any()  # the init leaves the gate closed
        torch.nn.init.normal_(net.to_skip_gate.weight, std=0.02)
    x = torch.rand(3, 1, 24, 24)
    with torch.no_grad():
        net(x)  # training-mode pass moves the running statistics away from their init
        net.eval()
        merged = merge_bn(net).eval()
        (e1, q1), (e2, q2) = net(x), merged(x)
    assert (merged.global_skip, merged.skip_gate) == (global_skip, skip_gate)
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
    run_tiny(option_file, tmp_path, "datasets.train.dataset_type=jpeggraydouble", "netG.in_nc=1",
         "netG.out_nc=1", "train.total_iter=8", "train.checkpoint_save=8", "datasets.test=null")
    sampler = IterationBatchSampler(6, 4, seed=11, double_prob=0.5)
    doubles = [sampler.is_double(t) for t in range(1, 9)]
    assert any(doubles) and not all(doubles)
    records = run_records(os.path.join(tmp_path, "tiny"), "train")
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
