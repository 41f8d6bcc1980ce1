"""CPU engines side by side: PyTorch (contiguous, channels_last, bf16), ONNX Runtime, OpenVINO.

    python -m benchmarks.bench_cpu_engines [--threads 2] [--lite-mp 1 12] [--released-mp 0.25]
        [--repeat 2] [--psnr-qf 10 90] [--json e.json]

For the lite colour model (shipped weights) and the released width (nc 64-512, nb 4, random
weights: speed only), every variant restores the same synthetic photos (a mosaic of LIVE1
crops, JPEG QF 50) through `models.inference.restore` with the tiles main_restore would use
(the network's CPU plan); ONNX Runtime runs the project's own export untiled. Reported per
variant and size: megapixels per second (the best of `--repeat` timed runs after one warm-up),
peak resident memory, and the largest difference from PyTorch fp32 (16-bit outputs, so the
resolution is 1/65535); for the lite model also the mean PSNR on LIVE1 at each `--psnr-qf`
(the test scripts' protocol) and its difference from PyTorch fp32's. The header names the CPU
and whether it has AVX-512 bf16 and AMX, since the fastest choice depends on them.
"""
import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch

from benchmarks.bench_inference import synthetic_photo
from benchmarks.benchlib import PeakMemory, device_name, print_table, write_json
from data.jpeg import jpeg
from models.engines import openvino_available
from models.inference import restore
from models.model_zoo import LoadedModel, load_model
from models.network_fbcnn import FBCNN
from runners.cli import run_cli
from utils import REPO_ROOT
from utils.cpu import native_bf16
from utils.image import imread_uint, list_images
from utils.metrics import psnr

VARIANTS = {  # name -> restore() options; "onnxruntime" is run apart (untiled)
    "torch fp32": {},
    "torch fp32 channels_last": {"channels_last": True},
    "torch bf16 channels_last": {"precision": "bf16", "channels_last": True},
    "onnxruntime fp32": None,
    "openvino fp32": {"engine": "openvino"},
    "openvino bf16": {"engine": "openvino", "precision": "bf16"},
}
COLUMNS = [("model", "model", "{}"), ("variant", "variant", "{}"), ("mp", "MP", "{:.2f}"),
           ("seconds", "s", "{:.2f}"), ("mp_per_s", "MP/s", "{:.2f}"),
           ("vs_torch", "vs torch fp32", "{:.2f}x"), ("peak_gib", "peak GiB", "{:.2f}"),
           ("max_diff", "max abs diff", "{:.1e}")]
PSNR_COLUMNS = [("variant", "variant", "{}"), ("qf", "QF", "{}"), ("psnr", "PSNR", "{:.3f}"),
                ("delta", "vs torch fp32 (dB)", "{:+.3f}")]


class _OnnxRuntime:
    """The project's ONNX export run by ONNX Runtime, untiled, as restore() would be called."""

    def __init__(self, net, threads, folder):
        import onnxruntime as ort

        from runners.export_onnx import export_onnx
        path = export_onnx(net.float().eval(), os.path.join(folder, "net.onnx"))
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])

    def __call__(self, img):
        x = np.ascontiguousarray(img.transpose(2, 0, 1)[None], dtype=np.float32) / 255
        restored = self.session.run(None, {"image": x})[0][0].transpose(1, 2, 0)
        return np.clip(np.rint(restored * 65535), 0, 65535).astype(np.uint16)


def _runner(name, model, ort):
    """A function img -> 16-bit restoration for the variant `name`."""
    if VARIANTS[name] is None:
        return ort
    return lambda img: restore(model, img, bit_depth=16, **VARIANTS[name])[0]


def _time(run, img, repeat):
    run(img)  # warm-up: compiling, converting, caches
    best, out = float("inf"), None
    with PeakMemory("cpu") as memory:
        for _ in range(repeat):
            start = time.perf_counter()
            out = run(img)
            best = min(best, time.perf_counter() - start)
    return best, memory.peak / 2 ** 30, out


def measure(label, model, photos, variants, repeat, threads, folder):
    rows = []
    ort = _OnnxRuntime(model.net, threads, folder) if "onnxruntime fp32" in variants else None
    for mp, img in photos:
        reference, base = None, None
        for name in variants:
            seconds, peak, out = _time(_runner(name, model, ort), img, repeat)
            if reference is None:
                reference, base = out.astype(np.int32), seconds
            rows.append({"model": label, "variant": name, "mp": mp, "seconds": seconds,
                         "mp_per_s": img.shape[0] * img.shape[1] / 1e6 / seconds,
                         "vs_torch": base / seconds, "peak_gib": peak,
                         "max_diff": float(np.abs(out.astype(np.int32) - reference).max())
                         / 65535})
            print(f"{label} {name} {mp} MP: {seconds:.2f} s", file=sys.stderr, flush=True)
    return rows


def psnr_rows(model, variants, qfs, limit):
    paths = list_images(os.path.join(REPO_ROOT, "testsets", "LIVE1_color"))[:limit]
    clean = [imread_uint(p) for p in paths]
    rows = []
    for qf in qfs:
        inputs = [jpeg(img, qf) for img in clean]
        base = None
        for name in variants:
            if VARIANTS[name] is None:
                continue
            scores = [psnr(restore(model, img, **VARIANTS[name])[0], ref)
                      for img, ref in zip(inputs, clean)]
            value = float(np.mean(scores))
            base = value if base is None else base
            rows.append({"variant": name, "qf": qf, "psnr": value, "delta": value - base})
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=None, help="torch, ORT and OpenVINO threads")
    p.add_argument("--lite-mp", type=float, nargs="*", default=[1.0, 12.0])
    p.add_argument("--released-mp", type=float, nargs="*", default=[0.25])
    p.add_argument("--variants", nargs="+", choices=tuple(VARIANTS), default=None)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--psnr-qf", type=int, nargs="*", default=[10, 90])
    p.add_argument("--psnr-limit", type=int, default=None, help="only the first N LIVE1 images")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    variants = [v for v in (args.variants or VARIANTS)
                if openvino_available() or not v.startswith("openvino")]
    features = native_bf16()
    clean = [imread_uint(p) for p in list_images(os.path.join(REPO_ROOT, "testsets",
                                                              "LIVE1_color"))]

    def photos(sizes):
        return [(mp, jpeg(synthetic_photo(clean, mp), 50)) for mp in sizes]

    lite = load_model("fbcnn_color_lite")
    torch.manual_seed(0)
    released = LoadedModel("released width (random)", FBCNN(3, 3).eval(), 3)
    with tempfile.TemporaryDirectory() as folder:
        rows = measure("fbcnn_color_lite", lite, photos(args.lite_mp), variants, args.repeat,
                       threads, folder)
        rows += measure("released width", released, photos(args.released_mp), variants,
                        args.repeat, threads, os.path.join(folder))
    quality = psnr_rows(lite, variants, args.psnr_qf, args.psnr_limit)
    print(f"\nCPU: {device_name('cpu')}; AVX-512 bf16: {features['avx512_bf16']}, AMX bf16: "
          f"{features['amx_bf16']}. Synthetic photos (LIVE1 mosaic, JPEG QF 50), blind, tiles "
          f"as main_restore plans them (ONNX Runtime untiled); best of {args.repeat}.\n")
    print_table(rows, COLUMNS)
    if quality:
        print("\nLIVE1_color (test-script protocol), fbcnn_color_lite:\n")
        print_table(quality, PSNR_COLUMNS)
    if args.json:
        write_json(args.json, {"cpu": device_name("cpu"), **features, "threads": threads,
                               "argv": sys.argv[1:] if argv is None else argv, "rows": rows,
                               "psnr": quality})
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
