"""main_restore.py / runners/restore.py: inputs and outputs (files, folders, globs, reruns,
what is kept, refused or failed alone) and the flags checked before any file."""
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

import runners.restore as cli
from data.jpeg import jpeg_decode, jpeg_encode
from utils import fileio

from tests.restore_cli.restore_support import IDENTITY, read_rgb, run, write_jpeg


def test_files_folders_globs_and_recursive(tmp_path, photo, capsys):
    src = tmp_path / "in"
    (src / "sub" / "deeper").mkdir(parents=True)
    write_jpeg(src / "a.jpg", photo)
    write_jpeg(src / "sub" / "b.jpg", photo[::-1])
    write_jpeg(src / "sub" / "deeper" / "c.jpeg", photo[:, ::-1])
    (src / "notes.txt").write_text("not an image")
    out = tmp_path / "out"

    code, _, _ = run([str(src), "-o", str(out / "flat"), *IDENTITY], capsys)
    assert code == 0 and sorted(os.listdir(out / "flat")) == ["a.png"]

    code, _, _ = run([str(src), "-r", "-o", str(out / "tree"), *IDENTITY], capsys)
    assert code == 0
    assert (out / "tree" / "sub" / "deeper" / "c.png").is_file()
    restored = read_rgb(out / "tree" / "sub" / "b.png")
    np.testing.assert_array_equal(restored, jpeg_decode(jpeg_encode(photo[::-1], 50), 3))

    code, _, _ = run([str(src / "**" / "*.jp*g"), "-r", "-o", str(out / "glob"), *IDENTITY], capsys)
    assert code == 0 and sorted(os.listdir(out / "glob")) == ["a.png", "b.png", "c.png"]

    code, _, err = run([str(src / "*.bmp"), "-o", str(out / "none"), *IDENTITY], capsys)
    assert code == 1 and "no image files match" in err
    assert not (out / "none").exists()  # nothing to write: no output folder either
    code, _, err = run([str(src / "missing.jpg"), "-o", str(out / "none"), *IDENTITY], capsys)
    assert code == 1 and "no such file or folder" in err and not (out / "none").exists()



def test_a_rerun_clears_only_what_a_killed_run_left(tmp_path, photo, capsys):
    """The output folder's own files (dotfiles, notes, other images) survive a rerun; only
    atomic_write's temporaries of a killed run go."""
    write_jpeg(tmp_path / "a.jpg", photo)
    out = tmp_path / "out"
    out.mkdir()
    users = [".DS_Store", "notes.txt", ".notes.tmp-old", "other.png"]
    for name in users:
        (out / name).write_text("the user's")
    stale = os.path.basename(fileio.temporary_name(str(out / "a.png")))
    (out / stale).write_bytes(b"half")
    code, _, _ = run([str(tmp_path / "a.jpg"), "-o", str(out), *IDENTITY], capsys)
    assert code == 0
    assert sorted(os.listdir(out)) == sorted(users + ["a.png"])
    assert all((out / name).read_text() == "the user's" for name in users)



def test_existing_outputs_are_kept_unless_overwrite(tmp_path, photo, capsys):
    write_jpeg(tmp_path / "a.jpg", photo)
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.png").write_bytes(b"precious")
    code, out_text, _ = run([str(tmp_path / "a.jpg"), "-o", str(out), *IDENTITY], capsys)
    assert code == 0 and "skipped" in out_text
    assert (out / "a.png").read_bytes() == b"precious"
    code, _, _ = run([str(tmp_path / "a.jpg"), "-o", str(out), "--overwrite", *IDENTITY], capsys)
    assert code == 0 and cv2.imread(str(out / "a.png")) is not None



def test_rerun_beside_the_inputs_skips_earlier_results(tmp_path, photo, capsys):
    write_jpeg(tmp_path / "x.jpg", photo)
    write_jpeg(tmp_path / "y.jpg", photo[::-1])
    args = [str(tmp_path), "-o", str(tmp_path), "--suffix", "_fbcnn", *IDENTITY]
    assert run(args, capsys)[0] == 0
    code, out, _ = run(args, capsys)
    assert code == 0 and "0 restored, 2 skipped, 0 failed" in out
    assert sorted(os.listdir(tmp_path)) == ["x.jpg", "x_fbcnn.png", "y.jpg", "y_fbcnn.png"]



def test_an_input_is_never_overwritten(tmp_path, photo, capsys):
    cv2.imwrite(str(tmp_path / "a.png"), photo)
    before = (tmp_path / "a.png").read_bytes()
    code, _, err = run([str(tmp_path / "a.png"), "-o", str(tmp_path), "--overwrite", *IDENTITY],
                       capsys)
    assert code == 1 and "is an input file" in err
    assert (tmp_path / "a.png").read_bytes() == before
    code, _, _ = run([str(tmp_path / "a.png"), "-o", str(tmp_path), "--suffix", "_fbcnn",
                      *IDENTITY], capsys)
    assert code == 0 and (tmp_path / "a_fbcnn.png").is_file()



def test_a_broken_file_fails_alone(tmp_path, photo, tiny_models, capsys):
    src = tmp_path / "in"
    src.mkdir()
    write_jpeg(src / "a.jpg", photo)
    (src / "b.jpg").write_bytes(jpeg_encode(photo, 50)[:200])  # truncated
    (src / "c.png").write_bytes(b"")
    cv2.imwrite(str(src / "d.png"), photo)
    out = tmp_path / "out"
    code, _, err = run([str(src), "-o", str(out), "--model", tiny_models["color"]], capsys)
    assert code == 1
    assert sorted(os.listdir(out)) == ["a.png", "d.png"]
    error_lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 2
    assert any("b.jpg" in line for line in error_lines)
    assert any("c.png" in line for line in error_lines)
    assert "2 restored, 0 skipped, 2 failed" in err



def test_a_folder_restored_into_itself_reports_the_file_that_would_be_overwritten(
        tmp_path, photo, capsys):
    folder = tmp_path / "same"
    folder.mkdir()
    cv2.imwrite(str(folder / "shot.png"), photo)
    write_jpeg(folder / "photo.jpg", photo)
    before = (folder / "shot.png").read_bytes()
    code, out, err = run([str(folder), "-o", str(folder), *IDENTITY], capsys)
    assert code == 1 and "shot.png" in err and "is an input file" in err
    assert "1 restored, 0 skipped, 1 failed" in err + out
    assert (folder / "shot.png").read_bytes() == before and (folder / "photo.png").is_file()



def test_an_output_that_appears_meanwhile_is_kept_and_reported(tmp_path, photo, capsys,
                                                               monkeypatch):
    path = write_jpeg(tmp_path / "a.jpg", photo)
    dest = tmp_path / "out" / "a.png"
    real_atomic_write = fileio.atomic_write

    def racing(target, write, **kwargs):  # another process writes the output while we do
        def write_and_race(f):
            write(f)
            dest.write_bytes(b"theirs")
        return real_atomic_write(target, write_and_race, **kwargs)

    monkeypatch.setattr(fileio, "atomic_write", racing)
    code, out, _ = run([str(path), "-o", str(tmp_path / "out"), *IDENTITY], capsys)
    assert code == 0 and "appeared meanwhile" in out and "0 restored, 1 skipped" in out
    assert dest.read_bytes() == b"theirs" and os.listdir(dest.parent) == ["a.png"]



def test_rerun_into_the_input_folder_skips_or_replaces_earlier_results(tmp_path, photo, capsys):
    write_jpeg(tmp_path / "x.jpg", photo)
    before = (tmp_path / "x.jpg").read_bytes()
    args = [str(tmp_path), "-o", str(tmp_path), *IDENTITY]
    assert run(args, capsys)[0] == 0
    code, out, err = run(args, capsys)  # x.png is x.jpg's earlier result, not a new input
    assert (code, err) == (0, "") and "0 restored, 1 skipped, 0 failed" in out
    code, out, err = run([*args, "--overwrite"], capsys)
    assert (code, err) == (0, "") and "1 restored, 0 skipped, 0 failed" in out
    assert sorted(os.listdir(tmp_path)) == ["x.jpg", "x.png"]
    assert (tmp_path / "x.jpg").read_bytes() == before



@pytest.mark.parametrize("recursive", [False, True])
def test_a_folder_that_cannot_be_listed_fails_alone(tmp_path, photo, capsys, monkeypatch,
                                                    recursive):
    top = tmp_path / "top"
    (top / "locked").mkdir(parents=True)
    write_jpeg(top / "a.jpg", photo)
    write_jpeg(tmp_path / "b.jpg", photo)
    locked = str(top if not recursive else top / "locked")
    for name in ("listdir", "scandir"):  # os.walk lists with scandir
        real = getattr(os, name)

        def refuse(path=".", real=real):
            if os.fspath(path) == locked:
                raise PermissionError(13, "Permission denied", os.fspath(path))
            return real(path)
        monkeypatch.setattr(os, name, refuse)
    code, out, err = run([str(top), str(tmp_path / "b.jpg"), "-o", str(tmp_path / "out"),
                          *(["--recursive"] if recursive else []), *IDENTITY], capsys)
    assert code == 1 and f"error: {locked}: cannot list this folder (Permission denied)" in err
    assert "no image files" not in err
    restored = ["a.png", "b.png"] if recursive else ["b.png"]
    assert sorted(os.listdir(tmp_path / "out")) == restored
    assert f"{len(restored)} restored, 0 skipped, 1 failed" in out + err



def test_what_folder_inputs_pass_over_is_one_line(tmp_path, photo, capsys):
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    write_jpeg(folder / "a.jpg", photo)
    write_jpeg(folder / "sub" / "b.jpg", photo)
    (folder / "notes.txt").write_text("x")
    (folder / ".hidden").write_text("x")
    code, out, _ = run([str(folder), "-o", str(folder / "out"), *IDENTITY], capsys)
    assert code == 0  # the output folder inside the input folder is not counted
    assert ("passed over in the input folders: 1 file(s) without an image extension; "
            "1 sub-folder(s) (--recursive descends into them)") in out
    code, out, _ = run([str(folder / "sub"), str(folder / "a.jpg"), str(folder / "notes.txt"),
                        "-o", str(tmp_path / "out2"), "-r", *IDENTITY], capsys)
    assert code == 1  # notes.txt, named, is tried (and fails): never passed over in silence
    assert "passed over" not in out



def test_main_restore_script_exit_status(tmp_path, repo_root, photo):
    write_jpeg(tmp_path / "a.jpg", photo)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff")
    result = subprocess.run(
        [sys.executable, os.path.join(repo_root, "main_restore.py"), str(tmp_path / "a.jpg"),
         str(tmp_path / "broken.jpg"), "-o", str(tmp_path / "out"), *IDENTITY],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "broken.jpg" in result.stderr and (tmp_path / "out" / "a.png").is_file()
    assert not (tmp_path / "out" / "broken.png").exists()



@pytest.mark.parametrize("flags, message", [
    (["--tile", "60"], "argument --tile: 60 is not a multiple of 8"),
    (["--tile", "8"], "argument --tile: 8 is not at least 16"),
    (["--tile-overlap", "12"], "argument --tile-overlap: 12 is not a multiple of 8"),
    (["--tile-cache-gib", "-1"], "argument --tile-cache-gib: -1 is not a finite number >= 0"),
])
def test_tile_flags_off_the_jpeg_grid_are_usage_errors(tmp_path, photo, capsys, flags,
                                                       message):
    path = write_jpeg(tmp_path / "a.jpg", photo)
    with pytest.raises(SystemExit) as exit_:
        cli.main([str(path), "-o", str(tmp_path / "out"), *flags, *IDENTITY])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()



@pytest.mark.parametrize("quality", ["0", "101"])
def test_output_quality_is_a_jpeg_quality(quality, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.build_parser().parse_args(["in.jpg", "-o", str(tmp_path), "--quality", quality])
    assert exit_info.value.code == 2
    assert "--quality" in capsys.readouterr().err



def test_flags_that_do_not_fit_together_stop_before_any_file(tmp_path, photo, capsys):
    path = write_jpeg(tmp_path / "a.jpg", photo)
    code, _, err = run([str(path), "-o", str(tmp_path / "out"), "--tile", "96",
                        "--tile-overlap", "64", *IDENTITY], capsys)
    assert code == 2 and err.startswith("error: --tile-overlap 64: must be at most half the "
                                        "tile (--tile 96, so at most 48)")
    assert not (tmp_path / "out").exists()



def test_options_that_do_nothing_here_are_named(tmp_path, photo, capsys):
    path = write_jpeg(tmp_path / "a.jpg", photo)
    code, _, err = run([str(path), "-o", str(tmp_path / "out"), "--json", str(tmp_path / "q.json"),
                        "--no-network", "--quality", "80", *IDENTITY], capsys)
    assert code == 0
    assert "warning: --json has no effect without --qf-estimate" in err
    assert "warning: --no-network has no effect without --qf-estimate" in err
    assert "warning: --quality has no effect on png output (only jpg and webp)" in err
    assert not (tmp_path / "q.json").exists()
    code, _, err = run([str(path), "-o", str(tmp_path / "jpg"), "--format", "jpg", "--quality",
                        "80", *IDENTITY], capsys)
    assert code == 0 and "has no effect" not in err
    code, _, err = run([str(path), "--qf-estimate", "--no-network", "-o", str(tmp_path / "x"),
                        "--suffix", "_r"], capsys)
    assert code == 0
    assert "warning: -o has no effect with --qf-estimate (nothing is restored)" in err
    assert "warning: --suffix has no effect with --qf-estimate" in err and "--quality" not in err
