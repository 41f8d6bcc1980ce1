"""Running a loaded model on one uint8 image: the step every script shares.

This module owns the conversion uint8 image -> tensor -> network -> uint8 image, exactly as
the original test scripts did it (`clip(0, 1) * 255`, rounded), and the meaning of a QF given
by the user (`qf_input = 1 - QF/100`).
"""
import torch

from data.jpeg import label_to_qf, qf_to_label
from utils.image import tensor2uint, uint2tensor

__all__ = ["restore"]


@torch.no_grad()
def restore(model, img, qf=None, device="cpu"):
    """Restore a uint8 HxW or HxWx3 image; returns `(restored uint8, predicted QF or None)`.

    `model` is a LoadedModel (its `net` None for the `jpeg` pseudo-model, which returns the
    input). `qf`, when given, is the integer QF fed to the network as `qf_input`; the predicted
    QF is reported either way.
    """
    if model.net is None:
        return img, None
    x = uint2tensor(img).to(device)
    qf_input = None if qf is None else torch.full((x.shape[0], 1), qf_to_label(qf), device=device)
    restored, qf_pred = model.net(x, qf_input)
    return tensor2uint(restored), label_to_qf(qf_pred[0, 0])
