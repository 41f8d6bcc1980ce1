"""FBCNN as ONNX graphs: the network with a graph's fixed inputs and outputs, and the one call
that traces a module to ONNX.

This module owns both halves for the two users of ONNX: runners/export_onnx.py (the `.onnx`
file a user asks for) and models/engines.py (the parts OpenVINO runs). `FBCNNExport` is the
whole network, `(image[, qf_input]) -> (restored, qf)`, blind where `qf_input` is negative;
`export_graph` traces with PyTorch's TorchScript-based exporter (`dynamo=False`, which needs
only the `onnx` package), the batch and image sides dynamic as the caller names them.
"""
import warnings

import torch
from torch import nn

__all__ = ["DEFAULT_OPSET", "FBCNNExport", "export_graph"]

DEFAULT_OPSET = 17


class FBCNNExport(nn.Module):
    """FBCNN as exported: `(image[, qf_input]) -> (restored, qf)`, blind where qf_input < 0."""

    def __init__(self, net, qf_input=False):
        super().__init__()
        self.net, self.with_qf_input = net, qf_input

    def forward(self, image, qf_input=None):
        skips, qf = self.net.encode(image)
        condition = qf if qf_input is None else torch.where(qf_input < 0, qf, qf_input)
        return self.net.decode(skips, condition, image.shape[-2:], image), qf


def export_graph(module, args, f, input_names, dynamic_axes, output_names=None,
                 opset=DEFAULT_OPSET):
    """Trace `module` on `args` to ONNX in `f` (a path or a binary file), the tracer's
    deprecation and trace notices silenced."""
    with warnings.catch_warnings(), torch.no_grad():
        # the TorchScript exporter is deprecated in favour of dynamo, which needs onnxscript
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(module, args, f, dynamo=False, opset_version=opset,
                          input_names=input_names, output_names=output_names,
                          dynamic_axes=dynamic_axes)
