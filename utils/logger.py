"""How the project logs, and where a training run reports: console, log files, metrics.

This module owns:
- the logger tree: every module logs to `logging.getLogger(f"fbcnn.{__name__}")`, so one
  configuration of the `fbcnn` logger reaches all of them and nothing else's;
- `setup_logging`, the one logging setup of every script: the records go to the console through
  `TqdmHandler` (above a progress bar, never through it), on one stream or split by level, and
  to a log file; it returns the function that undoes it; `rank_logging` quiets the processes
  other than rank 0 of a sharded run;
- `MetricsWriter` appends one JSON object per line to `metrics.jsonl` (losses, validation
  results) and mirrors the scalars to TensorBoard when the package is importable;
- `progress_bar`, a tqdm bar (iterations/s, loss, ETA) only when stderr is a terminal.
"""
import json
import contextlib
import logging
import math
import os
import sys

from tqdm import tqdm

from utils.fileio import make_folder, printable

__all__ = ["ROOT_LOGGER", "LOG_FORMAT", "TqdmHandler", "setup_logging", "rank_logging",
           "MetricsWriter", "progress_bar"]

ROOT_LOGGER = "fbcnn"
LOG_FORMAT = "%(asctime)s.%(msecs)03d %(levelname)s %(name)s: %(message)s"
_DATE_FORMAT = "%y-%m-%d %H:%M:%S"


class _PrintableFormatter(logging.Formatter):
    """File names need not be valid UTF-8: log them escaped, never crash on them."""

    def format(self, record):
        return printable(super().format(record))


class TqdmHandler(logging.StreamHandler):
    """A console handler that writes through `tqdm.write`, above any progress bar. (tqdm's own
    `logging_redirect_tqdm` keeps one console handler per logger and drops the others, so a
    split of info to stdout and warnings to stderr cannot pass through it, and its handler
    does not keep the level of the one it replaces.)"""

    def emit(self, record):
        try:
            tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except Exception:  # logging must never crash the run
            self.handleError(record)


def setup_logging(log_file=None, level=logging.INFO, console_format="%(message)s",
                  file_format=LOG_FORMAT, stream=None, error_stream=None, console=True):
    """Send the `fbcnn` loggers' records at `level` and above to the console and `log_file`.

    The console is `stream` (default stderr; none when `console` is false); with
    `error_stream`, records at WARNING and above go there instead. `log_file` (appended, its
    folder created) gets every record at `level` and above in `file_format`. Returns the
    function that removes these handlers again.
    """
    logger = logging.getLogger(ROOT_LOGGER)
    saved = (logger.level, list(logger.handlers))
    stream = sys.stderr if stream is None else stream
    if not console:
        consoles = []
    elif error_stream is None:
        consoles = [(stream, None)]
    else:
        consoles = [(stream, lambda record: record.levelno < logging.WARNING),
                    (error_stream, lambda record: record.levelno >= logging.WARNING)]
    handlers = []
    for target, keep in consoles:
        handler = TqdmHandler(target)
        handler.setFormatter(_PrintableFormatter(console_format, _DATE_FORMAT))
        if keep is not None:
            handler.addFilter(keep)
        handlers.append(handler)
    if log_file is not None:
        make_folder(os.path.dirname(os.path.abspath(log_file)))
        to_file = logging.FileHandler(log_file, encoding="utf-8")
        to_file.setFormatter(_PrintableFormatter(file_format, _DATE_FORMAT))
        handlers.append(to_file)
    logger.handlers[:] = handlers
    logger.setLevel(level)  # the records still propagate: to pytest's caplog, or an embedding
    # application's own handlers (the scripts leave the root logger without handlers)

    def undo():
        for handler in handlers:
            handler.close()
        logger.setLevel(saved[0])
        logger.handlers[:] = saved[1]

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
                logging.getLogger(f"{ROOT_LOGGER}.{__name__}").info(
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


@contextlib.contextmanager
def rank_logging(is_main):
    """Within the block, a process other than rank 0 of a sharded run says only warnings and
    errors (its own files' failures); rank 0 says everything, the summary for all included."""
    root = logging.getLogger("fbcnn")
    saved = root.level
    if not is_main:
        root.setLevel(max(saved, logging.WARNING))
    try:
        yield
    finally:
        root.setLevel(saved)
