"""Where a training run reports: train.log, the console, metrics.jsonl, TensorBoard, a progress bar.

This module owns the run's outputs other than checkpoints and images:
- `setup_logging` sends every logger's INFO records to `<run>/train.log` and to stderr (through
  tqdm so a progress bar stays intact); processes other than rank 0 log warnings only, to stderr;
- `MetricsWriter` appends one JSON object per line to `metrics.jsonl` (training losses at each
  `checkpoint_print`, validation results at each `checkpoint_test`) and mirrors the scalars to
  TensorBoard when the `tensorboard` package is importable (it is optional);
- `progress_bar` is a tqdm bar (iterations/s, loss, ETA) only when stderr is a terminal;
- `forward_shared_logs` lends a script's handlers to the shared modules' loggers (automatic
  tiling, out-of-memory fallback, 16-bit inputs) for as long as the script runs, so the test
  scripts and main_restore show those notes where they show their own.
"""
import json
import logging
import math
import os
import sys

from tqdm import tqdm

from utils.fileio import make_folder

__all__ = ["setup_logging", "MetricsWriter", "progress_bar", "forward_shared_logs",
           "SHARED_LOGGERS", "LOG_FORMAT"]
SHARED_LOGGERS = ("fbcnn.inference", "utils.image")

LOG_FORMAT = "%(asctime)s.%(msecs)03d %(levelname)s %(name)s: %(message)s"
_DATE_FORMAT = "%y-%m-%d %H:%M:%S"


class _TqdmHandler(logging.StreamHandler):
    """A stderr handler that prints above an active tqdm bar instead of through it."""

    def emit(self, record):
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # logging must never crash training
            self.handleError(record)


def setup_logging(log_file=None, is_main=True):
    """Configure the root logger for a run; returns a function that undoes it."""
    root = logging.getLogger()
    previous_level = root.level
    formatter = logging.Formatter(LOG_FORMAT, _DATE_FORMAT)
    handlers = []
    console = _TqdmHandler()
    console.setFormatter(formatter)
    console.setLevel(logging.INFO if is_main else logging.WARNING)
    handlers.append(console)
    if log_file is not None and is_main:
        make_folder(os.path.dirname(os.path.abspath(log_file)))
        file_handler = logging.FileHandler(log_file, encoding="utf-8")
        file_handler.setFormatter(formatter)
        file_handler.setLevel(logging.INFO)
        handlers.append(file_handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(logging.INFO)

    def undo():
        for handler in handlers:
            root.removeHandler(handler)
            handler.close()
        root.setLevel(previous_level)

    return undo


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


class MetricsWriter:
    """Appends records to metrics.jsonl and, if available, scalars to TensorBoard."""

    def __init__(self, jsonl_path, tensorboard_dir=None):
        self.jsonl_path = jsonl_path
        make_folder(os.path.dirname(os.path.abspath(jsonl_path)))
        self._file = open(jsonl_path, "a", encoding="utf-8")
        self.tb = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                logging.getLogger(__name__).info(
                    "TensorBoard logging is off: the tensorboard package is not installed")
            else:
                self.tb = SummaryWriter(tensorboard_dir)

    def write(self, record, scalars=None, step=None):
        """Append `record` as one JSON line; `scalars` ({tag: value}) also go to TensorBoard."""
        self._file.write(json.dumps(_json_safe(record)) + "\n")
        self._file.flush()
        if self.tb is not None and scalars:
            for tag, value in scalars.items():
                if value is not None and math.isfinite(value):
                    self.tb.add_scalar(tag, value, step)

    def close(self):
        self._file.close()
        if self.tb is not None:
            self.tb.close()


def progress_bar(start, total, enabled=True):
    """A tqdm bar from iteration `start` to `total` (None: open-ended), or None when not a TTY."""
    if not enabled or not sys.stderr.isatty():
        return None
    return tqdm(initial=start, total=total, unit="it", dynamic_ncols=True, file=sys.stderr,
                desc="train")


def forward_shared_logs(handlers, level=logging.INFO):
    """Send SHARED_LOGGERS' records at `level` and above to `handlers` (only); returns the
    function that gives the loggers back their defaults (propagating, no handlers)."""
    for name in SHARED_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(level)
        logger.propagate = False
        logger.handlers[:] = list(handlers)

    def undo():
        for name in SHARED_LOGGERS:
            logger = logging.getLogger(name)
            logger.handlers[:] = []
            logger.setLevel(logging.NOTSET)
            logger.propagate = True
    return undo
