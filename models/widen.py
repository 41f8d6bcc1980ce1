"""Growing a trained FBCNN into a wider one that computes the same function (Net2Net widening).

This module owns `widen_fbcnn(net, nc)`: a new FBCNN with the level widths `nc` (each at least
the old one) whose output equals the old network's, so a short training run can start from a
trained narrow model instead of from scratch. Each new channel of a level copies an old channel
of that level (new channel j copies old channel j, then the old ones in turn); a layer that
produces the level's channels copies that channel's weights, and a layer that reads them divides
each copied input's weights by the number of copies, so every sum is unchanged. FBCNN has no
per-channel operation that mixes channels of one level other than convolutions and the QF
head's first Linear (ReLU, skips, `x + gamma * res(x) + beta` all act channel by channel), so
this holds exactly. `noise` adds Gaussian noise of that fraction of each widened weight's
standard deviation, which breaks the copies' symmetry so that they can learn apart.
BatchNorm layers are refused: fold them first (the shipped models are folded).
"""
import torch
from torch import nn

from models.network_fbcnn import FBCNN

__all__ = ["widen_fbcnn"]


def _channel_map(old, new):
    """Old channel copied by each of `new` channels: j for j < old, then 0, 1, ... in turn."""
    return torch.arange(new) % old


def _copies(mapping, old):
    return torch.bincount(mapping, minlength=old).float()


def _widen_weight(weight, out_map, in_map, in_copies, transpose):
    """A conv or Linear weight with output channels copied by `out_map` and input channels by
    `in_map` (divided by their copy counts); None maps leave that side as it is."""
    out_dim, in_dim = (1, 0) if transpose else (0, 1)
    if out_map is not None:
        weight = weight.index_select(out_dim, out_map)
    if in_map is not None:
        shape = [1] * weight.dim()
        shape[in_dim] = -1
        weight = weight.index_select(in_dim, in_map) / in_copies[in_map].view(shape)
    return weight


class _Widener:
    def __init__(self, old_nc, new_nc, noise, generator):
        self.maps = [_channel_map(o, n) for o, n in zip(old_nc, new_nc)]
        self.copies = [_copies(m, o) for m, o in zip(self.maps, old_nc)]
        self.noise, self.generator = noise, generator

    def layer(self, old, new, out_level, in_level):
        """Copy `old` into `new` (Conv2d, ConvTranspose2d or Linear), widened between levels."""
        transpose = isinstance(old, nn.ConvTranspose2d)
        out_map = None if out_level is None else self.maps[out_level]
        in_map = None if in_level is None else self.maps[in_level]
        in_copies = None if in_level is None else self.copies[in_level]
        weight = _widen_weight(old.weight.detach(), out_map, in_map, in_copies, transpose)
        if self.noise and weight.shape != old.weight.shape:
            weight = weight + self.noise * weight.std() * torch.randn(
                weight.shape, generator=self.generator, dtype=weight.dtype)
        new.weight.data.copy_(weight)
        if old.bias is not None:
            bias = old.bias.detach()
            new.bias.data.copy_(bias if out_map is None else bias.index_select(0, out_map))

    def blocks(self, old_blocks, new_blocks, level):
        """ResBlocks or QFAttention blocks of one level: both convolutions stay in the level."""
        for old, new in zip(old_blocks, new_blocks):
            for old_layer, new_layer in zip(old.res, new.res):
                if isinstance(old_layer, nn.BatchNorm2d):
                    raise ValueError("widen_fbcnn: fold BatchNorm first (act_mode 'R' or 'L')")
                if isinstance(old_layer, nn.Conv2d):
                    self.layer(old_layer, new_layer, level, level)


@torch.no_grad()
def widen_fbcnn(net, nc, noise=0.0, seed=0):
    """A new FBCNN like `net` with level widths `nc` (each >= net.nc's) and the same function;
    `noise` > 0 perturbs the widened weights (see the module docstring)."""
    nc = [int(c) for c in nc]
    if len(nc) != 4 or any(n < o for n, o in zip(nc, net.nc)):
        raise ValueError(f"widen_fbcnn: nc {nc} must be four widths, each at least {net.nc}")
    act = "L" if any(isinstance(m, nn.LeakyReLU) for m in net.modules()) else "R"
    if any(isinstance(m, nn.BatchNorm2d) for m in net.modules()):
        raise ValueError("widen_fbcnn: fold BatchNorm first (act_mode 'R' or 'L')")
    down = ("strideconv" if isinstance(net.m_down1[-1], nn.Conv2d) and
            net.m_down1[-1].kernel_size == (2, 2) else None)
    up = "convtranspose" if isinstance(net.m_up1[0], nn.ConvTranspose2d) else None
    if down is None or up is None:
        raise ValueError("widen_fbcnn: only strided-convolution downsampling and transposed-"
                         "convolution upsampling (the released layout) can be widened")
    new = FBCNN(net.in_nc, net.out_nc, nc, net.nb, act, down, up, net.global_skip, net.skip_gate)
    new = new.to(next(net.parameters()).dtype)
    w = _Widener(net.nc, nc, noise, torch.Generator().manual_seed(seed))
    w.layer(net.m_head, new.m_head, 0, None)
    for k, (old, grown) in enumerate(((net.m_down1, new.m_down1), (net.m_down2, new.m_down2),
                                      (net.m_down3, new.m_down3))):
        w.blocks(old[:net.nb], grown[:net.nb], k)
        w.layer(old[net.nb], grown[net.nb], k + 1, k)
    w.blocks(net.m_body_encoder, new.m_body_encoder, 3)
    w.blocks(net.m_body_decoder, new.m_body_decoder, 3)
    for k, (old, grown) in ((2, (net.m_up3, new.m_up3)), (1, (net.m_up2, new.m_up2)),
                            (0, (net.m_up1, new.m_up1))):
        w.layer(old[0], grown[0], k, k + 1)
        w.blocks(old[1:], grown[1:], k)
    w.layer(net.m_tail, new.m_tail, None, 0)
    w.blocks(net.qf_pred[:net.nb], new.qf_pred[:net.nb], 3)
    linears = [m for m in net.qf_pred[net.nb:] if isinstance(m, nn.Linear)]
    new_linears = [m for m in new.qf_pred[net.nb:] if isinstance(m, nn.Linear)]
    w.layer(linears[0], new_linears[0], None, 3)
    for old, grown in zip(linears[1:], new_linears[1:]):
        w.layer(old, grown, None, None)
    new.qf_embed.load_state_dict(net.qf_embed.state_dict())
    for name, level in (("3", 2), ("2", 1), ("1", 0)):
        for kind in ("gamma", "beta"):
            w.layer(getattr(net, f"to_{kind}_{name}")[0], getattr(new, f"to_{kind}_{name}")[0],
                    level, None)
    if net.skip_gate:
        new.to_skip_gate.load_state_dict(net.to_skip_gate.state_dict())  # reads the embedding
    return new
