"""Training options: JSON with `//` comments, validated against a schema before any work starts.

This module owns what a training option file may contain and what each key means:
- `parse_json_with_comments` reads KAIR-style JSON (`//` comments outside strings, no `eval`);
- `apply_overrides` applies `--set dotted.key=value` pairs (values parsed with `json.loads`,
  falling back to the plain string);
- `validate` checks every key against `SCHEMA` (unknown keys name the dotted path and the nearest
  valid key, wrong types, out-of-range values, dataset/network names, channel counts, data folders,
  batch size versus the number of processes) and fills missing optional keys with their defaults.
Every error is a one-line `UserError` naming the option file (or `--set`) and the dotted key.
"""
import copy
import difflib
import json
import math
import os
from dataclasses import dataclass

from utils.errors import UserError

__all__ = ["Key", "Section", "SCHEMA", "REQUIRED", "parse_json_with_comments", "parse_override",
           "apply_overrides", "validate", "load_options", "options_reference_markdown",
           "dataset_channels"]


class _Required:
    def __repr__(self):
        return "required"


REQUIRED = _Required()


@dataclass(frozen=True)
class Key:
    """One option: its type, default (or REQUIRED), allowed values and meaning.

    `kind` is one of str, int, float, bool, list_int, list_float. `minimum` applies to numbers and
    to list elements; `exclusive_min` makes it strict.
    """
    kind: str
    default: object = REQUIRED
    doc: str = ""
    choices: tuple = None
    nullable: bool = False
    minimum: float = None
    maximum: float = None
    exclusive_min: bool = False
    length: int = None


@dataclass(frozen=True)
class Section:
    """A nested object of options; an optional section may be left out entirely."""
    keys: dict
    doc: str = ""
    optional: bool = False


_MILESTONES = [200000, 400000, 1200000, 1600000, 1800000]
_INIT_TYPES = ("orthogonal", "normal", "uniform", "xavier_normal", "xavier_uniform",
               "kaiming_normal", "kaiming_uniform", "default", "none")

SCHEMA = Section({
    "task": Key("str", doc="run name; results go to `<path.root>/<task>/`"),
    "model": Key("str", "fbcnn", "training model (loss, optimiser, step)", choices=("fbcnn",)),
    "gpu_ids": Key("list_int", [0], "CUDA device of a single-process run (the first id); `[]` "
                   "forces the CPU. Under torchrun each process uses `cuda:LOCAL_RANK` instead",
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
            "dataset_type": Key("str", doc="`jpeg` | `jpeggray` | `jpeggraydouble` | `jpegdouble`"),
            "dataroot_H": Key("str", doc="folder of clean images (searched recursively)"),
            "dataroot_L": Key("str", None, "ignored: the JPEG inputs are made on the fly",
                              nullable=True),
            "H_size": Key("int", 96, "patch size P", minimum=1),
            "dataloader_shuffle": Key("bool", True, "visit the images in a seeded random order"),
            "dataloader_num_workers": Key("int", 8, "loader processes in all, divided among the "
                                          "training processes", minimum=0),
            "dataloader_batch_size": Key("int", 128, "patches per iteration in all, divided "
                                         "among the training processes", minimum=1),
            "dataloader_pin_memory": Key("bool", True, "pinned host memory (GPU only)"),
            "dataloader_persistent_workers": Key("bool", True, "keep loader processes alive"),
            "dataloader_prefetch_factor": Key("int", 2, "batches each loader process prepares "
                                              "ahead", minimum=1),
            "cache": Key("str", "none", "`memory`: decode every training image once and keep it "
                         "in RAM (small sets only)", choices=("none", "memory")),
        }),
        "test": Section({
            "name": Key("str", "test_dataset", "label used in logs and image folders"),
            "dataset_type": Key("str", "jpeg", "any dataset type; the test images follow "
                                "`netG.in_nc` (1: OpenCV grayscale read, 3: RGB)"),
            "dataroot_H": Key("str", doc="folder of clean test images"),
            "dataroot_L": Key("str", None, "ignored: the JPEG inputs are made at `qf`",
                              nullable=True),
            "qf": Key("int", 10, "JPEG quality of the validation inputs", minimum=0, maximum=100),
            "save_images": Key("bool", True, "write each restored test image to `images/`"),
        }, optional=True, doc="validation set; leave out to train without validation"),
    }),
    "netG": Section({
        "net_type": Key("str", "fbcnn", "network name in `models/select_network.py`"),
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
        "init_type": Key("str", "orthogonal", "weight init of Conv/Linear layers, as KAIR",
                         choices=_INIT_TYPES),
        "init_bn_type": Key("str", "uniform", "BatchNorm init, as KAIR",
                            choices=("uniform", "constant")),
        "init_gain": Key("float", 0.2, "gain of the weight init"),
        "init_gain_linear": Key("float", None, "gain of the Linear layers' init, which in FBCNN "
                                "are the QF paths alone (QF head MLP, QF embedding, gamma, "
                                "beta); null: `init_gain`, as the original. Raise it only with "
                                "`train.qf_input_prob` (docs/training.md, section 6)", nullable=True,
                                minimum=0),
    }),
    "train": Section({
        "G_lossfn_type": Key("str", "l1", "image loss",
                             choices=("l1", "l2", "l2sum", "charbonnier")),
        "G_lossfn_weight": Key("float", 1.0, "weight of the image loss", minimum=0),
        "QF_lossfn_type": Key("str", "l1", "QF loss (skipped per sample where the label is NaN)",
                              choices=("l1", "l2")),
        "QF_lossfn_weight": Key("float", 0.001, "weight of the QF loss", minimum=0),
        "qf_input_prob": Key("float", 0.0, "probability that an iteration whose samples all "
                             "carry a QF label gives the decoder the true labels as `qf_input` "
                             "instead of the predicted QF (not in the original; 0: never)",
                             minimum=0, maximum=1),
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
        "amp": Key("str", "off", "`off` (fp32, faithful) | `bf16` | `fp16` (with a gradient "
                   "scaler)", choices=("off", "bf16", "fp16")),
        "channels_last": Key("bool", False, "NHWC memory format for the network and batches"),
        "cudnn_benchmark": Key("bool", False, "let cuDNN pick the fastest convolution kernels"),
        "compile": Key("bool", False, "`torch.compile` the training forward and backward "
                       "(compiled in the first iteration; saving and validation use the plain "
                       "network)"),
    }),
})


def parse_json_with_comments(text, source="options"):
    """Parse JSON where `//` starts a comment outside strings; duplicate keys are errors."""
    out, i, n, in_string = [], 0, len(text), False
    while i < n:
        ch = text[i]
        if in_string:
            out.append(ch)
            if ch == "\\" and i + 1 < n:
                out.append(text[i + 1])
                i += 1
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
            out.append(ch)
        elif text.startswith("//", i):
            end = text.find("\n", i)
            end = n if end < 0 else end
            out.append(" " * (end - i))  # keep columns so decode errors point at the right place
            i = end
            continue
        else:
            out.append(ch)
        i += 1

    def no_duplicates(pairs):
        seen = {}
        for key, value in pairs:
            if key in seen:
                raise UserError(f"{source}: key {key!r} appears twice in the same object")
            seen[key] = value
        return seen

    try:
        return json.loads("".join(out), object_pairs_hook=no_duplicates)
    except json.JSONDecodeError as exc:
        raise UserError(f"{source}: invalid JSON at line {exc.lineno} column {exc.colno} "
                        f"({exc.msg})") from None


def parse_override(text):
    """`dotted.key=value` -> (['dotted', 'key'], value); the value is JSON or else a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise UserError(f"--set {text!r}: expected dotted.key=value")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(opt, overrides):
    """Apply `--set` strings to a raw options dict; returns the dotted keys that were set."""
    touched = set()
    for text in overrides:
        parts, value = parse_override(text)
        node = opt
        for depth, part in enumerate(parts[:-1]):
            if node.get(part) is None:
                node[part] = {}
                touched.add(".".join(parts[:depth + 1]))  # created here: errors name --set
            if not isinstance(node[part], dict):
                raise UserError(f"--set {text!r}: {'.'.join(parts[:depth + 1])} is not an object")
            node = node[part]
        node[parts[-1]] = value
        touched.add(".".join(parts))
    return touched


def _all_paths(section, prefix=""):
    for name, spec in section.keys.items():
        path = f"{prefix}{name}"
        yield path, spec
        if isinstance(spec, Section):
            yield from _all_paths(spec, path + ".")


def _suggest(name, section, prefix):
    """The likeliest key meant: the same name in another section (a misplaced key), else the
    closest name in this section, else the closest name anywhere."""
    leaves = [(path, path.rsplit(".", 1)[-1]) for path, _ in _all_paths(SCHEMA)]
    misplaced = [path for path, leaf in leaves if leaf == name]
    if misplaced:
        return f"did you mean {misplaced[0]!r}?"
    close = difflib.get_close_matches(name, list(section.keys), n=1, cutoff=0.6)
    if close:
        return f"did you mean '{prefix}{close[0]}'?"
    score, path = max((difflib.SequenceMatcher(None, name, leaf).ratio(), path)
                      for path, leaf in leaves)
    if score >= 0.8:
        return f"did you mean {path!r}?"
    return "valid keys here: " + ", ".join(prefix + k for k in section.keys)


def _type_name(spec):
    names = {"str": "a string", "int": "an integer", "float": "a number", "bool": "true or false",
             "list_int": "a list of integers", "list_float": "a list of numbers"}
    text = names[spec.kind]
    if spec.length:
        text = text.replace("a list", f"a list of {spec.length}").replace(" of integers",
                                                                          " integers")
        text = text.replace(" of numbers", " numbers")
    return text + (" or null" if spec.nullable else "")


def _check_number(value, spec, where):
    if not math.isfinite(value):  # JSON's NaN and Infinity, which Python's parser accepts
        raise UserError(f"{where}: must be a finite number, got {value}")
    if spec.minimum is not None:
        if value < spec.minimum or (spec.exclusive_min and value == spec.minimum):
            bound = f"> {spec.minimum}" if spec.exclusive_min else f">= {spec.minimum}"
            raise UserError(f"{where}: must be {bound}, got {value}")
    if spec.maximum is not None and value > spec.maximum:
        raise UserError(f"{where}: must be <= {spec.maximum}, got {value}")


def _check_scalar(value, kind, where, spec):
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if kind == "int" and is_int:
        _check_number(value, spec, where)
        return value
    if kind == "float" and (is_int or isinstance(value, float)):
        _check_number(value, spec, where)
        return float(value)
    if kind == "str" and isinstance(value, str):
        return value
    if kind == "bool" and isinstance(value, bool):
        return value
    raise UserError(f"{where}: expected {_type_name(spec)}, got {json.dumps(value)}")


def _check_value(value, spec, where):
    if value is None:
        if spec.nullable:
            return None
        raise UserError(f"{where}: expected {_type_name(spec)}, got null")
    if spec.kind.startswith("list_"):
        if not isinstance(value, list):
            raise UserError(f"{where}: expected {_type_name(spec)}, got {json.dumps(value)}")
        if spec.length is not None and len(value) != spec.length:
            raise UserError(f"{where}: expected {_type_name(spec)}, got {json.dumps(value)}")
        item_kind = spec.kind[len("list_"):]
        return [_check_scalar(v, item_kind, f"{where}[{i}]", spec) for i, v in enumerate(value)]
    value = _check_scalar(value, spec.kind, where, spec)
    if spec.choices is not None and value not in spec.choices:
        choices = ", ".join(json.dumps(c) for c in spec.choices)
        raise UserError(f"{where}: {json.dumps(value)} is not one of {choices}")
    return value


def _validate_section(raw, section, prefix, origin):
    if not isinstance(raw, dict):
        where = origin(prefix.rstrip(".")) if prefix else origin("")
        raise UserError(f"{where}: expected an object, got {json.dumps(raw)[:60]}")
    for name in raw:
        if name not in section.keys:
            path = prefix + name
            raise UserError(f"{origin(path)}: unknown key {path!r}; "
                            f"{_suggest(name, section, prefix)}")
    resolved = {}
    for name, spec in section.keys.items():
        path = prefix + name
        if isinstance(spec, Section):
            if name not in raw or raw[name] is None:
                if spec.optional:
                    resolved[name] = None
                    continue
                raw_sub = {}
            else:
                raw_sub = raw[name]
            resolved[name] = _validate_section(raw_sub, spec, path + ".", origin)
        elif name in raw:
            resolved[name] = _check_value(raw[name], spec, origin(path))
        elif spec.default is REQUIRED:
            raise UserError(f"{origin(path)}: missing required key {path!r} ({spec.doc})")
        else:
            resolved[name] = copy.deepcopy(spec.default)
    return resolved


def dataset_channels(dataset_type):
    """Channels of the patches a training dataset type yields (1 for the gray presets)."""
    from data.dataset_jpeg import DATASET_PRESETS
    return 1 if DATASET_PRESETS[dataset_type].gray else 3


def _check_registry_name(value, known, where, what):
    if value not in known:
        close = difflib.get_close_matches(value, list(known), n=1, cutoff=0.5)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise UserError(f"{where}: unknown {what} {value!r}; {hint}known: {', '.join(known)}")


def _check_folder(path, where, what):
    if not os.path.isdir(path):
        raise UserError(f"{where}: {what} folder {path!r} does not exist")


def _cross_checks(opt, origin, world_size, check_paths):
    from data.dataset_jpeg import DATASET_PRESETS
    from models.select_network import NETWORKS

    train_set, test_set, net, train = (opt["datasets"]["train"], opt["datasets"]["test"],
                                       opt["netG"], opt["train"])
    _check_registry_name(train_set["dataset_type"], DATASET_PRESETS,
                         origin("datasets.train.dataset_type"), "dataset type")
    if test_set is not None:
        _check_registry_name(test_set["dataset_type"], DATASET_PRESETS,
                             origin("datasets.test.dataset_type"), "dataset type")
    _check_registry_name(net["net_type"], NETWORKS, origin("netG.net_type"), "network type")
    task = opt["task"]
    if task.strip() in ("", ".", "..") or "/" in task or os.sep in task:
        raise UserError(f"{origin('task')}: {task!r} is not a folder name (the run goes to "
                        "<path.root>/<task>/)")

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
        _check_folder(train_set["dataroot_H"], origin("datasets.train.dataroot_H"), "training")
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
    overridden = set(overridden)

    def origin(path):
        if path in overridden or any(path.startswith(k + ".") for k in overridden):
            return f"--set {path}"
        return f"{source}: {path}" if path else source

    opt = _validate_section(raw, SCHEMA, "", origin)
    _cross_checks(opt, origin, world_size, check_paths)
    return opt


def load_options(path, overrides=(), world_size=None, check_paths=True):
    """Read, override and validate an option file; `world_size` defaults to $WORLD_SIZE or 1."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise UserError(f"{path}: cannot read option file ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not a UTF-8 text file (byte {exc.start})") from None
    raw = parse_json_with_comments(text, source=path)
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a JSON object at the top level")
    touched = apply_overrides(raw, overrides)
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    return validate(raw, source=path, overridden=touched, world_size=world_size,
                    check_paths=check_paths)


def options_reference_markdown():
    """The options reference as a Markdown table (dotted key, type, default, meaning)."""
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for path, spec in _all_paths(SCHEMA):
        if isinstance(spec, Section):
            if spec.doc:
                lines.append(f"| `{path}` | object | {'optional' if spec.optional else ''} | "
                             f"{spec.doc.replace('|', chr(92) + '|')} |")
            continue
        if spec.choices is not None:
            kind = " \\| ".join(json.dumps(c) for c in spec.choices)
        else:
            kind = _type_name(spec)
        default = "required" if spec.default is REQUIRED else f"`{json.dumps(spec.default)}`"
        doc = spec.doc.replace("|", "\\|")
        lines.append(f"| `{path}` | {kind} | {default} | {doc} |")
    return "\n".join(lines)


if __name__ == "__main__":
    import argparse
    import sys
    argparse.ArgumentParser(
        prog="python -m utils.options",
        description="Print every training option, its type, default and meaning, as the "
                    "Markdown table of docs/training.md.").parse_args()
    sys.stdout.write(options_reference_markdown() + "\n")
