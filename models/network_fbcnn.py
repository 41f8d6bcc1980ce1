"""The FBCNN network (Jiang et al., ICCV 2021) as a pure nn.Module.

This module owns the architecture only: layer layout, parameter names and the forward pass.
Parameter names equal the released state dicts key for key, so the official `.pth` files load
with `strict=True`. Training logic (losses, optimiser, initialisation) lives elsewhere.

Deliberate differences from the original code, all identical for the released weights:
- `qf_pred`'s first Linear takes `nc[3]` inputs instead of a hard-coded 512, so other widths work.
- `avgpool`/`maxpool` downsampling is a 2x2 pool followed by a 3x3 conv that changes the width
  (the original dropped that conv and crashed on the next block).
- `global_skip=True` (off for the released weights, which have none) adds the input to the
  output, so the identity is the zero residual: an option for the small models trained here.
  `skip_gate=True` blends instead: `(1 - g) * output + g * input`, the gate g learned from the
  QF embedding (`gate`: `SKIP_GATE_SCALE` times one Linear, `to_skip_gate`, that starts at zero,
  closed: a network without it gains it without changing; open, g = 1, the identity).
"""
import torch.nn.functional as F
from torch import nn

__all__ = ["FBCNN", "ResBlock", "QFAttention", "EMBED_WIDTH", "SKIP_GATE_SCALE"]

EMBED_WIDTH = 512  # width of the QF predictor and embedding MLPs, fixed in the released model
# the skip gate is this times its Linear: Adam moves each weight by about the learning rate a
# step, so a fine-tune at 5e-5 for 4,000 iterations moved the unscaled gate 0.04, not to 1
SKIP_GATE_SCALE = 20.0
ACT_MODES = ("R", "BR", "L", "BL")
DOWNSAMPLE_MODES = ("strideconv", "avgpool", "maxpool")
UPSAMPLE_MODES = ("convtranspose", "upconv", "pixelshuffle")


def _conv_act_conv(c, act_mode):
    """The residual branch `conv3x3, [BatchNorm], activation, conv3x3` with KAIR's indices."""
    layers = [nn.Conv2d(c, c, 3, 1, 1, bias=True)]
    for ch in act_mode:
        if ch == "B":
            layers.append(nn.BatchNorm2d(c, momentum=0.9, eps=1e-4, affine=True))
        elif ch == "R":
            layers.append(nn.ReLU(inplace=True))
        elif ch == "L":
            layers.append(nn.LeakyReLU(0.2, inplace=True))
    layers.append(nn.Conv2d(c, c, 3, 1, 1, bias=True))
    return nn.Sequential(*layers)


class ResBlock(nn.Module):
    """`x + res(x)` with `res` = conv3x3, activation, conv3x3."""

    def __init__(self, c, act_mode="R"):
        super().__init__()
        self.res = _conv_act_conv(c, act_mode)

    def forward(self, x):
        return x + self.res(x)


class QFAttention(nn.Module):
    """A ResBlock whose residual is modulated by the QF embedding: `x + gamma * res(x) + beta`."""

    def __init__(self, c, act_mode="R"):
        super().__init__()
        self.res = _conv_act_conv(c, act_mode)

    def forward(self, x, gamma, beta):
        return x + gamma[:, :, None, None] * self.res(x) + beta[:, :, None, None]


def _down_layers(c_in, c_out, mode):
    """Halve the resolution; returned as a list so it flattens into the encoder's sequence."""
    if mode == "strideconv":
        return [nn.Conv2d(c_in, c_out, 2, 2, 0, bias=True)]
    pool = nn.AvgPool2d(2, 2) if mode == "avgpool" else nn.MaxPool2d(2, 2)
    return [pool, nn.Conv2d(c_in, c_out, 3, 1, 1, bias=True)]


def _up_layer(c_in, c_out, mode):
    """Double the resolution: one module, so it is index 0 of each decoder stage."""
    if mode == "convtranspose":
        return nn.ConvTranspose2d(c_in, c_out, 2, 2, 0, bias=True)
    if mode == "upconv":
        return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                             nn.Conv2d(c_in, c_out, 3, 1, 1, bias=True))
    return nn.Sequential(nn.Conv2d(c_in, c_out * 4, 3, 1, 1, bias=True), nn.PixelShuffle(2))


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"FBCNN: {name}={value!r} is not supported; choose one of "
                         f"{', '.join(choices)}")


class FBCNN(nn.Module):
    """Flexible blind JPEG artifact removal: `forward(x, qf_input=None) -> (restored, qf)`.

    `x` is (N, in_nc, H, W) in [0, 1], any H and W. `qf` is the predicted `1 - QF/100`, shape
    (N, 1). Passing `qf_input` (shape (N, 1), `1 - QF/100`) overrides the predicted QF in the
    reconstruction, which is FBCNN's flexible control.
    """

    def __init__(self, in_nc=3, out_nc=3, nc=(64, 128, 256, 512), nb=4, act_mode="R",
                 downsample_mode="strideconv", upsample_mode="convtranspose", global_skip=False,
                 skip_gate=False):
        super().__init__()
        nc = list(nc)
        if len(nc) != 4 or any(int(c) != c or c < 1 for c in nc):
            raise ValueError(f"FBCNN: nc must be four positive integers, got {nc}")
        if int(nb) != nb or nb < 1:
            raise ValueError(f"FBCNN: nb must be a positive integer, got {nb}")
        _check_choice("act_mode", act_mode, ACT_MODES)
        _check_choice("downsample_mode", downsample_mode, DOWNSAMPLE_MODES)
        _check_choice("upsample_mode", upsample_mode, UPSAMPLE_MODES)
        if global_skip and in_nc != out_nc:
            raise ValueError(f"FBCNN: global_skip needs in_nc == out_nc, got {in_nc}, {out_nc}")
        if skip_gate and not global_skip:
            raise ValueError("FBCNN: skip_gate gates the global skip: it needs global_skip")
        self.in_nc, self.out_nc, self.nc, self.nb = in_nc, out_nc, nc, nb
        self.global_skip, self.skip_gate = bool(global_skip), bool(skip_gate)
        w = EMBED_WIDTH

        def res_blocks(c):
            return [ResBlock(c, act_mode) for _ in range(nb)]

        def up_stage(c_in, c_out):
            return nn.ModuleList([_up_layer(c_in, c_out, upsample_mode),
                                  *[QFAttention(c_out, act_mode) for _ in range(nb)]])

        self.m_head = nn.Conv2d(in_nc, nc[0], 3, 1, 1, bias=True)
        down = downsample_mode
        self.m_down1 = nn.Sequential(*res_blocks(nc[0]), *_down_layers(nc[0], nc[1], down))
        self.m_down2 = nn.Sequential(*res_blocks(nc[1]), *_down_layers(nc[1], nc[2], down))
        self.m_down3 = nn.Sequential(*res_blocks(nc[2]), *_down_layers(nc[2], nc[3], down))
        self.m_body_encoder = nn.Sequential(*res_blocks(nc[3]))
        self.m_body_decoder = nn.Sequential(*res_blocks(nc[3]))
        self.m_up3 = up_stage(nc[3], nc[2])
        self.m_up2 = up_stage(nc[2], nc[1])
        self.m_up1 = up_stage(nc[1], nc[0])
        self.m_tail = nn.Conv2d(nc[0], out_nc, 3, 1, 1, bias=True)

        self.qf_pred = nn.Sequential(
            *res_blocks(nc[3]), nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(),
            nn.Linear(nc[3], w), nn.ReLU(), nn.Linear(w, w), nn.ReLU(), nn.Linear(w, 1),
            nn.Sigmoid())
        self.qf_embed = nn.Sequential(
            nn.Linear(1, w), nn.ReLU(), nn.Linear(w, w), nn.ReLU(), nn.Linear(w, w), nn.ReLU())
        self.to_gamma_3 = nn.Sequential(nn.Linear(w, nc[2]), nn.Sigmoid())
        self.to_beta_3 = nn.Sequential(nn.Linear(w, nc[2]), nn.Tanh())
        self.to_gamma_2 = nn.Sequential(nn.Linear(w, nc[1]), nn.Sigmoid())
        self.to_beta_2 = nn.Sequential(nn.Linear(w, nc[1]), nn.Tanh())
        self.to_gamma_1 = nn.Sequential(nn.Linear(w, nc[0]), nn.Sigmoid())
        self.to_beta_1 = nn.Sequential(nn.Linear(w, nc[0]), nn.Tanh())
        if self.skip_gate:
            self.to_skip_gate = nn.Linear(w, 1)
            self.close_skip_gate()

    def close_skip_gate(self):
        """Zero the gate's weights: g = 0, the plain network's output."""
        nn.init.zeros_(self.to_skip_gate.weight)
        nn.init.zeros_(self.to_skip_gate.bias)

    def gate(self, emb):
        """The skip gate g, (N, 1), of the QF embedding `emb` (`qf_embed(qf)`)."""
        return SKIP_GATE_SCALE * self.to_skip_gate(emb)

    def head(self, x):
        """Pad to a multiple of 8 (replicating the edges) and apply the first convolution: the
        encoder's first skip, by far its cheapest part (tiled inference recomputes it)."""
        h, w = x.shape[-2:]
        return self.m_head(F.pad(x, (0, -w % 8, 0, -h % 8), mode="replicate"))

    def encode(self, x, predict_qf=True):
        """Pad to a multiple of 8 and run the encoder; returns the skips and the predicted qf.

        With `predict_qf=False` the QF head is skipped and None is returned in its place (tiled
        inference pools the QF features over the whole image instead, see `qf_features`).
        """
        x1 = self.head(x)
        x2 = self.m_down1(x1)
        x3 = self.m_down2(x2)
        x4 = self.m_down3(x3)
        b = self.m_body_encoder(x4)
        return (x1, x2, x3, x4, b), (self.qf_pred(b) if predict_qf else None)

    def qf_features(self, b):
        """The QF head's feature map before global pooling, (N, nc[3], H/8, W/8).

        `qf_pred(b) == qf_from_pooled(qf_features(b).mean((2, 3)))`: the split lets tiled
        inference average the features of all tiles, so the whole image gets one QF.
        """
        return self.qf_pred[:self.nb](b)

    def qf_from_pooled(self, pooled):
        """The QF head after global pooling: (N, nc[3]) pooled features -> qf, (N, 1)."""
        return self.qf_pred[self.nb + 2:](pooled)

    def decode(self, skips, qf, size, x=None):
        """Reconstruct from the encoder's skips, conditioned on `qf` (`1 - QF/100`, (N, 1)).
        `x`, the input the skips were encoded from, is added to the output with `global_skip`
        (and needed then); with `skip_gate` blended with the output by the gate
        `g = gate(embedding)`: `(1 - g) * output + g * x`."""
        x1, x2, x3, x4, b = skips
        emb = self.qf_embed(qf)
        d = self.m_body_decoder(b) + x4
        for stage, skip, to_gamma, to_beta in ((self.m_up3, x3, self.to_gamma_3, self.to_beta_3),
                                               (self.m_up2, x2, self.to_gamma_2, self.to_beta_2),
                                               (self.m_up1, x1, self.to_gamma_1, self.to_beta_1)):
            gamma, beta = to_gamma(emb), to_beta(emb)
            d = stage[0](d)
            for block in stage[1:]:
                d = block(d, gamma, beta)
            d = d + skip
        d = self.m_tail(d)[..., :size[0], :size[1]]
        if self.global_skip:
            if x is None:
                raise ValueError("FBCNN with global_skip: decode needs the input x")
            x = x[..., :size[0], :size[1]]
            d = d + (self.gate(emb)[:, :, None, None] * (x - d) if self.skip_gate else x)
        return d

    def forward(self, x, qf_input=None):
        skips, qf = self.encode(x)
        restored = self.decode(skips, qf if qf_input is None else qf_input, x.shape[-2:], x)
        return restored, qf
