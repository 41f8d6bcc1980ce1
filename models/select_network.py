"""Network registry and weight initialisation for training.

This module owns how the `netG` options become an initialised network:
- `NETWORKS` maps each `net_type` name to a constructor taking the `netG` options entry;
  `define_G` looks the name up and raises a clear error listing the known names;
- `init_weights` is KAIR's initialisation (`init_type`, `init_bn_type`, `init_gain`) with the
  same formulas, applied to every Conv*/Linear and BatchNorm2d layer;
- `merge_bn` folds each BatchNorm into the convolution before it, turning a `BR`/`BL` network
  into the `R`/`L` layout of the released weights (KAIR's `merge_bn` option).
"""
import functools
import logging

import torch
from torch import nn
from torch.nn import init

from models.network_fbcnn import FBCNN
from utils.errors import UserError

__all__ = ["NETWORKS", "define_G", "init_weights", "merge_bn", "net_act_mode"]

logger = logging.getLogger(f"fbcnn.{__name__}")


def _build_fbcnn(opt_net):
    return FBCNN(in_nc=opt_net["in_nc"], out_nc=opt_net["out_nc"], nc=opt_net["nc"],
                 nb=opt_net["nb"], act_mode=opt_net["act_mode"],
                 downsample_mode=opt_net["downsample_mode"], upsample_mode=opt_net["upsample_mode"],
                 global_skip=opt_net["global_skip"], skip_gate=opt_net["skip_gate"])


NETWORKS = {"fbcnn": _build_fbcnn}


def define_G(opt_net, initialize=True):
    """Build the network the validated `netG` options name; initialise it as `init_type` says."""
    name = opt_net["net_type"]
    if name not in NETWORKS:
        raise UserError(f"netG.net_type {name!r} is unknown; known: {', '.join(NETWORKS)}")
    net = NETWORKS[name](opt_net)
    if initialize:
        init_weights(net, opt_net["init_type"], opt_net["init_bn_type"], opt_net["init_gain"],
                     opt_net["init_gain_linear"], opt_net["init_gain_qf_head"])
    return net


def _init_layer(m, init_type, init_bn_type, gain, linear_gain):
    classname = m.__class__.__name__
    if classname.find("Conv") != -1 or classname.find("Linear") != -1:
        if classname.find("Linear") != -1 and linear_gain is not None:
            gain = linear_gain
        w = m.weight.data
        if init_type == "normal":
            init.normal_(w, 0, 0.1)
            w.clamp_(-1, 1).mul_(gain)
        elif init_type == "uniform":
            init.uniform_(w, -0.2, 0.2)
            w.mul_(gain)
        elif init_type == "xavier_normal":
            init.xavier_normal_(w, gain=gain)
            w.clamp_(-1, 1)
        elif init_type == "xavier_uniform":
            init.xavier_uniform_(w, gain=gain)
        elif init_type == "kaiming_normal":
            init.kaiming_normal_(w, a=0, mode="fan_in", nonlinearity="relu")
            w.clamp_(-1, 1).mul_(gain)
        elif init_type == "kaiming_uniform":
            init.kaiming_uniform_(w, a=0, mode="fan_in", nonlinearity="relu")
            w.mul_(gain)
        elif init_type == "orthogonal":
            init.orthogonal_(w, gain=gain)
        else:
            raise ValueError(f"netG.init_type {init_type!r} is unknown")
        if m.bias is not None:
            m.bias.data.zero_()
    elif classname.find("BatchNorm2d") != -1 and m.affine:
        if init_bn_type == "uniform":
            init.uniform_(m.weight.data, 0.1, 1.0)
        elif init_bn_type == "constant":
            init.constant_(m.weight.data, 1.0)
        else:
            raise ValueError(f"netG.init_bn_type {init_bn_type!r} is unknown")
        init.constant_(m.bias.data, 0.0)


def init_weights(net, init_type="orthogonal", init_bn_type="uniform", gain=0.2, linear_gain=None,
                 qf_head_gain=None):
    """KAIR's initialisation; `default`/`none` keep PyTorch's own.

    `linear_gain`, when given, replaces `gain` for the Linear layers: in FBCNN those are the QF
    paths alone (the QF head's MLP, the QF embedding, gamma and beta). `qf_head_gain`, when
    given, replaces it again for the QF head's MLP (`qf_pred`), so the decoder's QF path and
    the QF head can start apart.
    """
    if init_type in ("default", "none"):
        logger.info("netG keeps PyTorch's default initialisation (init_type %r)", init_type)
        return net
    net.apply(functools.partial(_init_layer, init_type=init_type, init_bn_type=init_bn_type,
                                gain=gain, linear_gain=linear_gain))
    if qf_head_gain is not None:
        for m in net.qf_pred.modules():
            if isinstance(m, nn.Linear):
                _init_layer(m, init_type, init_bn_type, qf_head_gain, None)
    if getattr(net, "skip_gate", False):
        net.close_skip_gate()  # the gate starts closed whatever the init
    return net


def _is_bn_branch(module):
    return (isinstance(module, nn.Sequential) and len(module) == 4 and
            isinstance(module[1], nn.BatchNorm2d))


@torch.no_grad()
def merge_bn(net):
    """A copy of `net` (act_mode BR/BL) with each `conv, BatchNorm` pair folded into one conv.

    The folded network computes what the original does in eval mode and has the `R`/`L` key
    layout (`res.0` conv, `res.1` activation, `res.2` conv), loadable by the test scripts.
    """
    act_mode = net_act_mode(net)
    if "B" not in act_mode:
        raise ValueError("merge_bn needs a network with BatchNorm (act_mode BR or BL)")
    merged = FBCNN(in_nc=net.in_nc, out_nc=net.out_nc, nc=net.nc, nb=net.nb,
                   act_mode=act_mode.replace("B", ""), downsample_mode=_mode(net, "down"),
                   upsample_mode=_mode(net, "up"), global_skip=net.global_skip,
                   skip_gate=net.skip_gate)
    branches = {name: m for name, m in net.named_modules() if _is_bn_branch(m)}
    state = {k: v for k, v in net.state_dict().items()
             if not any(k.startswith(name + ".") for name in branches)}
    for name, (conv, bn, _, conv2) in branches.items():
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        state[f"{name}.0.weight"] = conv.weight * scale[:, None, None, None]
        state[f"{name}.0.bias"] = (conv.bias - bn.running_mean) * scale + bn.bias
        state[f"{name}.2.weight"] = conv2.weight
        state[f"{name}.2.bias"] = conv2.bias
    merged.load_state_dict(state, strict=True)
    return merged.to(next(net.parameters()).device)


def net_act_mode(net):
    """The act_mode string of an FBCNN, read from its first residual block."""
    layers = net.m_down1[0].res
    mode = "B" if isinstance(layers[1], nn.BatchNorm2d) else ""
    act = [m for m in layers if isinstance(m, (nn.ReLU, nn.LeakyReLU))][0]
    return mode + ("L" if isinstance(act, nn.LeakyReLU) else "R")


def _mode(net, which):
    if which == "down":
        layer = net.m_down1[net.nb]
        if isinstance(layer, nn.Conv2d):
            return "strideconv"
        return "avgpool" if isinstance(layer, nn.AvgPool2d) else "maxpool"
    layer = net.m_up3[0]
    if isinstance(layer, nn.ConvTranspose2d):
        return "convtranspose"
    return "upconv" if isinstance(layer[0], nn.Upsample) else "pixelshuffle"
