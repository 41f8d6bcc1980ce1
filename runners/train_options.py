"""What a training option file holds: the schema of `main_train_fbcnn.py`'s options and the
checks across keys.

This module owns the meaning of every training option (`SCHEMA`: type, default, allowed
values, one line of documentation each) and the rules that tie keys together (channels of the
dataset type and the network, the cosine schedule's end, BatchNorm folding, batch size per
process, data folders). The reading, overriding and checking itself is the generic engine of
`utils/options.py`; the dataset types and network names come from their registries
(`data.dataset_jpeg.DATASET_PRESETS`, `models.select_network.NETWORKS`), so they are listed in
one place. `python -m runners.train_options` prints the table of docs/training.md.
"""
import argparse
import os
import sys

from data.dataset_jpeg import DATASET_PRESETS, dataset_channels
from data.jpeg import SAMPLINGS
from models.inference import PRECISIONS
from models.model_fbcnn import IMAGE_LOSSES, QF_LOSSES
from models.select_network import NETWORKS
from utils.errors import UserError
from utils.options import Key, Section, origin_namer, read_option_file, reference_markdown, resolve

__all__ = ["SCHEMA", "validate", "load_options", "options_reference_markdown"]

_MILESTONES = [200000, 400000, 1200000, 1600000, 1800000]
_INIT_TYPES = ("orthogonal", "normal", "uniform", "xavier_normal", "xavier_uniform",
               "kaiming_normal", "kaiming_uniform", "default", "none")

SCHEMA = Section({
    "task": Key("str", doc="run name; results go to `<path.root>/<task>/`"),
    "model": Key("str", "fbcnn", "training model (loss, optimiser, step)", choices=("fbcnn",)),
    "gpu_ids": Key("list_int", [0], "CUDA device of a single-process run (the first id); `[]` "
                   "trains on the CPU (a non-empty list on a machine without CUDA is refused). "
                   "Under torchrun each process uses `cuda:LOCAL_RANK` instead",
                   minimum=0),
    "n_channels": Key("int", 3, "channels the clean training images are read with; the gray "
                      "datasets convert RGB themselves, so keep 3", choices=(1, 3)),
    "merge_bn": Key("bool", False, "fold BatchNorm into the convolutions at "
                    "`merge_bn_startpoint` (needs a `B` in `netG.act_mode`); the net then has "
                    "the released `R` layout"),
    "merge_bn_startpoint": Key("int", None, "iteration at which `merge_bn` folds BatchNorm",
                               nullable=True, minimum=1),
    "path": Section({
        "root": Key("str", "deblocking", "folder that holds one folder per task"),
        "pretrained_netG": Key("str", None, "state dict (`.pth`/`.safetensors`) to start from "
                               "when there is no checkpoint to resume", nullable=True),
    }),
    "datasets": Section({
        "train": Section({
            "name": Key("str", "train_dataset", "label used in logs"),
            "dataset_type": Key("str", doc="how clean patches become training pairs "
                                "(data/dataset_jpeg.py)", choices=tuple(DATASET_PRESETS),
                                registry="dataset type"),
            "dataroot_H": Key("str", doc="folder of clean images (searched recursively)"),
            "dataroot_L": Key("str", None, "ignored: the JPEG inputs are made on the fly",
                              nullable=True),
            "H_size": Key("int", 96, "patch size P", minimum=1),
            "dataloader_shuffle": Key("bool", True, "visit the images in a seeded random order"),
            "dataloader_num_workers": Key("int", 8, "loader processes in all, divided among the "
                                          "training processes, and at most the machine's "
                                          "cores for each (with a warning)", minimum=0),
            "dataloader_batch_size": Key("int", 128, "patches per iteration in all, divided "
                                         "among the training processes", minimum=1),
            "dataloader_pin_memory": Key("bool", True, "pinned host memory (GPU only)"),
            "dataloader_persistent_workers": Key("bool", True, "keep loader processes alive"),
            "dataloader_prefetch_factor": Key("int", 2, "batches each loader process prepares "
                                              "ahead", minimum=1),
            "qf_uniform_prob": Key("float", None, "share of the first JPEGs whose QF is drawn "
                                   "uniformly from the dataset type's range instead of from "
                                   "its list of decades; null: the dataset type's (0.25, as "
                                   "the original). Higher values show the network more high "
                                   "QFs (the lite CPU recipes)", nullable=True, minimum=0,
                                   maximum=1),
            "qf_range": Key("list_int", None, "inclusive range of the uniform QF draws of "
                            "the first JPEG; null: the dataset type's ([8, 96] for `jpeg`, "
                            "[5, 95] for the others, as the original). Up to 100 covers the "
                            "qualities of camera and web JPEGs", nullable=True, minimum=1,
                            maximum=100, length=2),
            "identity_prob": Key("float", None, "share of the single-JPEG samples left "
                                 "uncompressed (input = target, QF label 100), so the network "
                                 "learns to keep a clean image; null: 0, as the original",
                                 nullable=True, minimum=0, maximum=1),
            "double_prob": Key("float", None, "share of the iterations that are non-aligned "
                               "double JPEG; null: the dataset type's (0.5 for the double "
                               "types, 0 for the others)", nullable=True, minimum=0, maximum=1),
            "samplings": Key("list_str", None, "chroma samplings of the colour training JPEGs, "
                             "one drawn per JPEG (`444`, `422`, `420`); null: OpenCV's 4:2:0 "
                             "alone, as the original", nullable=True, choices=tuple(SAMPLINGS)),
            "scale_range": Key("list_float", None, "[lo, hi], 0 < lo <= hi <= 1: each clean "
                               "crop is a window 1/s as large, s uniform in [lo, hi], shrunk "
                               "to the crop by area averaging (more content from few images); "
                               "null: the original's crops", nullable=True, length=2,
                               minimum=0, exclusive_min=True, maximum=1),
            "graphics_prob": Key("float", None, "share of the clean patches replaced by a "
                                 "graphic made from them (dithers, posterized images, lines, "
                                 "stripes, text: `data/graphics.py`), content photographs never "
                                 "show; null: 0, photographs only, as the original",
                                 nullable=True, minimum=0, maximum=1),
            "cache": Key("str", "none", "`memory`: decode every training image once and keep it "
                         "in RAM (small sets only)", choices=("none", "memory")),
        }),
        "test": Section({
            "name": Key("str", "test_dataset", "label used in logs and image folders"),
            "dataset_type": Key("str", "jpeg", "any dataset type; the test images follow "
                                "`netG.in_nc` (1: OpenCV grayscale read, 3: RGB)",
                                choices=tuple(DATASET_PRESETS), registry="dataset type"),
            "dataroot_H": Key("str", doc="folder of clean test images"),
            "dataroot_L": Key("str", None, "ignored: the JPEG inputs are made at `qf`",
                              nullable=True),
            "qf": Key("int", 10, "JPEG quality of the validation inputs", minimum=0, maximum=100),
            "save_images": Key("bool", True, "write each restored test image to `images/`"),
        }, optional=True, doc="validation set; leave out to train without validation"),
    }),
    "netG": Section({
        "net_type": Key("str", "fbcnn", "network name in `models/select_network.py`",
                        choices=tuple(NETWORKS), registry="network type"),
        "in_nc": Key("int", 3, "input channels", choices=(1, 3)),
        "out_nc": Key("int", 3, "output channels (equal to in_nc)", choices=(1, 3)),
        "nc": Key("list_int", [64, 128, 256, 512], "widths of the four scales", minimum=1,
                  length=4),
        "nb": Key("int", 4, "blocks per stage", minimum=1),
        "act_mode": Key("str", "R", "`R`: ReLU (released weights) | `BR`: BatchNorm + ReLU | "
                        "`L` | `BL` (LeakyReLU)", choices=("R", "BR", "L", "BL")),
        "upsample_mode": Key("str", "convtranspose", "",
                             choices=("convtranspose", "upconv", "pixelshuffle")),
        "downsample_mode": Key("str", "strideconv", "",
                               choices=("strideconv", "avgpool", "maxpool")),
        "global_skip": Key("bool", False, "add the input to the output, so the identity is the "
                           "zero residual (not in the released models: docs/lite_trials.md 8.10)"),
        "skip_gate": Key("bool", False, "gate the global skip: blend output and input by a gate "
                         "learned from the QF embedding, starting closed (needs `global_skip`; "
                         "docs/lite_trials.md 8.11)"),
        "init_type": Key("str", "orthogonal", "weight init of Conv/Linear layers, as KAIR",
                         choices=_INIT_TYPES),
        "init_bn_type": Key("str", "uniform", "BatchNorm init, as KAIR",
                            choices=("uniform", "constant")),
        "init_gain": Key("float", 0.2, "gain of the weight init"),
        "init_gain_linear": Key("float", None, "gain of the Linear layers' init, which in FBCNN "
                                "are the QF paths alone (QF head MLP, QF embedding, gamma, "
                                "beta); null: `init_gain`, as the original. Raise it only with "
                                "`train.qf_input_prob` (docs/training.md, section 8)",
                                nullable=True, minimum=0),
        "init_gain_qf_head": Key("float", None, "gain of the QF head's Linear layers (its MLP "
                                 "after the global pooling) apart from the other QF paths; "
                                 "null: as `init_gain_linear`", nullable=True, minimum=0),
    }),
    "train": Section({
        "G_lossfn_type": Key("str", "l1", "image loss: mean absolute error, mean or summed "
                             "squared error, `1 - SSIM` (KAIR's SSIM loss: 11x11 Gaussian "
                             "window, per channel) or Charbonnier (not in the original)",
                             choices=tuple(IMAGE_LOSSES)),
        "G_lossfn_weight": Key("float", 1.0, "weight of the image loss", minimum=0),
        "QF_lossfn_type": Key("str", "l1", "QF loss: mean absolute, mean squared or summed "
                              "squared error over the samples whose label is not NaN",
                              choices=QF_LOSSES),
        "QF_lossfn_weight": Key("float", 0.001, "weight of the QF loss", minimum=0),
        "qf_input_prob": Key("float", 0.0, "probability that an iteration whose samples all "
                             "carry a QF label gives the decoder the true labels as `qf_input` "
                             "instead of the predicted QF (not in the original; 0: never)",
                             minimum=0, maximum=1),
        "trainable": Key("list_str", None, "train only the parameters whose names start with "
                         "one of these (e.g. [\"qf_pred\"]: the QF head alone, so a fed QF "
                         "restores exactly as the loaded network); the rest stay as loaded; "
                         "null: every parameter", nullable=True),
        "G_optimizer_type": Key("str", "adam", "", choices=("adam",)),
        "G_optimizer_lr": Key("float", 2e-5, "learning rate", minimum=0, exclusive_min=True),
        "G_optimizer_betas": Key("list_float", [0.9, 0.999], "Adam betas", minimum=0, length=2),
        "G_optimizer_wd": Key("float", 0.0, "Adam weight decay", minimum=0),
        "G_optimizer_clipgrad": Key("float", None, "clip the gradient's global L2 norm to this "
                                    "value; null or 0: off", nullable=True, minimum=0),
        "G_scheduler_type": Key("str", "MultiStepLR", "`MultiStepLR` (the original's) | "
                                "`CosineAnnealingLR` (from the learning rate down to "
                                "G_scheduler_eta_min at train.total_iter; for short runs)",
                                choices=("MultiStepLR", "CosineAnnealingLR")),
        "G_scheduler_milestones": Key("list_int", _MILESTONES, "iterations after which the "
                                      "learning rate is multiplied by the gamma", minimum=0),
        "G_scheduler_gamma": Key("float", 0.5, "", minimum=0, exclusive_min=True),
        "G_scheduler_eta_min": Key("float", 0.0, "CosineAnnealingLR: the learning rate reached "
                                   "at train.total_iter", minimum=0),
        "G_regularizer_orthstep": Key("int", None, "every this many iterations pull the "
                                      "singular values of conv weights into [0.5, 1.5] (KAIR); "
                                      "null or 0: off", nullable=True, minimum=0),
        "G_regularizer_clipstep": Key("int", None, "every this many iterations pull weights "
                                      "into [-1.5, 1.5] (KAIR); null or 0: off",
                                      nullable=True, minimum=0),
        "checkpoint_test": Key("int", 2500, "validate every this many iterations", minimum=1),
        "checkpoint_save": Key("int", 5000, "save a checkpoint every this many iterations",
                               minimum=1),
        "checkpoint_print": Key("int", 500, "log the losses every this many iterations",
                                minimum=1),
        "checkpoint_keep": Key("int", None, "keep only the newest this many checkpoints; "
                               "null: keep all", nullable=True, minimum=1),
        "total_iter": Key("int", None, "stop (and save) at this iteration; null: run until "
                          "stopped, as the original", nullable=True, minimum=1),
        "max_nonfinite_steps": Key("int", 10, "an iteration with a NaN or infinite loss is "
                                   "skipped with a warning; this many in a row stop the run",
                                   minimum=1),
        "manual_seed": Key("int", None, "seed of the initialisation and of every training "
                           "sample; null: drawn once and stored with the run", nullable=True,
                           minimum=0, maximum=2 ** 32 - 1),
        "precision": Key("str", "fp32", "arithmetic of the training step, as inference's "
                         "`--precision`: `fp32` (IEEE fp32, TF32 off: faithful) | `tf32` (cuDNN "
                         "and cuBLAS may use TF32: PyTorch's default for convolutions, so the "
                         "original's on GPUs that have TF32) | `bf16` | `fp16` (autocast; fp16 "
                         "with a gradient scaler) | `auto` (bf16 where the device has native "
                         "bf16: a GPU with it, a CPU with AVX-512 bf16 or AMX; else fp32)",
                         choices=(*PRECISIONS, "auto")),
        "channels_last": Key("bool", False, "NHWC memory format for the network and batches"),
        "cudnn_benchmark": Key("bool", False, "let cuDNN pick the fastest convolution kernels"),
        "compile": Key("bool", False, "`torch.compile` the training forward and backward "
                       "(compiled in the first iteration; saving and validation use the plain "
                       "network)"),
    }),
})


# where training images come from: none are in the repository (trainsets/ is git-ignored)
TRAINING_DATA_HINT = ("training images are not in the repository: put clean images there (the "
                      "lite recipes used 269 clean 256x256 tiles; python -m "
                      "runners.prepare_subimages cuts tiles from DIV2K + Flickr2K, "
                      "docs/training.md, section 1), or train on any folder of clean images "
                      "with --set datasets.train.dataroot_H=DIR")


def _check_folder(path, where, what, hint=""):
    if not os.path.isdir(path):
        relative = "" if os.path.isabs(path) else f" (relative to {os.getcwd()})"
        raise UserError(f"{where}: {what} folder {path!r} does not exist{relative}"
                        + (f"; {hint}" if hint else ""))


def _cross_checks(opt, origin, world_size, check_paths):
    train_set, test_set, net, train = (opt["datasets"]["train"], opt["datasets"]["test"],
                                       opt["netG"], opt["train"])
    task = opt["task"]
    if task.strip() in ("", ".", "..") or "/" in task or os.sep in task:
        raise UserError(f"{origin('task')}: {task!r} is not a folder name (the run goes to "
                        "<path.root>/<task>/)")

    if net["skip_gate"] and not net["global_skip"]:
        raise UserError(f"{origin('netG.skip_gate')}: gates the global skip, so it needs "
                        "netG.global_skip true")
    channels = dataset_channels(train_set["dataset_type"])
    if net["in_nc"] != channels:
        raise UserError(f"{origin('netG.in_nc')}: dataset type {train_set['dataset_type']!r} "
                        f"yields {channels}-channel patches, so netG.in_nc must be {channels}, "
                        f"got {net['in_nc']}")
    if net["out_nc"] != net["in_nc"]:
        raise UserError(f"{origin('netG.out_nc')}: must equal netG.in_nc ({net['in_nc']}), "
                        f"got {net['out_nc']}")
    if channels == 3 and opt["n_channels"] != 3:
        raise UserError(f"{origin('n_channels')}: dataset type {train_set['dataset_type']!r} "
                        f"trains on colour, so n_channels must be 3")
    scale_range = train_set["scale_range"]
    if scale_range is not None and scale_range[0] > scale_range[1]:
        raise UserError(f"{origin('datasets.train.scale_range')}: [lo, hi] with lo <= hi, "
                        f"got {scale_range}")
    qf_range = train_set["qf_range"]
    if qf_range is not None and qf_range[0] > qf_range[1]:
        raise UserError(f"{origin('datasets.train.qf_range')}: [low, high] with low <= high, "
                        f"got {qf_range}")
    if train_set["double_prob"] and not DATASET_PRESETS[train_set["dataset_type"]].double:
        raise UserError(f"{origin('datasets.train.double_prob')}: dataset type "
                        f"{train_set['dataset_type']!r} is single JPEG; choose a double type "
                        f"({', '.join(k for k, d in DATASET_PRESETS.items() if d.double)})")
    if train["G_scheduler_type"] == "CosineAnnealingLR" and train["total_iter"] is None:
        raise UserError(f"{origin('train.G_scheduler_type')}: CosineAnnealingLR decays the "
                        f"learning rate until train.total_iter, which is null; set it")
    milestones = train["G_scheduler_milestones"]
    if milestones != sorted(milestones):
        raise UserError(f"{origin('train.G_scheduler_milestones')}: must be in increasing "
                        f"order, got {milestones}")
    if opt["merge_bn"]:
        if "B" not in net["act_mode"]:
            raise UserError(f"{origin('merge_bn')}: needs BatchNorm in netG.act_mode "
                            f"(BR or BL), got {net['act_mode']!r}")
        if opt["merge_bn_startpoint"] is None:
            raise UserError(f"{origin('merge_bn_startpoint')}: set the iteration at which "
                            f"merge_bn folds BatchNorm")
    if any(b >= 1 for b in train["G_optimizer_betas"]):
        raise UserError(f"{origin('train.G_optimizer_betas')}: each beta must be < 1, got "
                        f"{train['G_optimizer_betas']}")
    batch = train_set["dataloader_batch_size"]
    if batch % world_size:
        raise UserError(f"{origin('datasets.train.dataloader_batch_size')}: {batch} is not "
                        f"divisible by the {world_size} training processes")
    if check_paths:
        _check_folder(train_set["dataroot_H"], origin("datasets.train.dataroot_H"), "training",
                      TRAINING_DATA_HINT)
        if test_set is not None:
            _check_folder(test_set["dataroot_H"], origin("datasets.test.dataroot_H"), "test")
        pretrained = opt["path"]["pretrained_netG"]
        if pretrained is not None and not os.path.isfile(pretrained):
            raise UserError(f"{origin('path.pretrained_netG')}: no such file {pretrained!r}")


def validate(raw, source="options", overridden=(), world_size=1, check_paths=True):
    """A resolved copy of `raw` (defaults filled) or a UserError naming `source` and the key.

    `overridden` holds the dotted keys set by `--set`, so their errors name `--set` instead of
    the file. `check_paths` also checks that the data folders and pretrained file exist.
    """
    origin = origin_namer(source, overridden)
    opt = resolve(raw, SCHEMA, origin)
    _cross_checks(opt, origin, world_size, check_paths)
    return opt


def load_options(path, overrides=(), world_size=None, check_paths=True):
    """Read, override and validate an option file; `world_size` defaults to $WORLD_SIZE or 1."""
    raw, touched = read_option_file(path, overrides)
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    return validate(raw, source=path, overridden=touched, world_size=world_size,
                    check_paths=check_paths)


def options_reference_markdown():
    """The training options reference as a Markdown table (dotted key, type, default, meaning)."""
    return reference_markdown(SCHEMA)


if __name__ == "__main__":
    argparse.ArgumentParser(
        prog="python -m runners.train_options",
        description="Print every training option, its type, default and meaning, as the "
                    "Markdown table of docs/training.md.").parse_args()
    sys.stdout.write(options_reference_markdown() + "\n")
