"""FBCNN's JPEG datasets: one class, with the original dataset names as presets.

This module owns how training patches and validation images are made from clean images:
- `DatasetJPEG` reads clean (H) images and JPEG-compresses them on the fly with `data.jpeg`
  (the test runner's functions), colour or gray, single or double JPEG; bad files are found
  from their headers before training starts (one error naming the first), and a file that
  fails to decode later costs one image, not the run;
- `DATASET_PRESETS` maps the option names `jpeg`, `jpeggray`, `jpeggraydouble` (the original's
  three datasets) and `jpegdouble` (colour, double JPEG) to their `Degradation`;
- `IterationBatchSampler` decides which images and which seed each sample of each iteration
  gets, and whether the iteration is double JPEG (one draw per iteration, shared by all
  processes of a distributed run).
Every random draw of a sample comes from a Generator seeded with `(seed, position)`, its place
in the run's stream of samples: a sample is a pure function of the seed and the iteration,
whatever the loader workers, the number of processes, or where a run was resumed.
"""
import logging
import math
import os
from collections import namedtuple
from dataclasses import dataclass, replace

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from data.graphics import graphic
from data.jpeg import augment_img, crop, jpeg, qf_to_label, random_crop, random_offset, sample_qf
from utils.errors import UserError
from utils.fileio import display_path
from utils.image import IMG_EXTENSIONS, ImageReadError, imread_uint, read_image_header, rgb2y_matlab

__all__ = ["Degradation", "DATASET_PRESETS", "DEGRADATION_OPTIONS", "dataset_preset",
           "dataset_channels", "SampleKey",
           "DatasetJPEG", "IterationBatchSampler", "define_dataset", "list_images_recursive",
           "rgb_to_training_gray", "uint8_to_chw", "worker_init_fn"]

logger = logging.getLogger(f"fbcnn.{__name__}")

_DECADES_60 = (10, 20, 30, 40, 50, 60)
_DECADES_70 = (10, 20, 30, 40, 50, 60, 70)


@dataclass(frozen=True)
class Degradation:
    """How a clean patch becomes a training pair (as the original's datasets make it).

    First JPEG: QF uniform in `qf_range` with probability `qf_uniform_prob`, else from
    `qf_choices`; with probability `identity_prob` a single-JPEG sample is not compressed at all
    (input = target, label QF 100: what teaches a network to leave a clean image alone; 0 in
    every preset, as the original). Double JPEG (iterations drawn with `double_prob`): a second
    JPEG after an offset in [0, `max_shift`], its QF drawn the same way from the `double_qf_*`
    fields. Gray presets
    convert RGB patches with the MATLAB Y channel (probability `y_prob`) or OpenCV's RGB->GRAY.
    The final P x P crop is at offset 0, or (probability `shift_prob`) at a random offset in
    [0, side - P] of the patch at hand: [0, 8] for single and double JPEG alike, except for a
    single-JPEG sample of a double type, whose (P+16)-pixel patch allows [0, 16].
    `samplings`: the chroma samplings of colour JPEGs (`data.jpeg.SAMPLINGS` keys), one drawn
    uniformly per JPEG; empty (every preset): OpenCV's 4:2:0, and no draw is made.
    `scale_range` (lo, hi), 0 < lo <= hi <= 1: the clean crop is a window 1/s times as large,
    s uniform in it (capped by the image), shrunk to the crop by area averaging: new content at
    coarser scales from few images; empty (every preset): no draw, the original's crops.
    `graphics_prob`: the share of clean patches replaced by a graphic made from them
    (`data.graphics`: dithers, posterized images, lines, stripes, text); 0 (every preset): no
    draw, photographs only.
    """
    gray: bool
    qf_range: tuple
    qf_choices: tuple
    qf_uniform_prob: float = 0.25
    identity_prob: float = 0.0
    double_prob: float = 0.0
    double_qf_range: tuple = (5, 95)
    double_qf_choices: tuple = _DECADES_70
    double_qf_uniform_prob: float = 0.5
    y_prob: float = 0.75
    shift_prob: float = 0.5
    max_shift: int = 8
    samplings: tuple = ()
    scale_range: tuple = ()
    graphics_prob: float = 0.0

    @property
    def double(self):
        """Whether some iterations are double JPEG (the crop is then P+16 instead of P+8)."""
        return self.double_prob > 0


DATASET_PRESETS = {
    "jpeg": Degradation(gray=False, qf_range=(8, 96), qf_choices=_DECADES_60),
    "jpeggray": Degradation(gray=True, qf_range=(5, 95), qf_choices=_DECADES_60),
    "jpeggraydouble": Degradation(gray=True, qf_range=(5, 95), qf_choices=_DECADES_70,
                                  double_prob=0.5),
    "jpegdouble": Degradation(gray=False, qf_range=(5, 95), qf_choices=_DECADES_70,
                              double_prob=0.5),
}

# the fields of a preset that `datasets.train` may override (null keeps the preset's)
DEGRADATION_OPTIONS = ("qf_range", "qf_uniform_prob", "identity_prob", "double_prob",
                       "samplings", "scale_range", "graphics_prob")


def dataset_preset(name):
    """The Degradation of a `dataset_type` name; UserError listing the known names."""
    if name not in DATASET_PRESETS:
        raise UserError(f"dataset_type {name!r} is unknown; known: {', '.join(DATASET_PRESETS)}")
    return DATASET_PRESETS[name]


def dataset_channels(name):
    """Channels of the patches a dataset type yields (1 for the gray presets)."""
    return 1 if dataset_preset(name).gray else 3


SampleKey = namedtuple("SampleKey", "index position double")
SampleKey.__doc__ = ("What the sampler hands the dataset: image `index`, the sample's `position` "
                     "in the global sample stream (its seed), and whether it is double JPEG.")


def list_images_recursive(folder):
    """Sorted paths of all image files below `folder`."""
    paths = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs.sort()
        paths.extend(os.path.join(root, f) for f in sorted(files)
                     if f.lower().endswith(IMG_EXTENSIONS))
    return paths


def rgb_to_training_gray(img, rng, y_prob=0.75):
    """Gray version of an RGB patch: MATLAB-style Y with probability `y_prob`, else OpenCV's."""
    if rng.random() < y_prob:
        return rgb2y_matlab(img)
    return cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_RGB2GRAY)


def _sampling(rng, degradation):
    """A chroma sampling drawn from `degradation.samplings`; None (no draw) when it is empty,
    so the presets' random streams stay as they were."""
    if not degradation.samplings or degradation.gray:
        return None
    return degradation.samplings[int(rng.integers(len(degradation.samplings)))]


def uint8_to_chw(img):
    """uint8 HxW or HxWxC array -> uint8 tensor (C, H, W); it becomes float on the device."""
    if img.ndim == 2:
        img = img[:, :, None]
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))


def worker_init_fn(worker_id):
    """Loader workers: keep OpenCV single-threaded (the loader's processes are the parallelism)."""
    cv2.setNumThreads(0)


class DatasetJPEG(Dataset):
    """Pairs (L = JPEG of H, H) with the QF label `(100 - QF) / 100` (NaN after double JPEG).

    `phase="train"`: random P x P patches degraded as `degradation` says; items are indexed by
    `SampleKey` (from `IterationBatchSampler`) or by a plain image index (the seed position is
    then the index). `phase="test"`: whole images read with `n_channels` channels and compressed
    once at `qf`. Items are dicts with uint8 (C, H, W) tensors `L` and `H`, float `qf` of shape
    (1,), and `H_path`.
    """

    def __init__(self, dataroot_H, degradation, phase="train", patch_size=96, n_channels=3,
                 seed=0, qf=10, cache="none", progress=False):
        if phase not in ("train", "test"):
            raise ValueError(f"phase must be 'train' or 'test', got {phase!r}")
        self.dataroot_H, self.degradation, self.phase = dataroot_H, degradation, phase
        self.patch_size, self.n_channels, self.seed, self.qf = patch_size, n_channels, seed, qf
        self.paths_H = list_images_recursive(dataroot_H)
        if not self.paths_H:
            raise UserError(f"{dataroot_H}: no images found (extensions: "
                            f"{', '.join(IMG_EXTENSIONS)})")
        self.crop_size = patch_size + (16 if degradation.double else 8)
        self._check_headers(progress)
        self._reported = set()
        self.images = None
        if cache == "memory":
            self.images = [imread_uint(p, n_channels) for p in
                           tqdm(self.paths_H, desc="caching images", disable=not progress or None)]

    def __len__(self):
        return len(self.paths_H)

    def _small_message(self, path, h, w):
        return (f"{display_path(path)}: {h}x{w} pixels is smaller than the {self.crop_size}x"
                f"{self.crop_size} crop that H_size {self.patch_size} needs")

    def _check_headers(self, progress):
        """Refuse the set, naming the first bad file, if a header is unusable (train: too small)."""
        problems = []
        for path in tqdm(self.paths_H, desc="checking image headers", unit="img",
                         disable=not progress or None):
            try:
                header = read_image_header(path)
            except ImageReadError as exc:
                problems.append(str(exc))
                continue
            if self.phase == "train" and min(header.width, header.height) < self.crop_size:
                problems.append(self._small_message(path, header.height, header.width))
        for problem in problems[1:11]:  # the first ten; the error below gives the count
            logger.warning("%s", problem)
        if problems:
            more = "" if len(problems) == 1 else (f" ({len(problems) - 1} more of the "
                                                  f"{len(self.paths_H)} files have problems; "
                                                  f"see the log)")
            raise UserError(f"{problems[0]}{more}")

    def _read(self, index):
        if self.images is not None:
            return self.images[index]
        return imread_uint(self.paths_H[index], self.n_channels)

    def _read_or_substitute(self, index):
        """(image, index read): the image, or the next readable one if it fails to decode."""
        for step in range(len(self.paths_H)):
            candidate = (index + step) % len(self.paths_H)
            try:
                return self._read(candidate), candidate
            except ImageReadError as exc:
                if candidate not in self._reported:
                    self._reported.add(candidate)
                    logger.warning("%s; training uses the next readable image in its place", exc)
        raise UserError(f"{self.dataroot_H}: none of the {len(self.paths_H)} images can be read")

    def __getitem__(self, key):
        if self.phase == "test":
            return self._test_item(int(key))
        if not isinstance(key, SampleKey):
            index = int(key)
            rng = self._rng(index)
            double = self.degradation.double and rng.random() < self.degradation.double_prob
            key = SampleKey(index, index, double)
        return self._train_item(key)

    def _rng(self, position):
        return np.random.default_rng(np.random.SeedSequence([self.seed, position]))

    def _test_item(self, index):
        img_H = self._read(index)
        img_L = jpeg(img_H, self.qf)
        return {"L": uint8_to_chw(img_L), "H": uint8_to_chw(img_H),
                "qf": torch.tensor([qf_to_label(self.qf)], dtype=torch.float32),
                "H_path": self.paths_H[index]}

    def _clean_crop(self, img, rng):
        """The clean crop_size window, taken from a 1/s larger one when `scale_range` is set."""
        if not self.degradation.scale_range:
            return random_crop(img, self.crop_size, rng)
        s = rng.uniform(*self.degradation.scale_range)
        side = min(int(round(self.crop_size / s)), *img.shape[:2])
        window = random_crop(img, side, rng)
        if side == self.crop_size:
            return window
        return cv2.resize(window, (self.crop_size, self.crop_size), interpolation=cv2.INTER_AREA)

    def _train_item(self, key):
        deg, size = self.degradation, self.patch_size
        rng = self._rng(key.position)
        img, index = self._read_or_substitute(key.index)
        h, w = img.shape[:2]
        if h < self.crop_size or w < self.crop_size:
            raise UserError(self._small_message(self.paths_H[index], h, w))
        patch_H = augment_img(self._clean_crop(img, rng), int(rng.integers(8)))
        # drawn only when asked for, as the identity below: faithful runs keep their streams
        if deg.graphics_prob > 0 and rng.random() < deg.graphics_prob:
            patch_H = graphic(patch_H, rng)
        if deg.gray and patch_H.ndim == 3:
            patch_H = rgb_to_training_gray(patch_H, rng, deg.y_prob)
        if not key.double and deg.identity_prob > 0 and rng.random() < deg.identity_prob:
            patch_L, label = patch_H, qf_to_label(100)
        else:
            qf = sample_qf(rng, deg.qf_range, deg.qf_choices, deg.qf_uniform_prob)
            patch_L = jpeg(patch_H, qf, _sampling(rng, deg))
            label = qf_to_label(qf)
        if key.double:
            top, left = random_offset(rng, deg.max_shift)
            patch_H = crop(patch_H, top, left, size + 8)
            patch_L = crop(patch_L, top, left, size + 8)
            qf2 = sample_qf(rng, deg.double_qf_range, deg.double_qf_choices,
                            deg.double_qf_uniform_prob)
            patch_L = jpeg(np.ascontiguousarray(patch_L), qf2, _sampling(rng, deg))
            label = math.nan
        # the final crop's offset spans what the patch at hand leaves: [0, 8] after a double
        # JPEG, [0, 16] for a single-JPEG sample of a double type, whose patch is still P+16
        # (the original's randint(0, H - patch_size), data/dataset_jpeggraydouble.py)
        side = patch_L.shape[0] - size
        top, left = random_offset(rng, side) if rng.random() < deg.shift_prob else (0, 0)
        return {"L": uint8_to_chw(crop(patch_L, top, left, size)),
                "H": uint8_to_chw(crop(patch_H, top, left, size)),
                "qf": torch.tensor([label], dtype=torch.float32),
                "H_path": self.paths_H[index]}


class IterationBatchSampler:
    """Infinite batch sampler whose batch for iteration t depends only on (seed, t, rank).

    The run's samples form one global stream: iteration t (1-based) takes positions
    `(t-1)*global_batch ... t*global_batch - 1`, and process `rank` takes its contiguous share.
    Position p visits image `perm_e[p % n]` of epoch `e = p // n` (a seeded permutation per epoch
    when shuffling). Whether iteration t is double JPEG is one seeded draw per iteration, so every
    process agrees. Iteration starts at `start_iter`, which is how a resumed run continues.
    """

    def __init__(self, n_items, global_batch, rank=0, world_size=1, seed=0, shuffle=True,
                 double_prob=0.0, start_iter=1):
        if global_batch % world_size:
            raise ValueError(f"batch size {global_batch} is not divisible by {world_size} "
                             f"processes")
        self.n_items, self.global_batch, self.rank = n_items, global_batch, rank
        self.local_batch = global_batch // world_size
        self.seed, self.shuffle, self.double_prob = seed, shuffle, double_prob
        self.start_iter = start_iter
        self._perms = {}

    def _permutation(self, epoch):
        if epoch not in self._perms:
            if len(self._perms) > 1:
                self._perms.pop(min(self._perms))
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch, 1]))
            self._perms[epoch] = (rng.permutation(self.n_items) if self.shuffle
                                  else np.arange(self.n_items))
        return self._perms[epoch]

    def is_double(self, iteration):
        """Whether every sample of `iteration` is double JPEG."""
        if self.double_prob <= 0:
            return False
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, iteration, 2]))
        return bool(rng.random() < self.double_prob)

    def epoch(self, iteration):
        """The epoch the first sample of `iteration` belongs to (0-based)."""
        return (iteration - 1) * self.global_batch // self.n_items

    def batch(self, iteration):
        """The SampleKeys of this process for `iteration`."""
        double = self.is_double(iteration)
        first = (iteration - 1) * self.global_batch + self.rank * self.local_batch
        keys = []
        for position in range(first, first + self.local_batch):
            epoch, offset = divmod(position, self.n_items)
            keys.append(SampleKey(int(self._permutation(epoch)[offset]), position, double))
        return keys

    def __iter__(self):
        iteration = self.start_iter
        while True:
            yield self.batch(iteration)
            iteration += 1


def define_dataset(dataset_opt, phase, n_channels, seed=0, progress=False):
    """Build a DatasetJPEG from a validated `datasets.train`/`datasets.test` options entry.

    For the test phase `n_channels` is the network's input channel count, whatever the entry's
    dataset type says (the original's gray configs name the colour `jpeg` type for their test set).
    """
    degradation = dataset_preset(dataset_opt["dataset_type"])
    if phase == "train":
        degradation = replace(degradation, **{
            field: tuple(value) if isinstance(value, list) else value
            for field, value in ((f, dataset_opt.get(f)) for f in DEGRADATION_OPTIONS)
            if value is not None})
    if phase == "test":
        return DatasetJPEG(dataset_opt["dataroot_H"], degradation, phase="test",
                           n_channels=n_channels, qf=dataset_opt["qf"])
    return DatasetJPEG(dataset_opt["dataroot_H"], degradation, phase="train",
                       patch_size=dataset_opt["H_size"], n_channels=n_channels, seed=seed,
                       cache=dataset_opt["cache"], progress=progress)
