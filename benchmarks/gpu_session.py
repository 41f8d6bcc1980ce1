"""The GPU measurements of docs/benchmarks.md in one time-boxed command.

    python -m benchmarks.gpu_session --out DIR [--budget-s 540]     # on a machine with a GPU
    python -m benchmarks.gpu_session --smoke --out /tmp/s           # the same steps, tiny, on CPU

Run from the checkout's root with `-m` (nothing needs installing). The `STEPS` (full-size
FBCNN, `--random-init`) run in priority order: the GPU tests; LIVE1 inference per precision and
layout; the whole colour test script, serial and pipelined, then as new processes; training
steps per precision; a 12-megapixel photo untiled and tiled; the test script per precision;
then inference and training with torch.compile. Each runs in a process group of its own,
killed whole at its own limit, and writes its JSON row by row, so a step stopped at its limit
keeps what it measured and costs only itself; with `--budget-s` no step starts after that many
seconds (the first six's limits add up to 480 s). Everything is merged into
`DIR/gpu_session.json` (device, per step: command, status, seconds, results) and
`DIR/gpu_session.log`. `--smoke` swaps in tiny networks on the CPU (torch.compile off) to check
the script without a GPU; docs/benchmarks.md describes each step.
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

from benchmarks.benchlib import REPO_ROOT, device_name, write_json

# name, time limit in s, arguments after `python` on the GPU, and with --smoke on the CPU;
# {json} is the step's result file
_TINY = ["--random-init", "--nc", "4", "8", "8", "16", "--nb", "1", "--device", "cpu",
         "--threads", "1"]
_TESTS = ["-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "tests/test_inference.py",
          "tests/test_metrics.py"]
_INFER = ["-m", "benchmarks.bench_inference", "--random-init", "--device", "cuda"]
_INFER_TINY = ["-m", "benchmarks.bench_inference", *_TINY, "--limit", "1", "--crop", "64"]
_SCRIPT = ["-m", "benchmarks.bench_test_script", "--random-init", "--device", "cuda", "--qf", "10",
           "20", "30", "40"]
_SCRIPT_TINY = ["-m", "benchmarks.bench_test_script", *_TINY, "--testset", "Classic5", "--qf", "10"]
_TRAIN = ["-m", "benchmarks.bench_train", "--device", "cuda", "--set", "train.cudnn_benchmark=true",
          "--channels-last"]
_TRAIN_TINY = ["-m", "benchmarks.bench_train", "--device", "cpu", "--threads", "1", "--set",
               "netG.nc=[4,8,8,16]", "--set", "netG.nb=1", "--set", "datasets.train.H_size=32",
               "--set", "datasets.train.dataloader_batch_size=2", "--steps", "1", "--warmup", "1"]
STEPS = [
    ("gpu_tests", 60, _TESTS,
     _TESTS),  # without CUDA every gpu test is skipped: quick, and still collected and run
    ("inference_live1", 60,
     [*_INFER, "--precision", "fp32", "tf32", "bf16", "fp16", "--layout", "contiguous",
      "channels_last", "--synthetic-mp", "0", "--tile", "0", "--json", "{json}"],
     [*_INFER_TINY, "--precision", "fp32", "--layout", "contiguous", "channels_last",
      "--synthetic-mp", "0", "--tile", "0", "--json", "{json}"]),
    ("test_script_fp32", 110,
     [*_SCRIPT, "--workers", "0", "8", "--json", "{json}"],
     [*_SCRIPT_TINY, "--workers", "0", "2", "--json", "{json}"]),
    ("train", 90,
     [*_TRAIN, "--precision", "fp32", "tf32", "bf16", "fp16", "--json", "{json}"],
     [*_TRAIN_TINY, "--precision", "fp32", "--json", "{json}"]),
    ("inference_12mp", 100,
     [*_INFER, "--precision", "fp32", "bf16", "--limit", "0", "--synthetic-mp", "12", "--tile",
      "1024", "--tile-overlap", "32", "--tile-cache-gib", "0", "1", "2", "--json", "{json}"],
     [*_INFER_TINY, "--precision", "fp32", "--limit", "0", "--synthetic-mp", "0.05", "--tile",
      "128", "--tile-overlap", "32", "--tile-cache-gib", "0", "1", "--json", "{json}"]),
    ("test_script_precision", 60,
     [*_SCRIPT, "--precision", "fp32", "bf16", "fp16", "--channels-last", "--workers", "8",
      "--no-process", "--json", "{json}"],
     [*_SCRIPT_TINY, "--precision", "fp32", "bf16", "--channels-last", "--workers", "2",
      "--no-process", "--json", "{json}"]),
    ("inference_compile", 120,
     [*_INFER, "--precision", "bf16", "--layout", "channels_last", "--compile", "off", "on",
      "--synthetic-mp", "0", "--tile", "0", "--json", "{json}"],
     [*_INFER_TINY, "--precision", "fp32", "--compile", "off", "--synthetic-mp", "0", "--tile",
      "0", "--json", "{json}"]),
    ("train_compile", 150,
     [*_TRAIN, "--precision", "bf16", "--compile", "off", "on", "--json", "{json}"],
     [*_TRAIN_TINY, "--precision", "fp32", "--compile", "off", "--json", "{json}"]),
]
# the first six, the figures docs/benchmarks.md asks for first (480 s of limits together)
FIRST_STEPS = 6


def _device():
    import torch
    info = {"device": device_name(torch.device("cuda" if torch.cuda.is_available() else "cpu")),
            "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu_memory_gib"] = round(props.total_memory / 2 ** 30, 1)
    return info


def _child_env():
    """The environment of a step: the checkout itself first on the import path, so the steps
    run from a bare checkout (a machine where this project is not installed)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p)
    return env


def _run_step(command, log, limit):
    """Run one step in a process group of its own; at its limit the whole group is killed (a
    step's own children, such as the test script a benchmark starts, included). Returns the
    step's status."""
    proc = subprocess.Popen(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                            env=_child_env(), start_new_session=True)
    try:
        code = proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        return f"timed out after {limit:.0f} s"
    finally:
        if proc.poll() is None:  # an interrupted session leaves no step behind either
            os.killpg(proc.pid, signal.SIGKILL)
    return "ok" if code == 0 else f"exit {code}"


def run_session(out, smoke=False, budget_s=None, only=None):
    """Run the steps (all, or those named in `only`), none started after `budget_s` seconds
    (None: no budget); returns the merged result dict."""
    os.makedirs(out, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix="gpu_session_")
    result = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "smoke": smoke, **_device(),
              "budget_s": budget_s, "steps": []}
    log_path = os.path.join(out, "gpu_session.log")
    start = time.monotonic()
    with open(log_path, "w", encoding="utf-8") as log:
        for name, limit, gpu_args, smoke_args in STEPS:
            if only and name not in only:
                continue
            left = (float("inf") if budget_s is None
                    else budget_s - (time.monotonic() - start))
            if left < 15:
                result["steps"].append({"name": name, "status": "not started (budget spent)"})
                continue
            json_path = os.path.join(scratch, f"{name}.json")
            argv = [a.replace("{json}", json_path) for a in (smoke_args if smoke else gpu_args)]
            command = [sys.executable, *(["-S"] if sys.flags.no_site else []), *argv]
            step = {"name": name, "command": " ".join(argv)}
            t0 = time.monotonic()
            log.write(f"\n===== {name}: {step['command']}\n")
            log.flush()
            step["status"] = _run_step(command, log, min(limit, left))
            step["seconds"] = round(time.monotonic() - t0, 1)
            if os.path.isfile(json_path):
                with open(json_path, encoding="utf-8") as f:
                    step["results"] = json.load(f)
            result["steps"].append(step)
            log.write(f"===== {name}: {step['status']} in {step['seconds']} s\n")
            log.flush()
            print(f"{name}: {step['status']} in {step['seconds']} s", flush=True)
            write_json(os.path.join(out, "gpu_session.json"), result)
    result["seconds"] = round(time.monotonic() - start, 1)
    write_json(os.path.join(out, "gpu_session.json"), result)
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True,
                   help="folder for gpu_session.json and gpu_session.log")
    p.add_argument("--budget-s", type=float, default=None,
                   help="no step starts after this many seconds (default: no budget; each step "
                        "has its own limit)")
    p.add_argument("--only", nargs="+", choices=[s[0] for s in STEPS],
                   help="run these steps only")
    p.add_argument("--smoke", action="store_true",
                   help="tiny networks and inputs on the CPU: checks the script, measures nothing")
    args = p.parse_args(argv)
    result = run_session(args.out, args.smoke, args.budget_s, args.only)
    failed = [s["name"] for s in result["steps"] if s["status"] != "ok"]
    print(f"{len(result['steps']) - len(failed)} of {len(result['steps'])} steps ok in "
          f"{result['seconds']} s on {result['device']}; results in {args.out}/gpu_session.json"
          + (f"; not ok: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
