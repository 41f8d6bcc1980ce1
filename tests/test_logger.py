"""utils/logger.py: the one logging setup (console through tqdm, split by level, log file) and
its undo, which every script's main must call (a leaked handler duplicates later lines); and
MetricsWriter's metrics.jsonl and TensorBoard events, read back with TensorBoard's own reader."""
import io
import json
import logging
import math

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from runners import prepare_subimages
from utils.logger import ROOT_LOGGER, MetricsWriter, TqdmHandler, setup_logging


def test_records_go_to_their_stream_and_file_and_undo_restores(tmp_path):
    out, err = io.StringIO(), io.StringIO()
    root = logging.getLogger(ROOT_LOGGER)
    before = list(root.handlers)
    undo = setup_logging(tmp_path / "logs" / "run.log", stream=out, error_stream=err,
                         file_format="%(levelname)s %(message)s")
    try:
        assert all(isinstance(h, (TqdmHandler, logging.FileHandler)) for h in root.handlers)
        log = logging.getLogger(f"{ROOT_LOGGER}.models.inference")  # any module below fbcnn
        log.info("note \udcff")  # a file name that is not UTF-8 is escaped, not a crash
        log.warning("careful")
        logging.getLogger("elsewhere").warning("not ours")
    finally:
        undo()
    assert out.getvalue() == "note \\xff\n" and err.getvalue() == "careful\n"
    assert (tmp_path / "logs" / "run.log").read_text() == "INFO note \\xff\nWARNING careful\n"
    assert root.handlers == before


def test_a_tool_leaves_no_handler_behind(tmp_path):
    root = logging.getLogger(ROOT_LOGGER)
    before = list(root.handlers)
    (tmp_path / "src").mkdir()
    assert prepare_subimages.main([str(tmp_path / "src"), str(tmp_path / "dst")]) == 2  # empty
    assert root.handlers == before


def read_tensorboard(folder):
    """{tag: [(step, value), ...]} of every scalar in the event files of `folder`."""
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})  # 0: keep them all
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)]
            for tag in events.Tags()["scalars"]}


def test_scalars_reach_tensorboard_and_records_reach_the_jsonl(tmp_path):
    writer = MetricsWriter(str(tmp_path / "metrics.jsonl"), str(tmp_path / "tb"))
    assert writer.tb is not None  # tensorboard is a requirement
    writer.write({"kind": "train", "iter": 1, "loss": 0.25},
                 {"train/loss": 0.25, "train/QF_loss": None}, 1)
    writer.write({"kind": "train", "iter": 2, "loss": math.nan},
                 {"train/loss": math.nan, "train/lr": 2e-5}, 2)
    writer.write({"kind": "test", "iter": 2}, {"test/psnr": 27.5}, 2)
    writer.close()
    scalars = read_tensorboard(tmp_path / "tb")
    assert scalars == {"train/loss": [(1, 0.25)], "train/lr": [(2, pytest.approx(2e-5))],
                       "test/psnr": [(2, 27.5)]}  # None and NaN are left out
    with open(tmp_path / "metrics.jsonl", encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    assert records == [{"kind": "train", "iter": 1, "loss": 0.25},
                       {"kind": "train", "iter": 2, "loss": None}, {"kind": "test", "iter": 2}]
