"""Tests of one training step and its schedule (models/model_fbcnn.py, runners/training.py):
the losses, the QF loss's mask, precision, clipping, trainable parameters, teacher forcing,
and the learning rate across resumes."""
import json
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.loss_ssim import SSIMLoss
from models.model_fbcnn import masked_qf_loss
from utils.errors import UserError

from tests.train_support import cosine, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def test_masked_qf_loss_skips_nan_labels():
    est = torch.tensor([[0.2], [0.5], [0.9]], requires_grad=True)
    loss, count = masked_qf_loss(est, torch.tensor([[0.3], [float("nan")], [0.5]]))
    assert loss.item() == pytest.approx((0.1 + 0.4) / 2) and int(count) == 2
    loss.backward()
    assert est.grad.flatten().tolist() == pytest.approx([-0.5, 0.0, 0.5])
    est.grad = None
    loss, count = masked_qf_loss(est, torch.full((3, 1), float("nan")))
    loss.backward()
    assert loss.item() == 0 and int(count) == 0 and torch.all(est.grad == 0)
    labels = torch.tensor([[0.1], [0.2], [0.3]])
    assert masked_qf_loss(est, labels)[0].item() == pytest.approx(F.l1_loss(est, labels).item())
    assert (masked_qf_loss(est, labels, "l2")[0].item() ==
            pytest.approx(F.mse_loss(est, labels).item()))
    assert (masked_qf_loss(est, labels, "l2sum")[0].item() ==
            pytest.approx(F.mse_loss(est, labels, reduction="sum").item()))


def test_masked_l2sum_qf_loss_sums_over_the_labelled_samples_only():
    est = torch.tensor([[0.2], [0.5], [0.9], [0.4]], requires_grad=True)
    labels = torch.tensor([[0.3], [float("nan")], [0.5], [0.1]])
    loss, count = masked_qf_loss(est, labels, "l2sum")
    assert loss.item() == pytest.approx(0.1 ** 2 + 0.4 ** 2 + 0.3 ** 2) and int(count) == 3
    loss.backward()
    assert est.grad.flatten().tolist() == pytest.approx([-0.2, 0.0, 0.8, 0.6])
    assert masked_qf_loss(est, torch.full((4, 1), float("nan")), "l2sum")[0].item() == 0
    with pytest.raises(UserError, match="QF_lossfn_type 'l3' is unknown; known: l1, l2, l2sum"):
        masked_qf_loss(est, labels, "l3")


def _tf32_switches():
    """(cuDNN convolutions, cuBLAS matrix products): "tf32" or "ieee", read through the old API,
    which models.inference.tf32_allowed keeps in step with the new one."""
    return tuple("tf32" if flag else "ieee" for flag in (torch.backends.cudnn.allow_tf32,
                                                          torch.backends.cuda.matmul.allow_tf32))


@pytest.mark.parametrize("precision, during, dtype", [("fp32", "ieee", torch.float32),
                                                      ("tf32", "tf32", torch.float32),
                                                      ("bf16", "ieee", torch.bfloat16),
                                                      ("fp16", "ieee", torch.float16)])
def test_precision_sets_tf32_around_the_whole_step_and_autocasts_the_forward(
        option_file, precision, during, dtype):
    """PyTorch lets cuDNN run fp32 convolutions in TF32 by default: fp32 must switch that off
    for the forward pass, the backward pass and the update, then put the switches back."""
    model = tiny_model(option_file, f"train.precision={precision}")
    before = _tf32_switches()
    seen = {}
    model.bare.register_forward_hook(
        lambda module, args, out: seen.update(forward=_tf32_switches(), dtype=out[0].dtype))
    model.bare.m_head.weight.register_hook(lambda grad: seen.update(backward=_tf32_switches()))
    model.G_optimizer.register_step_pre_hook(
        lambda optimizer, args, kwargs: seen.update(update=_tf32_switches()))
    model.optimize_parameters(1)
    assert seen == {"forward": (during, during), "backward": (during, during),
                    "update": (during, during), "dtype": dtype}
    assert _tf32_switches() == before
    assert model.scaler.is_enabled() == (precision == "fp16")
    seen.clear()
    model.test(model.L[:1].mul(255).to(torch.uint8))  # validation: IEEE fp32 whatever the run's
    assert (seen["forward"], seen["dtype"]) == (("ieee", "ieee"), torch.float32)
    assert _tf32_switches() == before


def test_gradient_clipping_bounds_the_update(option_file):
    clipped = tiny_model(option_file, "train.G_optimizer_clipgrad=0.001")
    clipped.optimize_parameters(1)
    after = torch.norm(torch.stack([p.grad.norm() for p in clipped.bare.parameters()]))
    assert float(clipped.grad_norm) > 0.001 >= float(after) * (1 - 1e-5)
    free = tiny_model(option_file)
    free.optimize_parameters(1)
    free_norm = torch.norm(torch.stack([p.grad.norm() for p in free.bare.parameters()]))
    assert float(free_norm) == pytest.approx(float(clipped.grad_norm), rel=1e-5)
    assert free.grad_norm is None


def test_trainable_trains_only_the_named_parameters(option_file):
    model = tiny_model(option_file, 'train.trainable=["qf_pred"]',
                        "train.G_regularizer_clipstep=1", "train.G_regularizer_orthstep=1")
    with torch.no_grad():  # a weight beyond the clip regulariser's bound, outside the QF head
        model.bare.m_head.weight[0, 0, 0, 0] = 3.0
    before = {k: v.clone() for k, v in model.bare.state_dict().items()}
    for step in (1, 2):
        model.optimize_parameters(step)
    after = model.bare.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("qf_pred.") for k in changed)
    assert sum(p.numel() for g in model.G_optimizer.param_groups for p in g["params"]) == sum(
        v.numel() for k, v in after.items() if k.startswith("qf_pred."))


def test_a_trainable_prefix_that_names_nothing_is_refused(option_file):
    with pytest.raises(UserError, match=r"train\.trainable: 'qf_head' names no parameter.*qf_pred"):
        tiny_model(option_file, 'train.trainable=["qf_head"]')


def test_step_loss_is_l1_plus_weighted_masked_qf(option_file):
    model = tiny_model(option_file, "train.QF_lossfn_weight=0.5")
    with torch.no_grad():
        E, qf = model.bare(model.L)
    logs = model.optimize_parameters(1)
    expected = F.l1_loss(E, model.H) + 0.5 * (qf[0, 0] - 0.5).abs()
    assert float(logs["loss"]) == pytest.approx(float(expected), rel=1e-5)
    assert int(logs["QF_labelled"]) == 1


@pytest.mark.parametrize("kind", ["l1", "l2", "l2sum", "ssim", "charbonnier"])
def test_every_image_loss_type_is_its_direct_computation(option_file, kind):
    model = tiny_model(option_file, f"train.G_lossfn_type={kind}", "train.G_lossfn_weight=2")
    with torch.no_grad():
        E, _ = model.bare(model.L)
    d = (E - model.H).double()
    expected = {"l1": d.abs().mean(), "l2": (d * d).mean(), "l2sum": (d * d).sum(),
                "ssim": 1 - SSIMLoss().ssim(E.double(), model.H.double()),
                "charbonnier": torch.sqrt(d * d + 1e-9).mean()}[kind]
    assert float(model.optimize_parameters(1)["G_loss"]) == pytest.approx(2 * float(expected),
                                                                         rel=1e-5)


@pytest.mark.parametrize("kind", ["l1", "l2", "l2sum"])
def test_every_qf_loss_type_is_its_direct_computation(option_file, kind):
    model = _labelled(tiny_model(option_file, f"train.QF_lossfn_type={kind}"),
                      [[0.9], [0.2]])
    with torch.no_grad():
        _, qf = model.bare(model.L)
    d = (qf - torch.tensor([[0.9], [0.2]])).double()
    expected = {"l1": d.abs().mean(), "l2": (d * d).mean(), "l2sum": (d * d).sum()}[kind]
    logs = model.optimize_parameters(1)
    assert float(logs["QF_loss"]) == pytest.approx(float(expected), rel=1e-5)
    assert int(logs["QF_labelled"]) == 2


def _labelled(model, labels):
    model.feed_data({"H": model.H.mul(255).round().to(torch.uint8),
                     "L": model.L.mul(255).round().to(torch.uint8), "qf": torch.tensor(labels)})
    return model


def test_qf_input_prob_feeds_the_true_labels_to_the_decoder(option_file):
    forced = _labelled(tiny_model(option_file, "train.qf_input_prob=1",
                                   "train.QF_lossfn_weight=0"), [[0.9], [0.2]])
    with torch.no_grad():
        E_true, _ = forced.bare(forced.L, forced.qf)
    seen = []
    forced.bare.register_forward_hook(lambda module, args, out: seen.append(args))
    logs = forced.optimize_parameters(1)
    assert len(seen) == 1 and torch.equal(seen[0][1], torch.tensor([[0.9], [0.2]]))
    assert float(logs["G_loss"]) == pytest.approx(F.l1_loss(E_true, forced.H).item(), rel=1e-6)
    # the image loss no longer reaches the QF head: its only gradient was the QF loss, weight 0
    assert not any(p.grad.any() for p in forced.bare.qf_pred.parameters())
    blind = _labelled(tiny_model(option_file, "train.QF_lossfn_weight=0"), [[0.9], [0.2]])
    blind.optimize_parameters(1)
    assert any(p.grad.any() for p in blind.bare.qf_pred.parameters())


def test_qf_input_prob_skips_unlabelled_batches_and_draws_by_iteration(option_file):
    double = tiny_model(option_file, "train.qf_input_prob=1")  # one label is NaN
    assert double.teacher_qf_input(1) is None
    off = _labelled(tiny_model(option_file), [[0.9], [0.2]])
    assert off.teacher_qf_input(1) is None
    half = _labelled(tiny_model(option_file, "train.qf_input_prob=0.5"), [[0.9], [0.2]])
    drawn = [step for step in range(1, 401) if half.teacher_qf_input(step) is not None]
    assert 140 < len(drawn) < 260  # binomial(400, 0.5): mean 200, sd 10
    again = _labelled(tiny_model(option_file, "train.qf_input_prob=0.5"), [[0.1], [0.3]])
    assert [step for step in range(1, 401) if again.teacher_qf_input(step) is not None] == drawn
    # not the stream of the training sample with the same number (its crop and QF)
    sample_stream = [step for step in range(1, 401) if np.random.default_rng(
        np.random.SeedSequence([half.seed, step])).random() < 0.5]
    assert drawn != sample_stream


def test_cosine_schedule_decays_to_eta_min_at_total_iter(option_file):
    model = tiny_model(option_file, "train.G_scheduler_type=CosineAnnealingLR",
                        "train.total_iter=4", "train.G_scheduler_eta_min=1e-5")
    lrs = []
    for _ in range(4):
        model.G_optimizer.step()
        model.update_learning_rate()
        lrs.append(model.current_learning_rate())
    assert lrs == pytest.approx([cosine(t, 4) for t in range(1, 5)], rel=1e-9)
    assert lrs[-1] == pytest.approx(1e-5, rel=1e-9)


@pytest.mark.parametrize("stopped_at", [3, 4])  # 4: the old end, where the rate is eta_min
def test_resume_with_a_longer_total_iter_stretches_the_cosine(option_file, stopped_at):
    common = ["train.G_scheduler_type=CosineAnnealingLR", "train.G_scheduler_eta_min=1e-5"]
    first = tiny_model(option_file, *common, "train.total_iter=4")
    for _ in range(stopped_at):
        first.G_optimizer.step()
        first.update_learning_rate()
    resumed = tiny_model(option_file, *common, "train.total_iter=8")
    resumed.load_state(first.bare.state_dict(), first.training_state())
    assert resumed.G_scheduler.last_epoch == stopped_at  # the progress came from the checkpoint
    assert resumed.current_learning_rate() == pytest.approx(cosine(stopped_at, 8), rel=1e-9)
    lrs = []
    for _ in range(8 - stopped_at):
        resumed.G_optimizer.step()
        resumed.update_learning_rate()
        lrs.append(resumed.current_learning_rate())
    assert lrs == pytest.approx([cosine(t, 8) for t in range(stopped_at + 1, 9)], rel=1e-9)


def test_resume_takes_the_options_learning_rate_betas_and_weight_decay(option_file, caplog):
    first = tiny_model(option_file, "train.G_scheduler_milestones=[2]")
    for _ in range(3):
        first.G_optimizer.step()
        first.update_learning_rate()
    assert first.current_learning_rate() == pytest.approx(1e-3 * 0.5, rel=1e-12)
    resumed = tiny_model(option_file, "train.G_scheduler_milestones=[2]",
                          "train.G_optimizer_lr=0.01", "train.G_optimizer_wd=0.1",
                          "train.G_optimizer_betas=[0.5,0.9]")
    with caplog.at_level(logging.INFO):
        resumed.load_state(first.bare.state_dict(), first.training_state())
    (group,) = resumed.G_optimizer.param_groups
    assert (group["betas"], group["weight_decay"]) == ((0.5, 0.9), 0.1)
    assert resumed.current_learning_rate() == pytest.approx(0.01 * 0.5, rel=1e-12)
    resumed.G_optimizer.step()
    resumed.update_learning_rate()
    assert resumed.current_learning_rate() == pytest.approx(0.01 * 0.5, rel=1e-12)
    assert "train.G_optimizer_wd 0.0 -> 0.1" in caplog.text


def test_changed_optimizer_options_are_told_against_the_checkpoints_options(option_file,
                                                                          caplog):
    """A change is told against the checkpoint's recorded options, not its optimizer state (an
    initial_lr that no option said): unchanged options report nothing; a real change does."""
    first = tiny_model(option_file)
    state = {**first.training_state(), "options": json.dumps(first.opt)}
    for group in state["optimizer"]["param_groups"]:
        group["initial_lr"] = 2.3918e-05
    with caplog.at_level(logging.INFO):
        tiny_model(option_file).load_state(first.bare.state_dict(), state)
    assert "differ" not in caplog.text
    resumed = tiny_model(option_file, "train.G_optimizer_lr=0.01")
    with caplog.at_level(logging.INFO):
        resumed.load_state(first.bare.state_dict(), state)
    assert "train.G_optimizer_lr 0.001 -> 0.01: the options differ" in caplog.text
    assert resumed.G_optimizer.param_groups[0]["initial_lr"] == 0.01


def test_resume_with_the_same_schedule_keeps_the_learning_rate_bit_for_bit(option_file):
    for schedule in (["train.G_scheduler_type=CosineAnnealingLR", "train.total_iter=7"],
                     ["train.G_scheduler_milestones=[2,3]", "train.G_scheduler_gamma=0.3"]):
        first = tiny_model(option_file, *schedule)
        for _ in range(4):
            first.G_optimizer.step()
            first.update_learning_rate()
        resumed = tiny_model(option_file, *schedule)
        resumed.load_state(first.bare.state_dict(), first.training_state())
        assert resumed.current_learning_rate() == first.current_learning_rate()
        assert resumed.scheduled_lrs()[0] == pytest.approx(first.current_learning_rate(),
                                                            rel=1e-12)


def test_resume_with_new_milestones_follows_them(option_file):
    first = tiny_model(option_file, "train.G_scheduler_milestones=[2,3]",
                        "train.G_scheduler_gamma=0.5")
    for _ in range(4):
        first.G_optimizer.step()
        first.update_learning_rate()
    assert first.current_learning_rate() == pytest.approx(1e-3 * 0.25)
    resumed = tiny_model(option_file, "train.G_scheduler_milestones=[5]",
                          "train.G_scheduler_gamma=0.5")
    resumed.load_state(first.bare.state_dict(), first.training_state())
    assert resumed.current_learning_rate() == pytest.approx(1e-3)  # no milestone passed yet
    resumed.G_optimizer.step()
    resumed.update_learning_rate()
    assert resumed.current_learning_rate() == pytest.approx(1e-3 * 0.5)
