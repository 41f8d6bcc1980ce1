"""The tiny training run the training tests share (tests/test_train*.py): its option file, the
readers of a run folder (metrics.jsonl, train.log), a one-step model, and the waits of the
subprocess tests. The fixtures built on it, `option_file` and `reference_run`, are in
tests/conftest.py."""
import json
import math
import os
import time

import cv2
import numpy as np
import torch

from models.model_fbcnn import ModelFBCNN
from runners.train_options import load_options
from runners.training import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN = os.path.join(ROOT, "main_train_fbcnn.py")
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}


def write_images(folder, count, shape, seed):
    folder.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(count):
        img = cv2.GaussianBlur((rng.random(shape) * 255).astype(np.uint8), (5, 5), 1.5)
        cv2.imwrite(str(folder / f"im{i}.png"), img)
    return str(folder)


def write_tiny_options(base):
    """A tiny colour run in `base`: nc [8,16,32,64], nb 1, 16x16 patches, batch 4, lr halved
    after 3; returns its option file."""
    opt = {
        "task": "tiny", "gpu_ids": [],
        "path": {"root": str(base / "runs")},
        "datasets": {
            "train": {"dataset_type": "jpeg", "H_size": 16, "dataloader_batch_size": 4,
                      "dataloader_num_workers": 0,
                      "dataroot_H": write_images(base / "train", 6, (40, 48, 3), 1)},
            "test": {"dataset_type": "jpeg", "name": "tinytest",
                     "dataroot_H": write_images(base / "test", 2, (24, 32, 3), 2)}},
        "netG": {"nc": [8, 16, 32, 64], "nb": 1, "act_mode": "R"},
        "train": {"G_optimizer_lr": 1e-3, "G_scheduler_milestones": [3], "total_iter": 6,
                  "checkpoint_print": 1, "checkpoint_save": 2, "checkpoint_test": 3,
                  "manual_seed": 11}}
    path = base / "tiny.json"
    path.write_text("// tiny test run\n" + json.dumps(opt, indent=1))
    return str(path)


def run_tiny(option_file, root, *overrides):
    return train(load_options(option_file, [f"path.root={root}", *overrides]))


def run_records(run_dir, kind):
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [r for r in map(json.loads, f) if r["kind"] == kind]


def run_losses(run_dir):
    return [(r["iter"], r["loss"]) for r in run_records(run_dir, "train")]


def run_log(run_dir):
    with open(os.path.join(run_dir, "train.log"), encoding="utf-8") as f:
        return f.read()


def tiny_model(option_file, *overrides):
    """The tiny run's model, fed one batch of two 16x16 patches (the second one unlabelled)."""
    opt = load_options(option_file, list(overrides))
    torch.manual_seed(0)
    model = ModelFBCNN(opt, torch.device("cpu"))
    g = torch.Generator().manual_seed(1)
    H = (torch.rand(2, 3, 16, 16, generator=g) * 255).to(torch.uint8)
    model.feed_data({"H": H, "L": (H.float() * 0.9).to(torch.uint8),
                     "qf": torch.tensor([[0.5], [float("nan")]])})
    return model


def cosine(t, total, lr0=1e-3, eta_min=1e-5):  # lr0: the tiny options' G_optimizer_lr
    return eta_min + (lr0 - eta_min) * (1 + math.cos(math.pi * t / total)) / 2


def wait_for(predicate, timeout, proc):
    """Polls `predicate` until it holds (True), `proc` exits or `timeout` s pass (False)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.2)
    return False
