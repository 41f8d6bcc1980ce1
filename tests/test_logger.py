"""utils/logger.py: the one logging setup (console through tqdm, split by level, log file) and
its undo, which every script's main must call (a leaked handler duplicates later lines)."""
import io
import logging

from runners import prepare_subimages
from utils.logger import ROOT_LOGGER, TqdmHandler, setup_logging


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
