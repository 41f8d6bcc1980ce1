"""Tests of a training run stopped from outside (main_train_fbcnn.py in a subprocess, the tiny
run of tests/train_support.py): SIGKILL while a checkpoint is moved into place, SIGTERM during
a step, a save or a validation, and the resume that follows."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from models.model_fbcnn import ModelFBCNN
from models.model_zoo import (load_state_dict_file)
from utils import checkpoint as ckpt

from tests.train_support import MAIN, ROOT, SUBPROCESS_ENV, run_log, run_losses, run_tiny, wait_for

pytestmark = pytest.mark.usefixtures("one_thread")


# Runs main_train_fbcnn.py with os.replace patched to block before moving argv[1] into place,
# so the test can SIGKILL the process in the middle of a checkpoint (no hook in the product).
_PAUSE_BEFORE_REPLACE = """
import os, sys, time
real_replace = os.replace
def replace(src, dst, *args, **kwargs):
    if os.path.basename(os.fsdecode(dst)) == PAUSE_AT:
        sys.stderr.write("PAUSED before moving %s into place\\n" % os.fsdecode(dst))
        sys.stderr.flush()
        while True:
            time.sleep(1)
    return real_replace(src, dst, *args, **kwargs)
PAUSE_AT = sys.argv.pop(1)
os.replace = replace
import main_train_fbcnn
sys.exit(main_train_fbcnn.main(sys.argv[1:]))
"""


def test_sigkill_while_saving_resumes_from_last_complete_checkpoint(option_file, tmp_path):
    opt_args = ["-opt", option_file, "--set", f"path.root={tmp_path}",
                "--set", "train.manual_seed=null", "--set", "datasets.test=null"]
    run_dir = os.path.join(tmp_path, "tiny")
    models = os.path.join(run_dir, "models")
    err_path = tmp_path / "first.err"
    with open(err_path, "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", _PAUSE_BEFORE_REPLACE, "4_state.pth",
                                 *opt_args], env=SUBPROCESS_ENV, cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=err)
        try:
            paused = wait_for(lambda: "PAUSED before moving" in err_path.read_text(), 180, proc)
            assert paused, err_path.read_text()[-3000:]
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert os.path.isfile(os.path.join(models, "4_G.safetensors"))  # in place, but no marker
    assert not os.path.exists(os.path.join(models, "4_state.pth"))
    assert any(n.startswith(".4_state.pth.tmp-") for n in os.listdir(models))
    assert ckpt.latest_checkpoint(models) == 2

    result = subprocess.run([sys.executable, MAIN, *opt_args], env=SUBPROCESS_ENV, cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    log = run_log(run_dir)
    assert "resuming from iteration 2" in log and "removed 1 temporary file" in log
    assert ckpt.complete_checkpoints(models) == [2, 4, 6]
    assert not [n for n in os.listdir(models) if ".tmp-" in n]
    losses = run_losses(run_dir)
    assert [i for i, _ in losses] == [1, 2, 3, 4, 3, 4, 5, 6]
    assert losses[2:4] == losses[4:6]  # redone iterations repeat exactly, with the stored seed


def test_sigterm_saves_the_iteration_reached_and_the_resumed_run_goes_on_as_uninterrupted(
        option_file, reference_run, tmp_path, monkeypatch):
    """SIGTERM during iteration 3 (checkpoint_save is 2): the run finishes the iteration, saves
    it and stops; the next start resumes from 3 and its losses and weights are the
    uninterrupted run's."""
    real = ModelFBCNN.optimize_parameters

    def signalled_in_3(self, step):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, step)

    monkeypatch.setattr(ModelFBCNN, "optimize_parameters", signalled_in_3)
    with pytest.raises(KeyboardInterrupt):
        run_tiny(option_file, tmp_path)
    run_dir = os.path.join(tmp_path, "tiny")
    assert ckpt.complete_checkpoints(os.path.join(run_dir, "models")) == [2, 3]
    assert "interrupted at iteration 3; the next start resumes from iteration 3" in run_log(run_dir)
    monkeypatch.setattr(ModelFBCNN, "optimize_parameters", real)
    assert run_tiny(option_file, tmp_path) == {"start": 3, "end": 6}
    assert run_losses(run_dir) == run_losses(reference_run)
    resumed = load_state_dict_file(os.path.join(run_dir, "models", "6_G.safetensors"))
    reference = load_state_dict_file(os.path.join(reference_run, "models", "6_G.safetensors"))
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)


@pytest.mark.slow
def test_sigterm_stops_training_like_ctrl_c(option_file, tmp_path):
    cmd = [sys.executable, MAIN, "-opt", option_file, "--set", f"path.root={tmp_path}", "--set",
           "datasets.test=null", "--set", "train.checkpoint_save=1", "--set",
           "train.total_iter=100000"]
    proc = subprocess.Popen(cmd, env=SUBPROCESS_ENV, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    models = os.path.join(tmp_path, "tiny", "models")
    deadline = time.time() + 120
    while not (os.path.isdir(models) and ckpt.complete_checkpoints(models)):
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err, err[-3000:]
    assert "the next start resumes from iteration" in run_log(os.path.join(tmp_path, "tiny"))


# Runs main_train_fbcnn.py with one moment of the run (a training step, a save, a validation)
# announced on stderr and made long, so that the test can signal the run inside it. The step
# spends about 10 s in one C call that releases the GIL and never returns to Python meanwhile,
# as a long network step does (Python's own signal handler waits for it); a save or a
# validation is held until the test has seen the stop announced and creates the release file.
_SLOW_MOMENT = """
import hashlib, os, sys, time
MOMENT = sys.argv.pop(1)
import main_train_fbcnn
from models.model_fbcnn import ModelFBCNN
from utils import checkpoint

def slow(where):
    sys.stderr.write("AT %s\\n" % where)
    sys.stderr.flush()
    if where == "step":
        hashlib.pbkdf2_hmac("sha256", b"x", b"y", 24_000_000)
    else:
        deadline = time.time() + 120
        while not os.path.exists(os.environ["FBCNN_TEST_RELEASE"]) and time.time() < deadline:
            time.sleep(0.05)
    sys.stderr.write("LEFT %s\\n" % where)
    sys.stderr.flush()

def wrap(owner, name, moment, when):
    real = getattr(owner, name)
    calls = []
    def patched(*args, **kwargs):
        calls.append(1)
        if MOMENT == moment and when(args, len(calls)):
            slow(moment)
        return real(*args, **kwargs)
    setattr(owner, name, patched)

wrap(ModelFBCNN, "optimize_parameters", "step", lambda args, n: args[1] == 3)
wrap(checkpoint, "save_checkpoint", "save", lambda args, n: n == 1)
wrap(ModelFBCNN, "test", "validation", lambda args, n: n == 1)
sys.exit(main_train_fbcnn.main(sys.argv[1:]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("moment, stopped_at", [("step", 3), ("save", 2), ("validation", 2)])
def test_sigterm_to_the_whole_run_stops_it_cleanly(option_file, tmp_path, moment, stopped_at):
    """SIGTERM to the run's process group, loader workers included (as `timeout` and a terminal
    send it): said at once, the iteration finishes, the workers are shut down, one exit 130."""
    cmd = [sys.executable, "-c", _SLOW_MOMENT, moment, "-opt", option_file,
           "--set", f"path.root={tmp_path}", "--set", "datasets.train.dataloader_num_workers=2",
           "--set", "train.checkpoint_save=2", "--set", "train.checkpoint_test=2",
           "--set", "train.total_iter=100"]
    err_path, release = tmp_path / "err.txt", tmp_path / "release"
    env = {**SUBPROCESS_ENV, "FBCNN_TEST_RELEASE": str(release)}
    with open(err_path, "w") as err:
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=err, start_new_session=True)
        try:
            reached = wait_for(lambda: f"AT {moment}" in err_path.read_text(), 180, proc)
            assert reached, err_path.read_text()[-3000:]
            os.killpg(proc.pid, signal.SIGTERM)
            if moment != "step":  # held until the stop is announced (or a minute has passed)
                wait_for(lambda: "stopping after" in err_path.read_text(), 60, proc)
                release.touch()
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    err = err_path.read_text()
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "Error" not in err, err[-3000:]
    said = err.index("SIGTERM: stopping after this iteration")
    assert said < err.index(f"LEFT {moment}")  # at once, not once the moment is over
    assert err.rstrip().endswith("interrupted")
    # the iteration reached is saved (2 already was, by checkpoint_save)
    assert (f"interrupted at iteration {stopped_at}; the next start resumes from iteration "
            f"{stopped_at}" in run_log(os.path.join(tmp_path, "tiny")))
    assert ckpt.complete_checkpoints(os.path.join(tmp_path, "tiny", "models")) == sorted(
        {2, stopped_at})
    if moment == "validation":
        assert "iteration 2: validation abandoned (stopping)" in err
    deadline = time.time() + 10
    while True:  # the workers ended with the run: its process group is empty
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        assert time.time() < deadline, "loader workers outlived the run"
        time.sleep(0.2)
