"""ONNX export of FBCNN with dynamic batch, height and width.

This module owns turning a loaded FBCNN into an `.onnx` file that other runtimes can use:

    python -m runners.export_onnx --model fbcnn_color -o fbcnn_color.onnx [--qf-input] [--check]

Graph: input `image` (N, C, H, W) float32 in [0, 1], any H and W; outputs `restored`
(N, C, H, W) and `qf` (N, 1), the predicted `1 - QF/100` (QF = round(100 * (1 - qf))). The
network's own replicate padding to a multiple of 8 and the crop back are traced as shape
arithmetic (`-w % 8`), so they follow the input size. With `--qf-input` the graph has a second
input `qf_input` (N, 1): a value in [0, 1] (`1 - QF/100`) overrides the predicted QF, as FBCNN's
flexible control, and a negative value keeps the blind estimate, so one file serves both uses.

The graph and the tracing are models/onnx_graphs.py's (PyTorch's TorchScript-based exporter,
which needs only the `onnx` package); `--check` also needs `onnxruntime`.
"""
import argparse
import sys

import torch

from models.model_zoo import load_model
from models.onnx_graphs import DEFAULT_OPSET, FBCNNExport, export_graph
from runners.cli import bounded_int
from utils.errors import UserError
from utils.fileio import atomic_write

__all__ = ["export_onnx", "check_onnx", "main"]

MIN_OPSET = 11  # dynamic padding (opset 9 and 10 pad by constant sizes only)


def export_onnx(net, path, qf_input=False, opset=DEFAULT_OPSET, example_size=(64, 64)):
    """Write `net` (an FBCNN) to `path` as ONNX; returns `path`. Written atomically."""
    wrapper = FBCNNExport(net.eval(), qf_input).eval()
    device = next(net.parameters()).device
    image = torch.rand(1, net.in_nc, *example_size, device=device)
    args = (image,)
    input_names = ["image"]
    dynamic_axes = {"image": {0: "batch", 2: "height", 3: "width"},
                    "restored": {0: "batch", 2: "height", 3: "width"}, "qf": {0: "batch"}}
    if qf_input:
        args = (image, torch.full((1, 1), -1.0, device=device))
        input_names.append("qf_input")
        dynamic_axes["qf_input"] = {0: "batch"}

    atomic_write(path, lambda f: export_graph(wrapper, args, f, input_names, dynamic_axes,
                                              ["restored", "qf"], opset))
    return path


def check_onnx(net, path, sizes=((61, 83), (96, 128)), qf_input=False, seed=0):
    """Largest absolute difference between onnxruntime and PyTorch over test inputs."""
    import numpy as np
    import onnxruntime as ort

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(seed)
    worst = 0.0
    net = net.eval().cpu()
    for h, w in sizes:
        image = torch.rand(1, net.in_nc, h, w, generator=generator)
        feeds = {"image": image.numpy()}
        qf = None
        if qf_input:
            qf = torch.full((1, 1), 0.7)
            feeds["qf_input"] = qf.numpy()
        with torch.no_grad():
            expected = net(image, qf)
        got = session.run(["restored", "qf"], feeds)
        for e, g in zip(expected, got):
            worst = max(worst, float(np.abs(e.numpy() - g).max()))
    return worst


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m runners.export_onnx",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True,
                   help="a model name (fbcnn_color, ...) or a .pth/.safetensors file")
    p.add_argument("-o", "--output", required=True, help="the .onnx file to write")
    p.add_argument("--qf-input", action="store_true",
                   help="add the qf_input graph input (QF control; negative = blind)")
    p.add_argument("--opset", type=bounded_int(MIN_OPSET, why=" (the graph pads the image to a "
                                               "multiple of 8 by its size: opset 11 or later)"),
                   default=DEFAULT_OPSET, help="ONNX opset (default %(default)s)")
    p.add_argument("--check", action="store_true",
                   help="compare onnxruntime with PyTorch on two input sizes")
    args = p.parse_args(argv)
    try:
        model = load_model(args.model, device="cpu")
        if model.net is None:
            raise UserError(f"--model {args.model}: the jpeg pseudo-model has no network to export")
        try:
            export_onnx(model.net, args.output, qf_input=args.qf_input, opset=args.opset)
        except RuntimeError as exc:
            if "onnx_opset_version" not in str(exc):
                raise
            raise UserError(f"--opset {args.opset}: this PyTorch cannot export it "
                            f"({exc})") from None
        print(f"wrote {args.output}")
        if args.check:
            diff = check_onnx(model.net, args.output, qf_input=args.qf_input)
            print(f"onnxruntime vs PyTorch: max abs difference {diff:.2e}")
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
