"""Training checkpoints: atomic writes, completeness, discovery and safe loading.

This module owns the on-disk layout of a run's `models/` folder. A checkpoint of iteration N is:
- `N_G.pth`: the network as a plain state dict of tensors, which the test scripts load with
  `--model PATH` (`models.model_zoo.load_state_dict_file`);
- `N_state.pth`: optimizer, scheduler, gradient scaler, iteration, RNG states (python, numpy,
  torch, cuda) and the resolved options as JSON text: only tensors and plain Python values, so
  it loads with `torch.load(weights_only=True)`;
- `N_done.json`: written last, listing the files and their sizes. Only a checkpoint with a
  matching `N_done.json` counts as complete.
Each file is written to a temporary file in the same folder, flushed and fsynced, then moved into
place with `os.replace`, and the folder is fsynced; a crash at any moment leaves the previous
complete checkpoint usable.
"""
import json
import logging
import os
import random
import re
import time

import numpy as np
import torch

from utils.errors import UserError

__all__ = ["atomic_write", "save_checkpoint", "complete_checkpoints", "latest_checkpoint",
           "load_training_state", "remove_checkpoint", "remove_stale_temporaries",
           "rng_state", "set_rng_state", "PAUSE_ENV"]

logger = logging.getLogger(__name__)

# Test hook: when set to a file name (e.g. "4_state.pth"), saving that file stops after its
# temporary file is complete and before it is moved into place, so a test can kill the process
# in the middle of a checkpoint.
PAUSE_ENV = "FBCNN_TEST_PAUSE_BEFORE_REPLACE"

_DONE_RE = re.compile(r"^(\d+)_done\.json$")


def _fsync_dir(folder):
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path, write):
    """Create `path` atomically: `write(binary_file)` fills a temporary file, then os.replace."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if os.environ.get(PAUSE_ENV) == os.path.basename(path):
            logger.warning("test hook %s: pausing before moving %s into place", PAUSE_ENV, path)
            while True:
                time.sleep(1)
        os.replace(tmp, path)
        _fsync_dir(folder)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


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


def save_checkpoint(models_dir, iteration, net_state, training_state):
    """Write checkpoint `iteration` (network, training state, then the completion marker)."""
    os.makedirs(models_dir, exist_ok=True)
    files = {f"{iteration}_G.pth": net_state, f"{iteration}_state.pth": training_state}
    sizes = {}
    for name, obj in files.items():
        path = os.path.join(models_dir, name)
        atomic_write(path, lambda f, obj=obj: torch.save(obj, f))
        sizes[name] = os.path.getsize(path)
    manifest = json.dumps({"iteration": iteration, "files": sizes}, indent=1).encode()
    atomic_write(os.path.join(models_dir, f"{iteration}_done.json"), lambda f: f.write(manifest))
    return os.path.join(models_dir, f"{iteration}_G.pth")


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


def load_training_state(models_dir, iteration):
    """(network state dict, training state) of a complete checkpoint, loaded weights_only."""
    loaded = []
    for name in (f"{iteration}_G.pth", f"{iteration}_state.pth"):
        path = os.path.join(models_dir, name)
        try:
            loaded.append(torch.load(path, map_location="cpu", weights_only=True))
        except Exception as exc:  # truncated or tampered files all land here
            detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise UserError(f"{path}: cannot load checkpoint ({detail})") from None
    return loaded[0], loaded[1]


def remove_checkpoint(models_dir, iteration):
    """Delete a checkpoint, its completion marker first so it never looks complete half-deleted."""
    for name in (f"{iteration}_done.json", f"{iteration}_state.pth", f"{iteration}_G.pth"):
        path = os.path.join(models_dir, name)
        if os.path.exists(path):
            os.remove(path)


def remove_stale_temporaries(models_dir):
    """Delete temporary files left by an interrupted save; returns their names."""
    if not os.path.isdir(models_dir):
        return []
    stale = [n for n in os.listdir(models_dir) if n.startswith(".") and ".tmp-" in n]
    for name in stale:
        os.remove(os.path.join(models_dir, name))
    return stale
