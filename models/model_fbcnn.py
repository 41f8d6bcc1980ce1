"""FBCNN's training logic, apart from the network: losses, optimiser, scheduler and the step.

This module owns what one training iteration does to `netG` (`ModelFBCNN` says each part):
the image loss plus the QF loss over the samples that have a label (every type the original's
options accept, and Charbonnier), teacher forcing of the QF (`train.qf_input_prob`), Adam with
MultiStep or cosine schedules, gradient clipping, KAIR's regularisers and BatchNorm folding,
the arithmetic (`train.precision`, through inference's two contexts; validation is always
IEEE fp32), channels_last and torch.compile, DDP, and skipping non-finite losses (too many in
a row stop the run with one line). The loop around it lives in `runners.training`.
"""
import bisect
import json
import logging
import math

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from models.inference import precision_autocast, tf32_allowed
from models.loss_ssim import SSIMLoss
from models.model_zoo import infer_fbcnn_kwargs, load_state_dict_file
from models.select_network import define_G, merge_bn, net_act_mode
from utils.cpu import native_bf16
from utils.errors import UserError

__all__ = ["ModelFBCNN", "NonFiniteLossError", "training_precision", "IMAGE_LOSSES",
           "QF_LOSSES", "image_loss", "masked_qf_loss", "regularizer_orth", "regularizer_clip"]

logger = logging.getLogger(f"fbcnn.{__name__}")


def _charbonnier(x, y, eps=1e-9):
    diff = x - y
    return torch.mean(torch.sqrt(diff * diff + eps))


def _l2sum(x, y):
    return F.mse_loss(x, y, reduction="sum")


# `G_lossfn_type` -> a factory of the loss: the original's values (l1, l2, l2sum, ssim) and
# Charbonnier
IMAGE_LOSSES = {"l1": lambda: F.l1_loss, "l2": lambda: F.mse_loss, "l2sum": lambda: _l2sum,
                "ssim": SSIMLoss, "charbonnier": lambda: _charbonnier}
QF_LOSSES = ("l1", "l2", "l2sum")  # the original's QF_lossfn_type values


def image_loss(kind):
    """The image loss a `G_lossfn_type` names: mean L1, mean L2, summed L2, 1 - SSIM (KAIR's
    SSIM loss, `models.loss_ssim`) or Charbonnier."""
    if kind not in IMAGE_LOSSES:
        raise UserError(f"train.G_lossfn_type {kind!r} is unknown; known: "
                        f"{', '.join(IMAGE_LOSSES)}")
    return IMAGE_LOSSES[kind]()


def masked_qf_loss(qf_est, qf_label, kind="l1"):
    """QF loss over the samples whose label is not NaN; 0 (with a graph) if none is.

    Returns `(loss, number of labelled samples)`. `kind` l1 and l2 average the absolute or
    squared error over the labelled samples, l2sum sums the squared error over them; with every
    label present they equal `F.l1_loss`, `F.mse_loss` and `F.mse_loss(reduction="sum")` of the
    whole batch, as the original's `QF_lossfn_type`.
    """
    if kind not in QF_LOSSES:
        raise UserError(f"train.QF_lossfn_type {kind!r} is unknown; known: {', '.join(QF_LOSSES)}")
    valid = ~torch.isnan(qf_label)
    diff = qf_est - torch.nan_to_num(qf_label, nan=0.0)
    err = diff.abs() if kind == "l1" else diff * diff
    count = valid.sum()
    total = (err * valid).sum()
    if kind == "l2sum":
        return total, count
    return total / count.clamp(min=1), count


@torch.no_grad()
def regularizer_orth(m):
    """KAIR: nudge singular values of each trained conv weight (as a matrix) towards [0.5, 1.5]."""
    if m.__class__.__name__.find("Conv") != -1 and m.weight.requires_grad:
        w = m.weight.data
        c_out, c_in, f1, f2 = w.size()
        mat = w.permute(2, 3, 1, 0).reshape(f1 * f2 * c_in, c_out)
        u, s, v = torch.svd(mat.float())
        s[s > 1.5] = s[s > 1.5] - 1e-4
        s[s < 0.5] = s[s < 0.5] + 1e-4
        mat = torch.mm(torch.mm(u, torch.diag(s)), v.t()).to(w.dtype)
        m.weight.data.copy_(mat.view(f1, f2, c_in, c_out).permute(3, 2, 0, 1))


@torch.no_grad()
def regularizer_clip(m):
    """KAIR: nudge trained conv/linear weights and biases outside [-1.5, 1.5] back by 1e-4."""
    name = m.__class__.__name__
    if name.find("Conv") != -1 or name.find("Linear") != -1:
        for p in (m.weight, m.bias):
            if p is not None and p.requires_grad:
                p.data[p.data > 1.5] -= 1e-4
                p.data[p.data < -1.5] += 1e-4


class NonFiniteLossError(UserError):
    """Too many consecutive iterations had a NaN or infinite loss: the run stops."""


def training_precision(precision, device):
    """`train.precision` as run on `device`: "auto" is bf16 where the device computes bf16
    natively (a CUDA GPU with bf16, a CPU with AVX-512 bf16 or AMX: about twice fp32's speed
    there) and fp32 elsewhere (where bf16 autocast is emulated and many times slower)."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if any(native_bf16().values()) else "fp32"


def freeze_untrainable(net, trainable):
    """Switch off the gradients of `net`'s parameters outside `trainable` (name prefixes; None:
    train all); a prefix that names no parameter is an error naming `train.trainable`."""
    if trainable is None:
        return

    def under(name, prefixes):
        return any(name == p or name.startswith(p + ".") for p in prefixes)

    names = [name for name, _ in net.named_parameters()]
    for prefix in trainable:
        if not any(under(name, [prefix]) for name in names):
            tops = sorted({name.split(".")[0] for name in names})
            raise UserError(f"train.trainable: {prefix!r} names no parameter of netG; its "
                            f"parameters start with {', '.join(tops)}")
    for name, param in net.named_parameters():
        param.requires_grad_(under(name, trainable))


class ModelFBCNN:
    """Holds netG with its optimiser, scheduler and gradient scaler, and runs training steps.

    - loss = `G_lossfn_weight` * image loss(E, H) + `QF_lossfn_weight` * QF loss(predicted, label),
      every type the original's options accept (image: l1, l2, l2sum, ssim; QF: l1, l2, l2sum) and
      Charbonnier; the QF loss takes only the samples whose label is not NaN (averaged over them, or
      summed for l2sum: double JPEG samples have no single QF and contribute nothing; the original
      checked only a batch's first sample);
    - teacher forcing of the QF (`train.qf_input_prob`, off by default, not in the original): in
      that share of the iterations whose samples all carry a label, the decoder gets the true labels
      as `qf_input` instead of the predicted QF; the draw depends only on the seed and the
      iteration, so a resumed run draws as an uninterrupted one;
    - Adam and MultiStepLR, or CosineAnnealingLR for short runs (stepped once per iteration,
      after the optimiser);
    - optional gradient clipping of the global L2 norm (`G_optimizer_clipgrad`; the original's call
      would have crashed), KAIR's weight regularisers, BatchNorm folding (`merge_bn`);
    - the arithmetic (`train.precision`, the choices of inference, `models.inference.PRECISIONS`,
      through the same two contexts): fp32 is IEEE fp32 with TF32 switched off for the whole step,
      forward, backward and update (PyTorch would otherwise let cuDNN use TF32); tf32 lets cuDNN and
      cuBLAS use it; bf16 autocast, or fp16 autocast with a gradient scaler, for the forward pass.
      Validation (`test`) is always IEEE fp32, so its numbers compare across runs;
    - channels_last and torch.compile (`train.compile`), off by default;
    - `train.trainable`: only the parameters under these names train (e.g. the QF head alone);
    - DistributedDataParallel wrapping when the run has several processes;
    - non-finite losses: an iteration whose loss is NaN or infinite (on any process) is skipped (no
      backward, no update, no regularizer) with a warning; `train.max_nonfinite_steps` such
      iterations in a row stop the run with a `NonFiniteLossError` (one clear line).

    `netG` is what forward/backward run through (DDP-wrapped in distributed runs); `bare` is
    the plain FBCNN, used for saving, loading and validation.
    """

    def __init__(self, opt, device, distributed=False, merged=False):
        self.opt, self.opt_train = opt, opt["train"]
        self.device, self.distributed = device, distributed
        self.precision = training_precision(self.opt_train["precision"], device)
        self.channels_last = self.opt_train["channels_last"]
        bare = define_G(opt["netG"], initialize=True)
        if merged:
            bare = merge_bn(bare)
        self._set_network(bare)
        self.G_lossfn = image_loss(self.opt_train["G_lossfn_type"])
        if isinstance(self.G_lossfn, torch.nn.Module):  # the SSIM loss: its window goes along
            self.G_lossfn.to(device)
        self.G_lossfn_weight = self.opt_train["G_lossfn_weight"]
        self.QF_lossfn_type = self.opt_train["QF_lossfn_type"]
        self.QF_lossfn_weight = self.opt_train["QF_lossfn_weight"]
        self.qf_input_prob = self.opt_train["qf_input_prob"]
        self.seed = self.opt_train["manual_seed"] or 0
        self.define_optimizer()
        self.define_scheduler()
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.precision == "fp16")
        self.grad_norm = None
        self.log_dict = {}
        self.max_nonfinite_steps = self.opt_train["max_nonfinite_steps"]
        self.nonfinite_streak = 0  # consecutive skipped iterations
        self.skipped_steps = 0  # skipped iterations since this process started

    def _set_network(self, bare):
        freeze_untrainable(bare, self.opt_train["trainable"])
        bare = bare.to(self.device)
        if self.channels_last:
            bare = bare.to(memory_format=torch.channels_last)
        self.bare = bare
        if self.distributed:
            device_ids = [self.device] if self.device.type == "cuda" else None
            self.netG = DistributedDataParallel(bare, device_ids=device_ids)
        else:
            self.netG = bare
        if self.opt_train["compile"]:
            self.netG = torch.compile(self.netG)  # bare stays plain: saving, loading, validation
        self.bare.train()

    def define_optimizer(self, lr=None):
        t = self.opt_train
        params = [p for p in self.bare.parameters() if p.requires_grad]
        self.G_optimizer = torch.optim.Adam(params, lr=t["G_optimizer_lr"],
                                            betas=tuple(t["G_optimizer_betas"]),
                                            weight_decay=t["G_optimizer_wd"])
        if lr is not None:
            for group in self.G_optimizer.param_groups:
                group["lr"] = lr

    def define_scheduler(self):
        t = self.opt_train
        if t["G_scheduler_type"] == "CosineAnnealingLR":
            self.G_scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
                self.G_optimizer, T_max=t["total_iter"], eta_min=t["G_scheduler_eta_min"])
        else:
            self.G_scheduler = torch.optim.lr_scheduler.MultiStepLR(
                self.G_optimizer, t["G_scheduler_milestones"], t["G_scheduler_gamma"])

    def load_network(self, path):
        """Load a pretrained state dict (`path.pretrained_netG`) into netG, strictly; a netG with
        a skip gate takes weights without one with its gate closed (the same function)."""
        state = load_state_dict_file(path)
        if self.bare.skip_gate and "to_skip_gate.weight" not in state:
            state = {**state, **{f"to_skip_gate.{k}": torch.zeros_like(v)
                                 for k, v in self.bare.to_skip_gate.state_dict().items()}}
            logger.info("path.pretrained_netG %s has no skip gate: it starts closed", path)
        try:
            self.bare.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            detail = " ".join(str(exc).split())[:300]
            raise UserError(f"path.pretrained_netG {path}: does not fit netG ({detail})") from None

    def autocast(self):
        """The forward pass's autocast context of `train.precision` (none for fp32 and tf32)."""
        return precision_autocast(self.device, self.precision)

    def tf32(self):
        """The TF32 switches of `train.precision` for a whole step: allowed for tf32 only."""
        return tf32_allowed(self.precision == "tf32")

    def _to_input(self, img):
        img = img.to(self.device, non_blocking=True).float().div_(255.0)
        if self.channels_last:
            img = img.contiguous(memory_format=torch.channels_last)
        return img

    def feed_data(self, data):
        """Take a batch: uint8 `L`, `H` (N, C, H, W) and float `qf` labels (N, 1)."""
        self.L = self._to_input(data["L"])
        self.H = self._to_input(data["H"])
        self.qf = data["qf"].to(self.device, non_blocking=True).float().view(-1, 1)
        self.all_labelled = not bool(torch.isnan(data["qf"]).any())  # on the host: no sync

    def teacher_qf_input(self, current_step):
        """The true labels as `qf_input` for this iteration, or None (`train.qf_input_prob`)."""
        if not self.qf_input_prob or not self.all_labelled:
            return None
        # its own stream: [seed, n] (no third word) is the n-th training sample's crop and QF
        # (data/dataset_jpeg.py uses words 1 and 2 for the shuffle and the double-JPEG draw)
        draw = np.random.default_rng(np.random.SeedSequence([self.seed, current_step, 3])).random()
        return self.qf if draw < self.qf_input_prob else None

    def optimize_parameters(self, current_step):
        """One forward/backward/update; the losses stay on the device in `log_dict`.

        A NaN or infinite loss (on any process) skips the backward pass and the update; see
        `_skip_nonfinite`. Checking it costs one device synchronisation per iteration.
        """
        with self.tf32():
            return self._optimize(current_step)

    def _optimize(self, current_step):
        self.G_optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            E, QF_est = self.netG(self.L, self.teacher_qf_input(current_step))
        E, QF_est = E.float(), QF_est.float()
        G_loss = self.G_lossfn_weight * self.G_lossfn(E, self.H)
        QF_loss, n_labelled = masked_qf_loss(QF_est, self.qf, self.QF_lossfn_type)
        loss = G_loss + self.QF_lossfn_weight * QF_loss
        self.log_dict = {"loss": loss.detach(), "G_loss": G_loss.detach(),
                         "QF_loss": QF_loss.detach(), "QF_labelled": n_labelled.detach()}
        if not self._all_finite(loss):
            self._skip_nonfinite(current_step)
            return self.log_dict
        self.nonfinite_streak = 0
        self.scaler.scale(loss).backward()
        clip = self.opt_train["G_optimizer_clipgrad"]
        if clip:
            self.scaler.unscale_(self.G_optimizer)
            self.grad_norm = torch.nn.utils.clip_grad_norm_(self.bare.parameters(), max_norm=clip,
                                                            norm_type=2)
        self.scaler.step(self.G_optimizer)
        self.scaler.update()
        self._regularize(current_step)
        return self.log_dict

    def _all_finite(self, loss):
        """Whether the loss is finite on every process (all must agree to skip, or DDP hangs)."""
        finite = torch.isfinite(loss.detach()).to(torch.int32)
        if self.distributed:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        return bool(finite)

    def _skip_nonfinite(self, current_step):
        """Skip this iteration's update; stop the run after too many in a row."""
        self.nonfinite_streak += 1
        self.skipped_steps += 1
        if bool(torch.isfinite(self.log_dict["loss"])):
            where = "on another process"
        else:
            where = "(" + ", ".join(f"{k} {float(self.log_dict[k]):.4g}"
                                    for k in ("loss", "G_loss", "QF_loss")) + ")"
        logger.warning("iteration %d: non-finite loss %s; update skipped (%d in a row, the run "
                       "stops at %d: train.max_nonfinite_steps)", current_step, where,
                       self.nonfinite_streak, self.max_nonfinite_steps)
        if self.nonfinite_streak >= self.max_nonfinite_steps:
            first = current_step - self.nonfinite_streak + 1
            raise NonFiniteLossError(
                f"train.max_nonfinite_steps: the loss was NaN or infinite in "
                f"{self.nonfinite_streak} consecutive iterations ({first} to {current_step}); "
                f"stopping. The network was not updated by them; restarting resumes from the "
                f"last complete checkpoint. Check the training images, or lower "
                f"train.G_optimizer_lr, or use train.precision \"fp32\" if it is fp16")

    def _regularize(self, current_step):
        t = self.opt_train
        on_save = current_step % t["checkpoint_save"] == 0
        if (t["G_regularizer_orthstep"] and current_step % t["G_regularizer_orthstep"] == 0
                and not on_save):
            self.bare.apply(regularizer_orth)
        if (t["G_regularizer_clipstep"] and current_step % t["G_regularizer_clipstep"] == 0
                and not on_save):
            self.bare.apply(regularizer_clip)

    def update_learning_rate(self):
        self.G_scheduler.step()

    def current_learning_rate(self):
        return self.G_optimizer.param_groups[0]["lr"]

    def merge_bnorm(self):
        """Fold BatchNorm into the convolutions; the optimiser restarts, the schedule goes on.

        The new optimiser keeps the old one's `initial_lr` (train.G_optimizer_lr), so that its
        saved state does not read as if the options had changed to the rate at the fold."""
        lr = self.current_learning_rate()
        initial = [g.get("initial_lr") for g in self.G_optimizer.param_groups]
        scheduler_state = self.G_scheduler.state_dict()
        self._set_network(merge_bn(self.bare.eval()))
        self.define_optimizer(lr=lr)
        for group, value in zip(self.G_optimizer.param_groups, initial):
            if value is not None:
                group["initial_lr"] = value  # define_scheduler keeps an existing initial_lr
        self.define_scheduler()
        self.G_scheduler.load_state_dict(scheduler_state)

    @torch.no_grad()
    def test(self, L):
        """Blind restoration of one uint8 (1, C, H, W) tensor in eval mode and IEEE fp32,
        whatever `train.precision`: (E, predicted label)."""
        self.bare.eval()
        try:
            with tf32_allowed(False):
                E, QF_est = self.bare(self._to_input(L))
        finally:
            self.bare.train()
        return E.float(), QF_est.float()

    def network_state(self):
        """netG as a plain CPU state dict (no DDP prefix), loadable by the test scripts."""
        return {k: v.detach().to("cpu", copy=True).contiguous()
                for k, v in self.bare.state_dict().items()}

    def network_kwargs(self):
        """FBCNN constructor arguments of netG (stored with checkpoints): read from the weights,
        with the activation and the downsampling mode, which the keys cannot tell apart
        (ReLU/LeakyReLU, average/max pooling), from the network and the options."""
        kwargs = infer_fbcnn_kwargs(self.bare.state_dict(), "netG")
        kwargs["act_mode"] = net_act_mode(self.bare)
        kwargs["downsample_mode"] = self.opt["netG"]["downsample_mode"]
        kwargs["global_skip"] = self.bare.global_skip
        return kwargs

    # scheduler settings that come from the options: a resumed run takes them from its options
    # (e.g. a longer train.total_iter stretches the cosine), not from the checkpoint; base_lrs
    # is train.G_optimizer_lr
    _SCHEDULER_OPTIONS = ("milestones", "gamma", "T_max", "eta_min", "base_lrs")

    def training_state(self):
        """Optimiser, scheduler and scaler state (the scheduler's progress, not its settings)."""
        scheduler = {k: v for k, v in self.G_scheduler.state_dict().items()
                     if k not in self._SCHEDULER_OPTIONS}
        return {"optimizer": self.G_optimizer.state_dict(), "scheduler": scheduler,
                "scaler": self.scaler.state_dict()}

    def load_state(self, net_state, training_state):
        """Resume from a checkpoint's network and training state (`training_state()`, with the
        run's `options` as JSON when it comes from a checkpoint file)."""
        self.bare.load_state_dict(net_state, strict=True)
        self.G_optimizer.load_state_dict(training_state["optimizer"])
        saved = training_state.get("options")
        self._follow_the_options_optimizer(json.loads(saved).get("train") if saved else None)
        scheduler = dict(self.G_scheduler.state_dict())
        scheduler.update((k, v) for k, v in training_state["scheduler"].items()
                         if k not in self._SCHEDULER_OPTIONS)
        self.G_scheduler.load_state_dict(scheduler)
        self._follow_the_options_schedule()
        if training_state.get("scaler"):
            self.scaler.load_state_dict(training_state["scaler"])

    def load_weights_only(self, net_state, iteration):
        """Resume at `iteration` from a network alone (a checkpoint of the original,
        `N_G.pth`): its weights, strictly; a fresh optimiser (no moment estimates); the
        learning rate where the options' schedule puts `iteration`."""
        self.bare.load_state_dict(net_state, strict=True)
        self.G_scheduler.last_epoch = iteration
        self._set_lrs(self.scheduled_lrs())

    def scheduled_lrs(self):
        """The learning rates the options' schedule gives at the scheduler's iteration, in
        closed form (the schedulers themselves update the current rate step by step)."""
        t, step = self.opt_train, self.G_scheduler.last_epoch
        if t["G_scheduler_type"] == "CosineAnnealingLR":
            eta, total = t["G_scheduler_eta_min"], t["total_iter"]
            return [eta + (base - eta) * (1 + math.cos(math.pi * min(step, total) / total)) / 2
                    for base in self.G_scheduler.base_lrs]
        passed = bisect.bisect_right(sorted(t["G_scheduler_milestones"]), step)
        return [base * t["G_scheduler_gamma"] ** passed for base in self.G_scheduler.base_lrs]

    def _follow_the_options_optimizer(self, saved_train=None):
        """After a resume: Adam's betas and weight decay, and the base learning rate, are the
        options' (the checkpoint's state would otherwise keep the old ones, silently). A change
        is logged against the checkpoint's own options (`saved_train`, its `train` section)
        where they are recorded, else against the optimizer's state."""
        t = self.opt_train
        wanted = {"initial_lr": ("G_optimizer_lr", t["G_optimizer_lr"]),
                  "betas": ("G_optimizer_betas", tuple(t["G_optimizer_betas"])),
                  "weight_decay": ("G_optimizer_wd", t["G_optimizer_wd"])}
        saved_train = saved_train or {}
        for group in self.G_optimizer.param_groups:
            for key, (option, value) in wanted.items():
                old = saved_train.get(option, group.get(key, value))
                if (tuple(old) if key == "betas" else old) != value:
                    logger.info("train.%s %s -> %s: the options differ from the checkpoint's",
                                option, old, value)
                group[key] = value

    def _follow_the_options_schedule(self):
        """After a resume: if the checkpoint's learning rate is not where the options' schedule
        puts this iteration (train.total_iter, milestones, gamma or eta_min changed), set it
        there; the step-by-step updates would otherwise carry the old schedule on (a cosine
        that had reached eta_min would stay there). An unchanged schedule is left bit for bit."""
        groups = self.G_optimizer.param_groups
        wanted = self.scheduled_lrs()
        if all(math.isclose(g["lr"], lr, rel_tol=1e-6, abs_tol=1e-15)
               for g, lr in zip(groups, wanted)):
            return
        logger.info("learning rate %.3e -> %.3e at iteration %d: the options' schedule differs "
                    "from the checkpoint's", groups[0]["lr"], wanted[0],
                    self.G_scheduler.last_epoch)
        self._set_lrs(wanted)

    def _set_lrs(self, lrs):
        for group, lr in zip(self.G_optimizer.param_groups, lrs):
            group["lr"] = lr
        self.G_scheduler._last_lr = list(lrs)

    def parameter_fingerprint(self):
        """Per-tensor sums of the parameters in float64, to compare processes. Not the buffers:
        BatchNorm's running statistics are each process's own (rank 0's are broadcast at the
        start of each forward pass, then every process updates its copy from its own batch)."""
        return [float(p.detach().double().sum()) for p in self.bare.parameters()]

    @staticmethod
    def describe(net):
        """One line: the network class and its parameter count."""
        n = sum(p.numel() for p in net.parameters())
        return f"{net.__class__.__name__}: {n:,} parameters"

