"""Model names, downloads and safe loading of FBCNN weights.

This module owns how a `--model` argument becomes a network ready to run:
- a registered name (`fbcnn_color`, `fbcnn_gray`, `fbcnn_gray_double`) is looked up in
  `model_zoo/`, downloaded from the official release on first use (progress bar, timeout,
  sha256 check, written to a temporary file and renamed into place only once verified);
- a path to a `.pth`/`.pt` or `.safetensors` state dict is loaded without running pickled code
  (`torch.load(weights_only=True)` or safetensors), and the architecture (in/out channels,
  nc, nb, act/down/upsample modes) is inferred from its keys and shapes, or read from the
  `fbcnn_kwargs` metadata of a `.safetensors` file (training checkpoints write it; it also
  tells ReLU from LeakyReLU and average from max pooling, which the keys cannot);
- the name `jpeg` is a pseudo-model that returns its input, for the JPEG rows of the tables.
"""
import hashlib
import http.client
import logging
import json
import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass

import torch
from tqdm import tqdm

from models.network_fbcnn import FBCNN
from utils import REPO_ROOT
from utils.errors import UserError
from utils.fileio import atomic_write
from utils.weight_codec import decode_int8, is_int8_encoded

__all__ = ["RELEASE_URL", "MODEL_ZOO", "ZooEntry", "LoadedModel", "download", "available_models",
           "default_model", "model_folder", "local_weight_file", "resolve_weights", "sha256_file",
           "load_state_dict_file", "read_fbcnn_kwargs", "infer_fbcnn_kwargs", "load_model",
           "DEFAULT_MODEL_DIR"]

LOG = logging.getLogger(f"fbcnn.{__name__}")
RELEASE_URL = "https://github.com/jiaxi-jiang/FBCNN/releases/download/v1.0/"
DEFAULT_MODEL_DIR = os.path.join(REPO_ROOT, "model_zoo")
JPEG_MODEL = "jpeg"


@dataclass(frozen=True)
class ZooEntry:
    """A registered weight file: its name, how to verify it, whether it is downloaded (the
    released weights) or `bundled`, shipped in the repository's model_zoo/ (the lite models),
    and its architecture, the FBCNN constructor arguments beyond the channels (`arch`; empty:
    the released nc [64, 128, 256, 512], nb 4). Loading reads the architecture from the file
    itself; `arch` builds the untrained network (torch.hub with pretrained=False)."""
    filename: str
    sha256: str
    in_nc: int
    bundled: bool = False
    arch: tuple = ()  # (name, value) pairs, e.g. (("nc", (8, 16, 32, 64)), ("nb", 2))

    def build(self):
        """The entry's FBCNN, randomly initialised."""
        kwargs = {name: list(value) if isinstance(value, tuple) else value
                  for name, value in self.arch}
        return FBCNN(in_nc=self.in_nc, out_nc=self.in_nc, **kwargs)


MODEL_ZOO = {
    "fbcnn_color": ZooEntry("fbcnn_color.pth",
                            "8b0e4ef23d59cf7ac934a342cb31a17619e4fa4a0b3374a9d78c5174312387e8", 3),
    "fbcnn_gray": ZooEntry("fbcnn_gray.pth",
                           "7beec25b883a6c3bd7d103429b78a2371f7e85c1f5261a6e2e5d0702d9e9f977", 1),
    "fbcnn_gray_double": ZooEntry(
        "fbcnn_gray_double.pth", "4444b8b2393649a4acd5d8730410ec3106d15b6e262a49081e4e87b44cfa5cea",
        1),
    # trained on a 2-core CPU with options/train_fbcnn_color_lite_cpu.json, then
    # train_fbcnn_color_lite_cpu_allqf.json (QF 5..100, single and double JPEG; docs/training.md, 8)
    "fbcnn_color_lite": ZooEntry(
        "fbcnn_color_lite.safetensors",
        "c6053bb8f7282a4b99a70748b288acb94dc789f1977225f8097513404f81b3c9", 3, bundled=True,
        arch=(("nc", (8, 16, 32, 64)), ("nb", 2))),
    # trained on a 2-core CPU with options/train_fbcnn_gray_lite_cpu.json, then
    # train_fbcnn_gray_lite_cpu_allqf.json (QF 5..100, single and double JPEG)
    "fbcnn_gray_lite": ZooEntry(
        "fbcnn_gray_lite.safetensors",
        "a52e439186a8f4d3751cc049184b473bfbbadb739e38e80cf687c9bb2100ebac", 1, bundled=True,
        arch=(("nc", (8, 16, 32, 64)), ("nb", 2))),
}


def sha256_file(path, chunk=1 << 20):
    """The hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def download(url, dest, sha256, timeout=30.0, progress=True, advice=""):
    """Download `url` to `dest`, verifying its sha256; `dest` appears only once verified.

    The bytes go through `utils.fileio.atomic_write`, so nothing is left under `dest` (or
    beside it) after a failure: network error, timeout, truncated transfer, hash mismatch, full
    disk. Raises UserError with the URL and the place to put a manual download, then `advice`.
    """
    manual = (f"download {url} by hand and put it at {dest} "
              f"(its sha256 must be {sha256}){advice}")

    def fetch(out):
        digest, received, writing = hashlib.sha256(), 0, False
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                total = response.headers.get("Content-Length")
                total = int(total) if total and total.isdigit() else None
                with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                          desc=os.path.basename(dest), disable=not progress or None) as bar:
                    for block in iter(lambda: response.read(1 << 20), b""):
                        writing = True
                        out.write(block)
                        writing = False
                        digest.update(block)
                        received += len(block)
                        bar.update(len(block))
        except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
            if writing:
                raise  # the disk refused the write: atomic_write says so, naming `dest`
            if isinstance(exc, urllib.error.HTTPError):
                reason = f"HTTP {exc.code} {exc.reason}"
            else:
                reason = getattr(exc, "reason", None) or exc
            raise UserError(f"cannot download {url} ({reason}); {manual}") from None
        if total is not None and received != total:
            raise UserError(f"download of {url} was cut short ({received} of {total} bytes); "
                            f"try again, or {manual}")
        actual = digest.hexdigest()
        if actual != sha256:
            raise UserError(f"{url} downloaded with sha256 {actual}, expected {sha256}; "
                            f"the file was not kept; {manual}")

    return atomic_write(dest, fetch)


def model_folder(model_dir=None):
    """The folder registered weights are looked for and downloaded to: `model_dir`, else
    $FBCNN_MODEL_DIR, else the repository's model_zoo/."""
    return model_dir or os.environ.get("FBCNN_MODEL_DIR") or DEFAULT_MODEL_DIR


def local_weight_file(name, model_dir=None):
    """Where the registered model `name`'s file is without a download: the model folder, or
    for a bundled model also the repository's model_zoo/; None when it is in neither."""
    entry = MODEL_ZOO[name]
    folders = [model_folder(model_dir)] + ([DEFAULT_MODEL_DIR] if entry.bundled else [])
    for folder in folders:
        path = os.path.join(folder, entry.filename)
        if os.path.isfile(path):
            return path
    return None


def available_models(model_dir=None):
    """The registered names whose weight file is already at hand (the model folder:
    `model_dir`, else $FBCNN_MODEL_DIR, else model_zoo/; the bundled ones in model_zoo/):
    those load without a download."""
    return [name for name in MODEL_ZOO if local_weight_file(name, model_dir)]


def default_model(released, lite, model_dir=None):
    """`released` when its weights are at hand, else the bundled `lite` model (logged once
    per pair): what the tools use when no model is named, so that they work offline."""
    here = available_models(model_dir)
    if released in here or lite not in here:
        return released
    if (released, lite) not in _fallbacks_told:
        _fallbacks_told.add((released, lite))
        LOG.info("%s is not in %s: using the bundled %s (a small model trained on a CPU; "
                 "docs/models.md); name %s to download the released weights (about "
                 "288 MB)", MODEL_ZOO[released].filename, model_folder(model_dir), lite, released)
    return lite


_fallbacks_told = set()


def resolve_weights(name, model_dir=None, base_url=None, progress=True, timeout=30.0):
    """Path of the verified weight file for a registered name, downloading it if missing.

    `base_url` (or the environment variable FBCNN_MODEL_URL) replaces the release URL, for
    mirrors. An existing file is checked against its sha256 before use. A failed download
    says how else to get the file (FBCNN_MODEL_DIR, FBCNN_MODEL_URL) and which registered
    models are already in the model folder.
    """
    entry = MODEL_ZOO[name]
    model_dir = model_folder(model_dir)
    base_url = base_url or os.environ.get("FBCNN_MODEL_URL") or RELEASE_URL
    path = os.path.join(model_dir, entry.filename)
    url = base_url.rstrip("/") + "/" + entry.filename
    local = local_weight_file(name, model_dir)
    if local is not None:
        actual = sha256_file(local)
        if actual != entry.sha256:
            fix = (f"restore the repository's copy (git checkout -- model_zoo/{entry.filename})"
                   if entry.bundled else f"delete it to download again from {url}")
            raise UserError(f"{local} has sha256 {actual}, expected {entry.sha256} for {name}; "
                            f"{fix}")
        return local
    if entry.bundled:
        raise UserError(f"{name} ships with the repository as model_zoo/{entry.filename}, which "
                        f"is missing from {DEFAULT_MODEL_DIR}; restore it with git checkout -- "
                        f"model_zoo/{entry.filename}")
    advice = (f", or set FBCNN_MODEL_DIR to a folder that holds {entry.filename}, or "
              f"FBCNN_MODEL_URL to a mirror of {base_url.rstrip('/')}/")
    here = available_models(model_dir)
    bundled = [n for n in here if MODEL_ZOO[n].bundled]
    in_folder = [n for n in here if not MODEL_ZOO[n].bundled]
    if in_folder:
        advice += f"; models already in {model_dir}, no download needed: {', '.join(in_folder)}"
    if bundled:
        advice += (f"; models that ship with the repository, no download needed: "
                   f"{', '.join(bundled)}")
    return download(url, path, entry.sha256, timeout=timeout, progress=progress, advice=advice)


def _strip_wrappers(state_dict):
    for key in ("params_ema", "params", "state_dict", "netG", "model"):
        if key in state_dict and isinstance(state_dict[key], dict):
            state_dict = state_dict[key]
            break
    if state_dict and all(k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module."):]: v for k, v in state_dict.items()}
    return state_dict


def load_state_dict_file(path):
    """Load a state dict from `.safetensors` or a torch file, never running pickled code; an
    int8-encoded file (`utils.weight_codec`) comes back decoded, in float32."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such weight file")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            state_dict = load_file(path, device="cpu")
        else:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt, truncated or unsafe files all land here
        raise UserError(f"{path}: not a loadable state dict ({_load_failure(exc)})") from None
    if not isinstance(state_dict, dict):
        raise UserError(f"{path}: expected a state dict, found {type(state_dict).__name__}")
    state_dict = _strip_wrappers(state_dict)
    if not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise UserError(f"{path}: expected a state dict of tensors")
    if is_int8_encoded(state_dict):
        try:
            state_dict = decode_int8(state_dict)
        except ValueError as exc:
            raise UserError(f"{path}: broken int8 weights ({exc})") from None
    return state_dict


def infer_fbcnn_kwargs(state_dict, source="state dict"):
    """FBCNN constructor arguments that reproduce the keys and shapes of `state_dict`."""
    required = ("m_head.weight", "m_tail.weight", "m_down2.0.res.0.weight",
                "m_down3.0.res.0.weight", "m_body_encoder.0.res.0.weight")
    missing = [k for k in required if k not in state_dict]
    if missing:
        raise UserError(f"{source}: not an FBCNN state dict (missing {', '.join(missing)})")
    nb = len({m.group(1) for k in state_dict
              for m in [re.match(r"m_body_encoder\.(\d+)\.", k)] if m})
    if f"m_down1.{nb}.weight" in state_dict and state_dict[f"m_down1.{nb}.weight"].shape[-1] == 2:
        downsample_mode = "strideconv"
    else:
        downsample_mode = "avgpool"  # avg and max pooling have the same (parameter-free) keys
    if "m_up3.0.weight" in state_dict:
        upsample_mode = "convtranspose"
    elif "m_up3.0.1.weight" in state_dict:
        upsample_mode = "upconv"
    else:
        upsample_mode = "pixelshuffle"
    act_mode = "BR" if "m_down1.0.res.1.running_mean" in state_dict else "R"
    head, tail = state_dict["m_head.weight"], state_dict["m_tail.weight"]
    nc = [head.shape[0], state_dict["m_down2.0.res.0.weight"].shape[0],
          state_dict["m_down3.0.res.0.weight"].shape[0],
          state_dict["m_body_encoder.0.res.0.weight"].shape[0]]
    return dict(in_nc=head.shape[1], out_nc=tail.shape[0], nc=[int(c) for c in nc], nb=nb,
                act_mode=act_mode, downsample_mode=downsample_mode, upsample_mode=upsample_mode,
                # an ungated skip has no key of its own: the metadata says when it is on
                global_skip="to_skip_gate.weight" in state_dict,
                skip_gate="to_skip_gate.weight" in state_dict)


def read_fbcnn_kwargs(path):
    """The FBCNN constructor arguments in a `.safetensors` file's metadata, or None."""
    if not str(path).endswith(".safetensors"):
        return None
    from safetensors import safe_open
    try:
        with safe_open(path, framework="pt") as f:
            text = (f.metadata() or {}).get("fbcnn_kwargs")
    except Exception:  # an unreadable file is reported by load_state_dict_file
        return None
    if not text:
        return None
    try:
        kwargs = json.loads(text)
    except json.JSONDecodeError:
        raise UserError(f"{path}: metadata fbcnn_kwargs is not valid JSON") from None
    if not isinstance(kwargs, dict):
        raise UserError(f"{path}: metadata fbcnn_kwargs is not a JSON object")
    return kwargs


def build_from_state_dict(state_dict, source="state dict", kwargs=None):
    """An FBCNN in eval mode holding `state_dict` (loaded strictly).

    The architecture is inferred from the keys and shapes; `kwargs` (stored metadata) override
    the inferred values, and the strict load checks that they fit the weights.
    """
    inferred = infer_fbcnn_kwargs(state_dict, source)
    if kwargs:
        unknown = sorted(set(kwargs) - set(inferred))
        if unknown:
            raise UserError(f"{source}: metadata fbcnn_kwargs has unknown keys "
                            f"{', '.join(unknown)}; known: {', '.join(inferred)}")
        inferred.update(kwargs)
    kwargs = inferred
    try:
        net = FBCNN(**kwargs)
    except (TypeError, ValueError) as exc:
        raise UserError(f"{source}: cannot build FBCNN{kwargs} ({exc})") from None
    try:
        net.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:300]
        raise UserError(f"{source}: keys or shapes do not match FBCNN{kwargs} ({detail})") from None
    return net.eval()


@dataclass
class LoadedModel:
    """A model ready to restore: `net` is None for the `jpeg` pseudo-model (identity)."""
    name: str
    net: object
    in_nc: object  # 1 or 3, None when any channel count works (the jpeg pseudo-model)


def _load_failure(exc):
    """The reason a weight file did not load, in one line. torch.load's weights_only error
    starts by suggesting weights_only=False, which would run the file's code: never echoed."""
    text = " ".join(str(exc).split())
    if text.startswith("Weights only load failed"):
        detail = text.split(" Check the documentation")[0]
        for marker in ("trusted source.", "WeightsUnpickler error:"):
            detail = detail.split(marker)[-1]
        return (f"corrupt, or holds objects other than tensors, which are not loaded "
                f"({detail.strip()[:160]})")
    return text[:200] or type(exc).__name__


def model_label(name_or_path):
    """A short name for results folders: the registered name or the file's stem; for a
    training checkpoint (`<task>/models/<iter>_G.*`), `<task>_<iter>_G`, so that checkpoints
    of different runs do not share results folders."""
    if name_or_path in MODEL_ZOO or name_or_path == JPEG_MODEL:
        return name_or_path
    path = os.path.abspath(name_or_path.rstrip("/"))
    stem = os.path.splitext(os.path.basename(path))[0]
    models_dir = os.path.dirname(path)
    if re.fullmatch(r"\d+_G", stem) and os.path.basename(models_dir) == "models":
        task = os.path.basename(os.path.dirname(models_dir))
        if task:
            return f"{task}_{stem}"
    return stem


def load_model(name_or_path, device="cpu", model_dir=None, progress=True, option="--model"):
    """Resolve `--model` (a zoo name, `jpeg`, or a weight file path) to a LoadedModel;
    `option` is the flag every failure is reported under (e.g. `--gray-model`)."""
    label = model_label(name_or_path)
    if name_or_path == JPEG_MODEL:
        return LoadedModel(label, None, None)
    if name_or_path not in MODEL_ZOO and not os.path.isfile(name_or_path):
        known = ", ".join([JPEG_MODEL, *MODEL_ZOO])
        raise UserError(f"{option} {name_or_path!r}: not a known model name ({known}) "
                        f"nor an existing .pth/.safetensors file")
    try:
        path = (resolve_weights(name_or_path, model_dir=model_dir, progress=progress)
                if name_or_path in MODEL_ZOO else name_or_path)
        state_dict = load_state_dict_file(path)
        net = build_from_state_dict(state_dict, source=path, kwargs=read_fbcnn_kwargs(path))
    except UserError as exc:  # a failed download, a corrupt or foreign file: it names the file
        named = f" {name_or_path}" if name_or_path in MODEL_ZOO else ""  # a path is in `exc`
        raise UserError(f"{option}{named}: {exc}") from None
    net = net.to(device)
    return LoadedModel(label, net, net.in_nc)
