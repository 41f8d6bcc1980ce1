"""Inference engines: who runs the network's arithmetic on a CPU.

This module owns the choice between PyTorch (`torch`, the faithful reference), OpenVINO
(`openvino`, an optional extra: `pip install -r requirements-openvino.txt`) and `auto` (the one
measured faster for the pass: `resolve_engine`; main_restore's default), and hands
`models.inference` the network's entry points (`forward`, `encode`, `decode`, `head`,
`qf_features`, `qf_from_pooled`) as one namespace, so tiles, the QF of the whole image,
`qf_input`, batching and 16-bit output work the same with either engine.

OpenVINO runs the two heavy parts, the encoder and the decoder (and the whole network for an
untiled pass); the cheap ones (the first convolution, the QF head's pooled features and MLP)
stay in PyTorch. `precision` "fp32" asks OpenVINO for f32 inference (its default on a CPU with
bf16 instructions is bf16), "bf16" for bf16. Each part is converted once per network and kept
while the network lives, compiled for dynamic shapes (OpenVINO specialises per shape itself);
the parts reach OpenVINO through ONNX and are kept on disk as OpenVINO files (`cache_dir`,
named by a digest of the weights, with OpenVINO's compiled blobs), so the next run skips the
few seconds of tracing and compiling.
"""
import hashlib
import importlib.util
import logging
import os
import tempfile
import weakref

import numpy as np
import torch
from torch import nn

from models.onnx_graphs import FBCNNExport, export_graph
from utils.errors import UserError

__all__ = ["ENGINES", "OPENVINO_PRECISIONS", "INSTALL_OPENVINO", "openvino_available",
           "openvino_fns", "check_engine", "cache_dir", "fastest_options",
           "resolve_engine"]

ENGINES = ("torch", "openvino", "auto")
OPENVINO_PRECISIONS = {"fp32": "f32", "bf16": "bf16"}
INSTALL_OPENVINO = "pip install -r requirements-openvino.txt"
LOG = logging.getLogger(f"fbcnn.{__name__}")
# net -> {(precision, threads): namespace}. The namespaces hold their network, so an entry
# lives as long as the process: freeing OpenVINO's compiled models in a garbage-collected cycle
# crashed the interpreter (a network on which they were kept, collected mid-run)
_CONVERTED = weakref.WeakKeyDictionary()


def openvino_available():
    """Whether the OpenVINO extra is installed: `openvino`, and `onnx` for PyTorch's exporter
    (without importing either)."""
    return all(importlib.util.find_spec(name) is not None for name in ("openvino", "onnx"))


def fastest_options(options, device):
    """`options` (restore() keyword arguments the user set) with the fast defaults of
    main_restore and the demo added on a CPU: the engine "auto" where OpenVINO is installed
    (`resolve_engine`), and PyTorch's channels_last layout; nothing is added with `compile` or
    off the CPU. Each is equal to PyTorch fp32 within 1e-4 in fp32 (tests/test_engines.py)."""
    options = dict(options)
    if torch.device(device).type != "cpu" or options.get("compile"):
        return options
    if "engine" not in options and openvino_available():
        options["engine"] = "auto"
    if options.get("engine", "torch") != "openvino":
        options.setdefault("channels_last", True)
    return options


def resolve_engine(engine, precision="fp32", tiled=False, device="cpu"):
    """The engine that runs a pass: "auto" is OpenVINO where it is installed and runs the
    precision, for an untiled pass or in bf16, and PyTorch for a tiled fp32 pass or off the
    CPU (what measured faster on a 2-core Xeon with AMX: docs/benchmarks.md, "CPU engines";
    OpenVINO runs a tile's encoder and decoder as two calls)."""
    if engine != "auto":
        return engine
    usable = (torch.device(device).type == "cpu" and openvino_available()
              and precision in OPENVINO_PRECISIONS)
    return "openvino" if usable and (not tiled or precision == "bf16") else "torch"


def check_engine(engine, precision="fp32", device="cpu"):
    """ValueError naming the argument unless `engine` can run `precision` on `device`;
    UserError naming the install command when OpenVINO is asked for and missing."""
    if engine not in ENGINES:
        raise ValueError(f"engine={engine!r}: choose one of {', '.join(ENGINES)}")
    if engine in ("torch", "auto"):  # auto falls back to PyTorch where OpenVINO cannot run
        return
    if torch.device(device).type != "cpu":
        raise ValueError(f"engine={engine!r} runs on the CPU; use engine='torch' on {device}")
    if precision not in OPENVINO_PRECISIONS:
        raise ValueError(f"precision={precision!r}: engine 'openvino' runs "
                         f"{' or '.join(OPENVINO_PRECISIONS)}")
    if not openvino_available():
        raise UserError(f"--engine openvino: the openvino package is not installed; "
                        f"{INSTALL_OPENVINO}")


class _Encoder(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net.encode(x, predict_qf=False)[0]


class _Decoder(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x1, x2, x3, x4, b, qf, x=None):  # x: the input, with a global skip
        return self.net.decode((x1, x2, x3, x4, b), qf, x1.shape[-2:], x)


def cache_dir():
    """Where converted networks are kept between runs: $FBCNN_CACHE_DIR, else
    $XDG_CACHE_HOME/fbcnn/openvino (~/.cache/fbcnn/openvino)."""
    if os.environ.get("FBCNN_CACHE_DIR"):
        return os.environ["FBCNN_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fbcnn", "openvino")


# part of every kept file's name: 2 since the parts are traced outside autocast (files of 1
# that a bf16 pass had converted took bf16 inputs), so those are never read again
_FILE_FORMAT = 2


def _weights_key(net):
    """A digest of the network's layout and weights: the name of its converted parts."""
    digest = hashlib.sha256(repr((_FILE_FORMAT, type(net).__name__, net.in_nc, net.out_nc,
                                  net.nc, net.nb, net.global_skip, net.skip_gate)).encode())
    for name, tensor in net.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:32]


def _export(module, example, path):
    """`module` traced to ONNX at `path`, the batch and the image sides dynamic."""
    names = [f"in{k}" for k in range(len(example))]
    axes = {name: ({0: "n", 2: "h", 3: "w"} if t.dim() == 4 else {0: "n"})
            for name, t in zip(names, example)}
    export_graph(module, example, path, names, axes)


def _model_file(ov, core, module, example, path):
    """The OpenVINO IR file (`path`, .xml) of `module`, made by an earlier run or now: exported
    to ONNX, read by OpenVINO, saved as IR (the .bin first, then the .xml: a file that exists
    is whole). OpenVINO's own `convert_model` is not used: it sends usage telemetry unless the
    user has opted out. Returns None where the cache cannot be written (the model then is
    made again by the next run); the model itself is returned as the second value."""
    if os.path.exists(path):
        return path, None
    with tempfile.TemporaryDirectory() as folder:
        onnx = os.path.join(folder, "part.onnx")
        _export(module, example, onnx)
        model = core.read_model(onnx)
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            stem = f"{path[:-4]}.part-{os.getpid()}"
            ov.save_model(model, f"{stem}.xml", compress_to_fp16=False)
            os.replace(f"{stem}.bin", f"{path[:-4]}.bin")
            os.replace(f"{stem}.xml", path)
        except (OSError, RuntimeError) as exc:
            LOG.warning("could not keep the converted network in %s (%s)",
                        os.path.dirname(path), exc)
            return None, model
    return path, None


class _OpenVinoNet:
    """The entry points of `models.inference` over OpenVINO; each part is converted and
    compiled on its first use."""

    def __init__(self, net, precision, threads):
        import openvino as ov  # an optional extra: imported only when this engine runs

        self.ov, self.net, self.compiled = ov, net, {}
        self.core = ov.Core()
        try:
            self.core.set_property({"CACHE_DIR": os.path.join(cache_dir(), "compiled")})
        except RuntimeError as exc:  # a cache folder that cannot be made: compiled each run
            LOG.warning("could not keep the converted network in %s (%s)", cache_dir(),
                        " ".join(str(exc).split())[-200:])
        self.config = {"INFERENCE_PRECISION_HINT": OPENVINO_PRECISIONS[precision],
                       "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads,
                       "ENABLE_CPU_PINNING": False}
        self.key = _weights_key(net)
        self.head, self.qf_features = net.head, net.qf_features
        self.qf_from_pooled = net.qf_from_pooled

    def _part(self, name, *inputs):
        if name not in self.compiled:
            net, dtype = self.net, next(self.net.parameters()).dtype
            x = torch.rand(1, net.in_nc, 32, 32)
            qf = torch.full((1, 1), 0.5)
            try:
                net.float().eval()
                # outside any autocast (a bf16 pass converts its parts under one), so the kept
                # file is fp32 and serves every precision through OpenVINO's own hint
                with torch.no_grad(), torch.autocast("cpu", enabled=False):
                    module, example = {
                        "whole": lambda: (FBCNNExport(net, qf_input=True), (x, qf)),
                        "encoder": lambda: (_Encoder(net), (x,)),
                        "decoder": lambda: (_Decoder(net),
                                            (*net.encode(x, predict_qf=False)[0], qf,
                                             *((x,) if net.global_skip else ())))}[name]()
                    path = os.path.join(cache_dir(), f"{self.key}-{name}.xml")
                    path, model = _model_file(self.ov, self.core, module, example, path)
            finally:
                net.to(dtype)
            # from the file, OpenVINO's CACHE_DIR keeps the compiled blob for the next run too
            self.compiled[name] = self.core.compile_model(path or model, "CPU", self.config)
        compiled = self.compiled[name]
        out = compiled([np.ascontiguousarray(t.detach().float().cpu().numpy()) for t in inputs])
        return [torch.from_numpy(out[k]) for k in range(len(compiled.outputs))]

    def forward(self, x, qf_input=None):
        blind = torch.full((x.shape[0], 1), -1.0)
        restored, qf = self._part("whole", x, blind if qf_input is None else qf_input)
        return restored, qf

    def encode(self, x, predict_qf=True):
        skips = tuple(self._part("encoder", x))
        pooled = self.qf_features(skips[-1]).mean((2, 3)) if predict_qf else None
        return skips, (self.qf_from_pooled(pooled) if predict_qf else None)

    def decode(self, skips, qf, size, x=None):
        inputs = (*skips, qf, x) if self.net.global_skip else (*skips, qf)
        return self._part("decoder", *inputs)[0][..., :size[0], :size[1]]


def openvino_fns(net, precision="fp32"):
    """The network's entry points run by OpenVINO in `precision` (see the module docstring),
    converted once per network, precision and thread count."""
    check_engine("openvino", precision)
    key = (precision, torch.get_num_threads())
    cache = _CONVERTED.setdefault(net, {})
    if key not in cache:
        cache[key] = _OpenVinoNet(net, precision, key[1])
    return cache[key]
