"""utils/fileio.py: what a rerun may delete is only what an interrupted write left."""
import os

import pytest

from utils.fileio import (atomic_write_bytes, is_temporary_name, remove_stale_temporaries,
                          temporary_name)

USERS_FILES = [".DS_Store", ".notes", "notes.txt", ".config.tmp-old", "a.tmp-1-2", ".b.tmp-",
               ".c.tmp-12", ".d.tmp-1-2-backup", "photo.png", ".hidden.png"]


def test_only_atomic_writes_temporaries_are_temporary(tmp_path):
    made = os.path.basename(temporary_name(str(tmp_path / "photo.png")))
    assert is_temporary_name(made)
    assert is_temporary_name(".x.png.tmp-12-34")
    for name in USERS_FILES:
        assert not is_temporary_name(name), name


def test_clearing_temporaries_leaves_every_file_it_did_not_write(tmp_path):
    for name in USERS_FILES:
        (tmp_path / name).write_text("the user's")
    stale = [os.path.basename(temporary_name(str(tmp_path / n))) for n in ("a.png", "b.png")]
    for name in stale:
        (tmp_path / name).write_bytes(b"half")
    assert remove_stale_temporaries(str(tmp_path)) == sorted(stale)
    assert sorted(os.listdir(tmp_path)) == sorted(USERS_FILES)
    assert all((tmp_path / n).read_text() == "the user's" for n in USERS_FILES)


def test_an_atomic_write_leaves_no_temporary(tmp_path):
    atomic_write_bytes(str(tmp_path / "out.png"), b"data", fsync=False)
    assert os.listdir(tmp_path) == ["out.png"]
    with pytest.raises(FileExistsError):
        atomic_write_bytes(str(tmp_path / "out.png"), b"other", fsync=False, replace=False)
    assert (tmp_path / "out.png").read_bytes() == b"data"
    assert os.listdir(tmp_path) == ["out.png"]
