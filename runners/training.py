"""The training runner behind `main_train_fbcnn.py`: validated options in, checkpoints out.

This module owns the loop around `models.model_fbcnn.ModelFBCNN`:
- the run folder `<path.root>/<task>/` with `models/`, `images/`, `options/`, `train.log` and
  `metrics.jsonl`;
- resuming by itself from the newest complete checkpoint (the seed, optimiser, scheduler and
  iteration come back, and the data sampler continues at the next iteration, so on the CPU a
  resumed run computes exactly the losses of an uninterrupted one), or from a newer checkpoint
  of the original (`<iter>_G.pth`, weights only: a fresh optimiser, the schedule at that
  iteration, logged as such);
- the data loader (`IterationBatchSampler`, per-process share of batch and workers, pinned memory,
  persistent workers);
- logging the losses every `checkpoint_print`, saving every `checkpoint_save` (and at
  `total_iter`), validating every `checkpoint_test`;
- distributed runs: every process trains, rank 0 alone logs, validates and saves;
- stopping (runners/stopping.py): Ctrl+C or SIGTERM ends the run after the iteration in
  progress, saved, so a requeued job resumes there. Validation: runners/validation.py.
"""
import contextlib
import json
import logging
import os
import random
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader

from data.dataset_jpeg import IterationBatchSampler, dataset_channels, define_dataset
from models.model_fbcnn import ModelFBCNN, training_precision
from models.model_zoo import infer_fbcnn_kwargs, load_state_dict_file
from models.select_network import net_act_mode
from runners.stopping import StopRequest, loader_worker_init, signals_held, stop_workers
from runners.validation import validate
from utils import checkpoint as ckpt
from utils.cpu import native_bf16, usable_cores
from utils.dist import (all_gather_floats, all_reduce_mean, barrier, broadcast_int, cleanup,
                        init_distributed)
from utils.errors import UserError
from utils.fileio import atomic_write_bytes, folder_lock, make_folder
from utils.logger import LOG_FORMAT, MetricsWriter, progress_bar, setup_logging

__all__ = ["RunDirs", "make_loader", "train"]

logger = logging.getLogger(f"fbcnn.{__name__}")


@dataclass(frozen=True)
class RunDirs:
    """The folders and files of a run: `<path.root>/<task>/...`."""
    task_dir: str

    @classmethod
    def from_options(cls, opt):
        return cls(os.path.join(opt["path"]["root"], opt["task"]))

    @property
    def models(self):
        return os.path.join(self.task_dir, "models")

    @property
    def images(self):
        return os.path.join(self.task_dir, "images")

    @property
    def options(self):
        return os.path.join(self.task_dir, "options")

    @property
    def log(self):
        return os.path.join(self.task_dir, "train.log")

    @property
    def metrics(self):
        return os.path.join(self.task_dir, "metrics.jsonl")

    @property
    def tensorboard(self):
        return os.path.join(self.task_dir, "tensorboard")


def _seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def make_loader(dataset, sampler, train_opt, info):
    """The training DataLoader the options describe (workers divided among the processes, and
    at most this machine's cores among its processes: more only queue for the same cores;
    batches do not depend on the number of workers)."""
    workers = train_opt["dataloader_num_workers"] // info.world_size
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", info.world_size))
    cap = max(1, usable_cores() // local_processes)
    if workers > cap:
        logger.warning("datasets.train.dataloader_num_workers %d: this machine has %d core(s) "
                       "for %d training process(es); using %d loader process(es) each",
                       train_opt["dataloader_num_workers"], usable_cores(), local_processes, cap)
        workers = cap
    kwargs = {}
    if workers > 0:
        kwargs = {"persistent_workers": train_opt["dataloader_persistent_workers"],
                  "prefetch_factor": train_opt["dataloader_prefetch_factor"],
                  "worker_init_fn": loader_worker_init}
    return DataLoader(dataset, batch_sampler=sampler, num_workers=workers,
                      pin_memory=train_opt["dataloader_pin_memory"] and info.device.type == "cuda",
                      **kwargs)


def _resume_point(dirs, info):
    """`(iteration, weights_only)` of rank 0's resume point (`utils.checkpoint.resume_point`),
    or `(None, False)`, on every process."""
    point = None
    if info.is_main:
        stale = ckpt.remove_stale_temporaries(dirs.models)
        if stale:
            logger.warning("removed %d temporary file(s) of an interrupted save: %s", len(stale),
                           ", ".join(stale))
        point = ckpt.resume_point(dirs.models)
    latest = broadcast_int(None if point is None else point[0], info)
    weights_only = broadcast_int(int(point is not None and point[1]), info)
    return latest, bool(weights_only)


def _format_eta(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class _Trainer:
    def __init__(self, opt, info, dirs, should_end=None):
        self.opt, self.info, self.dirs = opt, info, dirs
        self.should_end = should_end
        self.t = opt["train"]
        self.metrics = None
        self.jpeg_cache = {}
        self.stop = StopRequest(announce=info.is_main)
        self.resume_file = None  # the network file of the checkpoint resumed from

    def setup(self):
        """Everything before the first iteration, in order: the resume point, the seed, the
        data, warnings about the options, the model (resumed, pretrained or new), the loader,
        and the run folder's records."""
        latest, saved = self._resume_state()
        seed = self._settle_seed(saved)
        self._build_datasets(seed)
        self._warn_about_options()
        self._build_model(latest, saved)
        self._build_loader(seed)
        if self.info.is_main:
            self._start_records()

    def _resume_state(self):
        """`(iteration, (network state, training state))` of the newest checkpoint, or
        `(None, None)` for a new run. The training state is None for a checkpoint of the
        original, which holds the network alone (`<iter>_G.pth`)."""
        latest, weights_only = _resume_point(self.dirs, self.info)
        if latest is None:
            return None, None
        try:
            if weights_only:
                self.resume_file = os.path.join(self.dirs.models, f"{latest}_G.pth")
                return latest, (load_state_dict_file(self.resume_file), None)
            self.resume_file = ckpt.network_file(self.dirs.models, latest)
            return latest, ckpt.load_training_state(self.dirs.models, latest)
        except UserError as exc:
            if self.info.world_size > 1 and not self.info.is_main:
                raise UserError(f"{exc}; multi-node runs need the run folder on a shared "
                                f"filesystem to resume") from None
            raise

    def _settle_seed(self, saved):
        """The run's seed (from the options, else the checkpoint's, else drawn once and then
        stored with every checkpoint); every RNG is seeded with it."""
        t, info = self.t, self.info
        if saved is not None and saved[1] is not None:
            stored = json.loads(saved[1]["options"])["train"]["manual_seed"]
            if t["manual_seed"] is None:
                t["manual_seed"] = stored
            elif t["manual_seed"] != stored:
                logger.warning("train.manual_seed %d differs from the checkpoint's %d: the data "
                               "stream will not continue as before", t["manual_seed"], stored)
        if t["manual_seed"] is None:
            t["manual_seed"] = broadcast_int(random.SystemRandom().randrange(2 ** 31)
                                              if info.is_main else 0, info)
        _seed_everything(t["manual_seed"])
        if info.device.type == "cuda":
            torch.backends.cudnn.benchmark = t["cudnn_benchmark"]
        return t["manual_seed"]

    def _build_datasets(self, seed):
        opt, info = self.opt, self.info
        train_opt, test_opt = opt["datasets"]["train"], opt["datasets"]["test"]
        self.train_set = define_dataset(train_opt, "train", opt["n_channels"], seed=seed,
                                        progress=info.is_main)
        self.has_test = test_opt is not None
        self.test_set = None
        if self.has_test and info.is_main:
            self.test_set = define_dataset(test_opt, "test", opt["netG"]["in_nc"])

    def _warn_about_options(self):
        """Log (rank 0) what the options ask for that will not happen as written."""
        opt = self.opt
        if not self.info.is_main:
            return
        test_opt = opt["datasets"]["test"]
        if test_opt is not None and (dataset_channels(test_opt["dataset_type"])
                                     != opt["netG"]["in_nc"]):
            logger.info("datasets.test.dataset_type %r does not match netG.in_nc %d: the "
                        "test images are read with %d channel(s)", test_opt["dataset_type"],
                        opt["netG"]["in_nc"], opt["netG"]["in_nc"])
        for phase in ("train", "test"):
            entry = opt["datasets"][phase]
            if entry is not None and entry["dataroot_L"] is not None:
                logger.info("datasets.%s.dataroot_L is ignored: the JPEG inputs are made on "
                            "the fly", phase)
        precision = training_precision(self.t["precision"], self.info.device)
        if self.t["precision"] == "auto":
            logger.info("train.precision auto: %s on this %s", precision, self.info.device.type)
        if self.info.device.type == "cpu" and (precision == "fp16" or precision == "bf16"
                                               and not any(native_bf16().values())):
            logger.warning("train.precision %r on a CPU without native %s arithmetic: autocast "
                           "is much slower than fp32 there (15x on a 2-core AMD EPYC, "
                           "docs/training.md); --set train.precision=fp32 for this machine",
                           precision, precision)
        total = self.t["total_iter"]
        if opt["merge_bn"] and total is not None and opt["merge_bn_startpoint"] > total:
            logger.warning("merge_bn_startpoint %d is after train.total_iter %d: this run ends "
                           "before BatchNorm is folded, so its networks keep BatchNorm (resume "
                           "with a larger train.total_iter to fold it)",
                           opt["merge_bn_startpoint"], total)

    def _build_model(self, latest, saved):
        """The model, from the checkpoint, from `path.pretrained_netG`, or initialised."""
        opt, info = self.opt, self.info
        # the checkpoint says whether BatchNorm was folded (merge_bn_startpoint may have moved)
        merged = (saved is not None and "B" in opt["netG"]["act_mode"] and "B" not in
                  infer_fbcnn_kwargs(saved[0], self.resume_file)["act_mode"])
        self.model = ModelFBCNN(opt, info.device, distributed=info.distributed, merged=merged)
        self.start = latest or 0
        if saved is not None:
            try:
                if saved[1] is None:
                    self.model.load_weights_only(saved[0], latest)
                else:
                    self.model.load_state(saved[0], saved[1])
            except (RuntimeError, ValueError, KeyError) as exc:
                detail = " ".join(str(exc).split())[:300]
                raise UserError(f"{self.dirs.models}: checkpoint {latest} does not fit the "
                                f"netG/train options ({detail})") from None
            if saved[1] is None:
                logger.info("resuming from iteration %d: %s, weights only (a checkpoint of the "
                            "original): the optimiser starts fresh, the learning rate is the "
                            "schedule's at iteration %d (%.3e), the seed and data stream are "
                            "this run's", latest, self.resume_file, latest,
                            self.model.current_learning_rate())
            else:
                ckpt.set_rng_state(saved[1]["rng"])
                logger.info("resuming from iteration %d: %s", latest, self.resume_file)
            if opt["merge_bn"] and not merged and latest >= opt["merge_bn_startpoint"]:
                self.model.merge_bnorm()  # the start point was moved before the checkpoint
                logger.info("merge_bn_startpoint %d is not after the checkpoint's iteration: "
                            "BatchNorm folded now", opt["merge_bn_startpoint"])
        elif opt["path"]["pretrained_netG"]:
            self.model.load_network(opt["path"]["pretrained_netG"])
            logger.info("starting from pretrained netG %s", opt["path"]["pretrained_netG"])
        else:
            logger.info("starting from scratch (init_type %s)", opt["netG"]["init_type"])

    def _build_loader(self, seed):
        train_opt, info = self.opt["datasets"]["train"], self.info
        self.sampler = IterationBatchSampler(
            len(self.train_set), train_opt["dataloader_batch_size"], info.rank, info.world_size,
            seed=seed, shuffle=train_opt["dataloader_shuffle"],
            double_prob=self.train_set.degradation.double_prob, start_iter=self.start + 1)
        self.loader = make_loader(self.train_set, self.sampler, train_opt, self.info)

    def _start_records(self):
        """The run folder's models/ and options/ (this start's resolved options, kept beside
        every earlier start's), metrics.jsonl, and the first log lines."""
        opt, train_opt = self.opt, self.opt["datasets"]["train"]
        for folder in (self.dirs.models, self.dirs.options):  # images/: when one is saved
            make_folder(folder)
        stamp = time.strftime("%y%m%d_%H%M%S")
        path, n = os.path.join(self.dirs.options, f"train_{stamp}.json"), 1
        while os.path.exists(path):  # two starts within one second keep both records
            n += 1
            path = os.path.join(self.dirs.options, f"train_{stamp}_{n}.json")
        atomic_write_bytes(path, (json.dumps(opt, indent=2) + "\n").encode(), fsync=False)
        self.metrics = MetricsWriter(self.dirs.metrics, self.dirs.tensorboard)
        logger.info("options: %s", json.dumps(opt))
        logger.info("netG %s, act_mode %s; %d training images in %s, batch %d on %d "
                    "process(es), device %s", ModelFBCNN.describe(self.model.bare),
                    net_act_mode(self.model.bare), len(self.train_set),
                    train_opt["dataroot_H"], train_opt["dataloader_batch_size"],
                    self.info.world_size, self.info.device)

    def log_train(self, step, timer):
        values = {k: float(v) for k, v in self.model.log_dict.items()}
        means = all_reduce_mean([values["loss"], values["G_loss"], values["QF_loss"]],
                                self.info.device)
        # a double-JPEG iteration (the same on every process) has no QF label: no QF loss
        qf_loss = means[2] if values.get("QF_labelled", 1) > 0 else None
        if not self.info.is_main:
            return
        elapsed = time.time() - timer["time"]
        it_per_s = (step - timer["step"]) / elapsed if elapsed > 0 else float("nan")
        batch = self.opt["datasets"]["train"]["dataloader_batch_size"]
        record = {"kind": "train", "iter": step, "epoch": self.sampler.epoch(step),
                  "lr": self.model.current_learning_rate(), "loss": means[0],
                  "G_loss": means[1], "QF_loss": qf_loss, "it_per_s": it_per_s,
                  "patches_per_s": it_per_s * batch, "time": time.time()}
        eta = ""
        total = self.t["total_iter"]
        if total is not None and it_per_s > 0:
            eta = f", ETA {_format_eta((total - step) / it_per_s)}"
        logger.info("<epoch:%3d, iter:%8d, lr:%.3e> loss: %.4e G_loss: %.4e QF_loss: %s | "
                    "%.2f it/s, %.0f patches/s%s", record["epoch"], step, record["lr"],
                    means[0], means[1], "- (double JPEG)" if qf_loss is None else
                    f"{qf_loss:.4e}", it_per_s, record["patches_per_s"], eta)
        scalars = {"train/loss": means[0], "train/G_loss": means[1], "train/lr": record["lr"],
                   "train/patches_per_s": record["patches_per_s"]}
        if qf_loss is not None:
            scalars["train/QF_loss"] = qf_loss
        self.metrics.write(record, scalars, step)

    def save(self, step):
        with self.stop.critical():  # a second Ctrl+C or SIGTERM takes effect after the save
            self._save(step)
            self.saved = step

    def _save(self, step):
        if self.info.is_main:
            state = {"iteration": step, **self.model.training_state(), "rng": ckpt.rng_state(),
                     "options": json.dumps(self.opt),
                     "act_mode": net_act_mode(self.model.bare)}
            path = ckpt.save_checkpoint(self.dirs.models, step, self.model.network_state(), state,
                                        net_kwargs=self.model.network_kwargs())
            logger.info("saved checkpoint %d: %s", step, path)
            keep = self.t["checkpoint_keep"]
            if keep:
                for old in ckpt.complete_checkpoints(self.dirs.models)[:-keep]:
                    ckpt.remove_checkpoint(self.dirs.models, old)
        if self.info.distributed:
            prints = all_gather_floats(self.model.parameter_fingerprint(), self.info.device)
            if self.info.is_main:
                diff = max(max(abs(a - b) for a, b in zip(p, prints[0])) for p in prints)
                if diff == 0:
                    logger.info("parameters identical on all %d processes", len(prints))
                else:
                    logger.error("parameters differ between processes (max sum difference "
                                 "%.3e)", diff)
        barrier()

    def test(self, step):
        if self.info.is_main:
            test_opt = self.opt["datasets"]["test"]
            image_dir = self.dirs.images if test_opt["save_images"] else None
            result = validate(self.model, self.test_set, step, image_dir, self.jpeg_cache,
                              stop=self.stop.requested.is_set)
            if result is None:
                logger.warning("iteration %d: validation abandoned (stopping)", step)
                barrier()
                return
            rows, avg = result
            if not rows:
                logger.warning("iteration %d: no image of %s could be read; validation skipped",
                               step, test_opt["dataroot_H"])
                barrier()
                return
            logger.info("<epoch:%3d, iter:%8d> %s at QF %d: Average PSNR %.2fdB (JPEG %.2fdB), "
                        "SSIM %.4f, PSNR-B %.2fdB, QF %.1f", self.sampler.epoch(step), step,
                        test_opt["name"], test_opt["qf"], avg["psnr"], avg["jpeg_psnr"],
                        avg["ssim"], avg["psnrb"], avg["qf"])
            record = {"kind": "test", "iter": step, "set": test_opt["name"],
                      "input_qf": test_opt["qf"], "average": avg, "images": rows}
            self.metrics.write(record, {f"test/{k}": v for k, v in avg.items()}, step)
        barrier()

    def run(self):
        """Train from `self.start` to train.total_iter (or a stop); returns the iteration
        reached. Ctrl+C or SIGTERM ends the run after the iteration in progress, saved."""
        total, step = self.t["total_iter"], self.start
        if total is not None and step >= total:
            logger.info("iteration %d already reached train.total_iter %d: nothing to do",
                        step, total)
            return step
        self.bar = progress_bar(step, total, enabled=self.info.is_main)
        self.timer = {"time": time.time(), "step": step}
        self.saved = self.start  # the newest checkpoint on disk (0: none)
        self.stopping = self.ending = False
        try:
            with self.stop:
                with signals_held():  # the workers start holding them, then ignore them
                    batches = iter(self.loader)
                try:
                    self.stop.interruptible = True
                    while (total is None or step < total) and not self._stop_agreed():
                        step += 1
                        self._iteration(step, next(batches))
                    if self.stopping and step and self.saved != step:
                        self.save(step)  # every process agreed to stop here: a resume starts here
                finally:
                    self.stop.interruptible = False
                    stop_workers(batches)
            if self.stopping:
                raise KeyboardInterrupt
            if self.ending and self.saved != step:
                self.save(step)
        except KeyboardInterrupt:  # Ctrl+C or SIGTERM, after the iteration or (twice) at once
            logger.warning("interrupted at iteration %d; the next start resumes from %s", step,
                           f"iteration {self.saved}" if self.saved else
                           "scratch (no checkpoint yet)")
            raise
        finally:
            if self.bar is not None:
                self.bar.close()
        logger.info("stopped at iteration %d (%s)", step,
                    "asked to end early" if self.ending else "train.total_iter")
        return step

    def _iteration(self, step, data):
        """One training step, then what falls due at it: log, checkpoint, validation."""
        t, model = self.t, self.model
        if (self.opt["merge_bn"] and step == self.opt["merge_bn_startpoint"]
                and "B" in net_act_mode(model.bare)):
            model.merge_bnorm()
            logger.info("iteration %d: BatchNorm folded into the convolutions (act_mode now %s)",
                        step, net_act_mode(model.bare))
        model.feed_data(data)
        model.optimize_parameters(step)
        model.update_learning_rate()
        if self.bar is not None:
            self.bar.update(1)
            if step % 10 == 0:
                self.bar.set_postfix(loss=f"{float(model.log_dict['loss']):.4e}")
        if step % t["checkpoint_print"] == 0:
            self.log_train(step, self.timer)
            self.timer = {"time": time.time(), "step": step}
        if step % t["checkpoint_save"] == 0 or step == t["total_iter"]:
            self.save(step)
        if self.has_test and step % t["checkpoint_test"] == 0:
            self.test(step)

    def _stop_agreed(self):
        """Whether to stop before the next iteration: on a Ctrl+C or SIGTERM (`stopping`) or on
        `should_end` (`ending`: the run ends as at train.total_iter, saved), on any process, so
        that all stop together (one that went on alone would wait for the others forever)."""
        flags = [float(self.stop.requested.is_set()),
                 float(self.should_end is not None and bool(self.should_end()))]
        if self.info.distributed:
            flags = all_reduce_mean(flags, self.info.device)
        self.stopping, self.ending = flags[0] > 0, flags[1] > 0
        return self.stopping or self.ending

    def close(self):
        if self.metrics is not None:
            self.metrics.close()


def train(opt, should_end=None):
    """Train as the validated options `opt` say; returns {"start": iteration, "end": iteration}.

    Launched by torchrun, each process calls this; without it, one process trains.
    `should_end`, a callable asked before each iteration, ends the run early when it returns
    true (on any process): the iteration reached is saved and returned, as at total_iter (a
    time budget, benchmarks/gpu_train_lite.py).
    """
    if opt["gpu_ids"] and not torch.cuda.is_available():
        raise UserError(f"gpu_ids {json.dumps(opt['gpu_ids'])}: no CUDA device on this machine; "
                        "to train on the CPU set \"gpu_ids\": [] (or --set gpu_ids=[])")
    info = init_distributed(opt["gpu_ids"])
    dirs = RunDirs.from_options(opt)
    with contextlib.ExitStack() as stack:
        stack.callback(cleanup)
        if info.is_main:
            stack.enter_context(_run_folder_lock(dirs.task_dir))
        undo_logging = setup_logging(dirs.log if info.is_main else None,
                                     logging.INFO if info.is_main else logging.WARNING,
                                     console_format=LOG_FORMAT)
        stack.callback(undo_logging)
        trainer = _Trainer(opt, info, dirs, should_end)
        stack.callback(trainer.close)
        try:
            trainer.setup()
        except KeyboardInterrupt:
            logger.warning("interrupted while starting, before any iteration; nothing of this "
                           "start was saved")
            raise
        end = trainer.run()
        return {"start": trainer.start, "end": end}


def _run_folder_lock(task_dir):
    """Hold `<task_dir>/.lock` for the run: a second run on the same folder (same task and
    path.root) would interleave its checkpoints and metrics with this one's, so it stops."""
    return folder_lock(task_dir, ".lock", "another training run is using this folder",
                       "wait for it to end, or choose another task or path.root")
