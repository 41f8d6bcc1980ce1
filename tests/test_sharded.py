"""Sharded runs under torchrun (two CPU processes over gloo): main_restore gives, file for file
and byte for byte, what one process gives; a run killed midway is finished by a rerun; an
output folder another run is writing is refused."""
import json
import os
import socket
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import runners.restore as cli
from runners import restore_io
from data.jpeg import jpeg_encode
from models.network_fbcnn import FBCNN
from utils import REPO_ROOT
from utils.fileio import folder_lock, is_temporary_name

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
            "2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO_ROOT}
MAIN = os.path.join(REPO_ROOT, "main_restore.py")

# main_restore with the second process of a two-process run killed (SIGKILL-like, os._exit)
# in the middle of writing its second output: its temporary file is left half written
_DYING = """
import os, sys
import runners.restore as r
from utils.fileio import temporary_name
real, calls = r.atomic_write_bytes, []
def dying(path, data, **kwargs):
    calls.append(path)
    if os.environ.get("RANK") == "1" and len(calls) == 2:
        with open(temporary_name(path), "wb") as f:
            f.write(data[:len(data) // 2])
        os._exit(9)
    return real(path, data, **kwargs)
r.atomic_write_bytes = dying
sys.exit(r.main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    paths = []
    for n in (3, 1):
        torch.manual_seed(n)
        path = folder / f"tiny{n}.safetensors"
        save_file(FBCNN(in_nc=n, out_nc=n, nc=[8, 16, 32, 64], nb=1).state_dict(), str(path))
        paths += ["--model" if n == 3 else "--gray-model", str(path)]
    return paths


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, testsets_dir):
    """Seven JPEGs of several sizes and qualities, colour and gray, and one broken file."""
    folder = tmp_path_factory.mktemp("inputs")
    img = cv2.imread(os.path.join(testsets_dir, "LIVE1_color", "monarch.png"))[:, :, ::-1]
    for i in range(7):
        crop = np.ascontiguousarray(img[20 * i:20 * i + 72 + 8 * i, 16 * i:16 * i + 96])
        if i % 3 == 2:
            crop = np.ascontiguousarray(cv2.cvtColor(crop, cv2.COLOR_RGB2GRAY))
        (folder / f"img{i}.jpg").write_bytes(jpeg_encode(crop, 15 + 10 * i))
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    return str(folder)


def _torchrun(argv, script=MAIN):
    return subprocess.run([*TORCHRUN, script, *argv], env=ENV, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)


def _files(folder):
    return {name: open(os.path.join(folder, name), "rb").read()
            for name in sorted(os.listdir(folder))}


def test_two_processes_restore_a_folder_byte_for_byte_as_one(inputs, models, tmp_path, capsys):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    assert cli.main([inputs, "-o", one, *models, "--device", "cpu"]) == 1  # broken.jpg fails
    capsys.readouterr()
    proc = _torchrun([inputs, "-o", two, *models, "--device", "cpu"])
    assert proc.returncode == 1, proc.stderr[-3000:]  # rank 0's status: one file failed
    assert proc.stdout.count(" restored, ") + proc.stderr.count(" restored, ") == 1
    assert "7 restored, 0 skipped, 1 failed" in proc.stderr and "by 2 processes" in proc.stderr
    assert "failed: " in proc.stderr and "broken.jpg" in proc.stderr
    assert _files(one) == _files(two) and len(_files(two)) == 7  # no lock or temporary left
    # rank 0 says every file's line, the other process's included
    said = [f"img{i}.jpg -> " for i in range(7)]
    assert all(proc.stdout.count(line) == 1 for line in said), proc.stdout[-3000:]

    single, merged = tmp_path / "one.json", tmp_path / "two.json"
    assert cli.main([inputs, "--qf-estimate", "--json", str(single), *models,
                     "--device", "cpu"]) == 1
    proc = _torchrun([inputs, "--qf-estimate", "--json", str(merged), *models, "--device", "cpu"])
    assert proc.returncode == 1, proc.stderr[-3000:]
    rows = json.loads(merged.read_text())
    assert rows == json.loads(single.read_text()) and len(rows) == 7
    assert [os.path.basename(r["file"]) for r in rows] == [f"img{i}.jpg" for i in range(7)]


def test_a_run_killed_midway_is_finished_by_a_rerun(inputs, models, tmp_path, capsys):
    reference, out = str(tmp_path / "reference"), str(tmp_path / "out")
    cli.main([inputs, "-o", reference, *models, "--device", "cpu"])
    script = tmp_path / "dying.py"
    script.write_text(_DYING)
    proc = _torchrun([inputs, "-o", out, *models, "--device", "cpu"], script=str(script))
    assert proc.returncode != 0
    left = sorted(os.listdir(out))
    assert any(is_temporary_name(name) for name in left)  # the half-written file, as a kill
    finished = [name for name in left if name.endswith(".png")]
    assert 0 < len(finished) < 7
    capsys.readouterr()
    assert cli.main([inputs, "-o", out, *models, "--device", "cpu"]) == 1
    summary = capsys.readouterr().err
    assert f"{7 - len(finished)} restored, {len(finished)} skipped, 1 failed" in summary
    assert _files(out) == _files(reference)  # the temporary file is gone, the rest is done


def test_an_output_folder_another_run_is_writing_is_refused(inputs, models, tmp_path, capsys):
    out = tmp_path / "out"
    with folder_lock(str(out), restore_io.LOCK_NAME, "busy", "wait"):
        assert cli.main([inputs, "-o", str(out), *models, "--device", "cpu"]) == 2
        err = capsys.readouterr().err
        assert "another main_restore run is writing this folder (pid" in err
        assert "choose another -o" in err
        assert sorted(os.listdir(out)) == [restore_io.LOCK_NAME]  # nothing written
    assert cli.main([inputs, "-o", str(out), *models, "--device", "cpu"]) == 1
    assert len(os.listdir(out)) == 7  # the lock is gone with the run that held it


def _log_lines(path):
    """The log's messages, without their time stamps."""
    return [line.split(" ", 3)[3] for line in open(path, encoding="utf-8").read().splitlines()]


def test_a_sharded_test_script_prints_logs_and_writes_what_one_process_does(models, tmp_path,
                                                                            testsets_dir):
    folder = tmp_path / "set"
    folder.mkdir()
    img = cv2.imread(os.path.join(testsets_dir, "LIVE1_color", "bikes.png"))
    for i in range(5):
        cv2.imwrite(str(folder / f"im{i}.png"), img[40 * i:40 * i + 64 + 8 * i, 48 * i:48 * i + 96])
    script = os.path.join(REPO_ROOT, "main_test_fbcnn_color.py")
    common = ["--model", models[1], "--testset", str(folder), "--qf", "10", "30", "--device",
              "cpu"]
    one = subprocess.run([sys.executable, script, *common, "--results", str(tmp_path / "one"),
                          "--json", str(tmp_path / "one.json")], env=ENV, cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = _torchrun([*common, "--results", str(tmp_path / "two"), "--json",
                     str(tmp_path / "two.json")], script=script)
    assert two.returncode == 0, two.stderr[-3000:]
    averages = [line for line in one.stdout.splitlines() if line.startswith("Average")]
    assert len(averages) == 2
    assert [line for line in two.stdout.splitlines() if line.startswith("Average")] == averages
    assert json.loads((tmp_path / "two.json").read_text()) == json.loads(
        (tmp_path / "one.json").read_text())
    log = "set_tiny3.log"
    lines = _log_lines(tmp_path / "two" / log)  # written once, the same lines in the same order
    assert [line.replace("two.json", "one.json") for line in lines] == _log_lines(
        tmp_path / "one" / log)
    assert len(lines) == 1 + 2 * (1 + 5 + 1) + 1  # model; per setting: header, images, average
    for setting in ("set_tiny3_qf10", "set_tiny3_qf30"):
        assert _files(tmp_path / "two" / setting) == _files(tmp_path / "one" / setting)


def test_srun_launches_shard_as_torchrun_does(inputs, models, tmp_path, capsys, monkeypatch):
    """Two processes started as srun starts them (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID;
    MASTER_ADDR and MASTER_PORT exported by the job script) restore the folder as one process;
    without MASTER_ADDR the run stops at once, saying what to export."""
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    cli.main([inputs, "-o", one, *models, "--device", "cpu"])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in ENV.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    procs = [subprocess.Popen([sys.executable, MAIN, inputs, "-o", two, *models, "--device",
                               "cpu"], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env={**env, "SLURM_NTASKS": "2", "SLURM_PROCID": str(rank),
                                   "SLURM_LOCALID": str(rank), "SLURM_NTASKS_PER_NODE": "2",
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
             for rank in (0, 1)]
    outputs = [proc.communicate(timeout=300) for proc in procs]
    assert [proc.returncode for proc in procs] == [1, 0], outputs[0][1][-3000:]
    assert "7 restored, 0 skipped, 1 failed" in outputs[0][1] and "by 2 processes" in outputs[0][1]
    assert _files(one) == _files(two)
    capsys.readouterr()
    for name in ("WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_PROCID", "0")
    assert cli.main([inputs, "-o", str(tmp_path / "x"), *models, "--device", "cpu"]) == 2
    assert "MASTER_ADDR and MASTER_PORT not set" in capsys.readouterr().err
