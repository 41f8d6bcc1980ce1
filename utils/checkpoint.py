"""Training checkpoints: atomic writes, completeness, discovery and safe loading.

This module owns the on-disk layout of a run's `models/` folder. A checkpoint of iteration N is:
- `N_G.safetensors`: the network (tensors only), with metadata `fbcnn_kwargs` (the FBCNN
  constructor arguments) and `iteration`; `--model PATH` loads it;
- `N_state.pth`: optimizer, scheduler, gradient scaler, iteration, RNG states and the resolved
  options as JSON text: plain values only, loaded with `torch.load(weights_only=True)`;
- `N_done.json`: written last, listing the files and their sizes; only a checkpoint with a
  matching one counts as complete.
Each file is written atomically (`utils.fileio.atomic_write`): a crash at any moment leaves the
previous complete checkpoint usable, and a full disk raises a WriteError naming the file.
A run folder of the original (KAIR) holds `N_G.pth` alone, the network's state dict: such a
file with neither `N_state.pth` nor `N_done.json` beside it is a weights-only checkpoint
(`weights_only_checkpoints`); `resume_point` takes the newest of both kinds.
"""
import json
import logging
import os
import random
import re

import numpy as np
import torch
from safetensors.torch import load_file as load_safetensors_file
from safetensors.torch import save as save_safetensors_bytes

from utils.errors import UserError
from utils.fileio import atomic_write, atomic_write_bytes, make_folder, remove_stale_temporaries

__all__ = ["atomic_write", "save_network", "save_checkpoint", "complete_checkpoints",
           "latest_checkpoint", "weights_only_checkpoints", "resume_point",
           "load_training_state", "remove_checkpoint", "remove_stale_temporaries", "rng_state",
           "set_rng_state", "network_file"]

logger = logging.getLogger(f"fbcnn.{__name__}")

_DONE_RE = re.compile(r"^(\d+)_done\.json$")
_ORIGINAL_RE = re.compile(r"^(\d+)_G\.pth$")
_NETWORK_FILE = "{}_G.safetensors"


def rng_state():
    """The global RNG states as plain values and tensors (safe for weights_only loading)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(),
            "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state):
    """Restore what `rng_state` returned (cuda states only where the devices exist)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][:torch.cuda.device_count()])


def save_network(path, net_state, net_kwargs=None, metadata=None, dtype=None, fsync=True,
                 replace=True):
    """Write a network's state dict as safetensors, atomically; returns `path`.

    `net_kwargs` (the FBCNN constructor arguments) go into the metadata as `fbcnn_kwargs`, so
    the file loads without guessing the architecture; `metadata` adds string entries. `dtype`
    (e.g. torch.float16, for shipped weights) converts the floating-point tensors.
    `replace=False` never replaces an existing file (FileExistsError, nothing written).
    """
    entries = {"format": "pt", **{k: str(v) for k, v in (metadata or {}).items()}}
    if net_kwargs is not None:
        entries["fbcnn_kwargs"] = json.dumps(net_kwargs, sort_keys=True)
    if dtype is not None:
        net_state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in net_state.items()}
    net_state = {k: v.detach().cpu().contiguous() for k, v in net_state.items()}
    return atomic_write_bytes(path, save_safetensors_bytes(net_state, metadata=entries),
                              fsync=fsync, replace=replace)


def save_checkpoint(models_dir, iteration, net_state, training_state, net_kwargs=None):
    """Write checkpoint `iteration`: network, training state, then the completion marker.

    `net_kwargs` (the FBCNN constructor arguments) go into the safetensors metadata. Returns the
    network file's path. Raises WriteError when a file cannot be written.
    """
    make_folder(models_dir)
    net_name, state_name = f"{iteration}_G.safetensors", f"{iteration}_state.pth"
    save_network(os.path.join(models_dir, net_name), net_state, net_kwargs,
                 metadata={"iteration": iteration})
    atomic_write(os.path.join(models_dir, state_name), lambda f: torch.save(training_state, f))
    sizes = {name: os.path.getsize(os.path.join(models_dir, name))
             for name in (net_name, state_name)}
    manifest = json.dumps({"iteration": iteration, "files": sizes}, indent=1).encode()
    atomic_write_bytes(os.path.join(models_dir, f"{iteration}_done.json"), manifest)
    return os.path.join(models_dir, net_name)


def _manifest(models_dir, iteration):
    try:
        with open(os.path.join(models_dir, f"{iteration}_done.json"), encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return None
    for name, size in manifest.get("files", {}).items():
        path = os.path.join(models_dir, name)
        if not os.path.isfile(path) or os.path.getsize(path) != size:
            return None
    return manifest


def complete_checkpoints(models_dir):
    """Iterations of the complete checkpoints in `models_dir`, ascending."""
    if not os.path.isdir(models_dir):
        return []
    found = [int(m.group(1)) for m in map(_DONE_RE.match, os.listdir(models_dir)) if m]
    return sorted(i for i in found if _manifest(models_dir, i) is not None)


def latest_checkpoint(models_dir):
    """The newest complete checkpoint's iteration, or None."""
    done = complete_checkpoints(models_dir)
    return done[-1] if done else None


def weights_only_checkpoints(models_dir):
    """Iterations of the original's checkpoints in `models_dir` (`N_G.pth` with neither
    `N_state.pth` nor `N_done.json`), ascending."""
    if not os.path.isdir(models_dir):
        return []
    names = set(os.listdir(models_dir))
    found = [int(m.group(1)) for m in map(_ORIGINAL_RE.match, names) if m]
    return sorted(i for i in found
                  if f"{i}_state.pth" not in names and f"{i}_done.json" not in names)


def resume_point(models_dir):
    """`(iteration, weights_only)` of the newest checkpoint to resume from, or None: a complete
    checkpoint of this project, or a weights-only one of the original, whichever is newer."""
    points = [(i, False) for i in complete_checkpoints(models_dir)]
    points += [(i, True) for i in weights_only_checkpoints(models_dir)]
    return max(points) if points else None


def network_file(models_dir, iteration):
    """Path of checkpoint `iteration`'s network file, `N_G.safetensors`."""
    return os.path.join(models_dir, _NETWORK_FILE.format(iteration))


def _load(path, loader):
    try:
        return loader(path)
    except Exception as exc:  # truncated or tampered files all land here
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise UserError(f"{path}: cannot load checkpoint ({detail})") from None


def _torch_load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def load_training_state(models_dir, iteration):
    """(network state dict, training state) of a complete checkpoint, loaded without running
    pickled code (safetensors, and `torch.load(weights_only=True)`)."""
    net_state = _load(network_file(models_dir, iteration), load_safetensors_file)
    state = _load(os.path.join(models_dir, f"{iteration}_state.pth"), _torch_load)
    return net_state, state


def remove_checkpoint(models_dir, iteration):
    """Delete a checkpoint, its completion marker first so it never looks complete half-deleted."""
    names = [f"{iteration}_done.json", f"{iteration}_state.pth", _NETWORK_FILE.format(iteration)]
    for name in names:
        path = os.path.join(models_dir, name)
        if os.path.exists(path):
            os.remove(path)
