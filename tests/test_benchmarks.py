"""benchmarks/: the analytic FLOP count, peak-memory reading and tiny end-to-end runs of the
inference, training-step and loader benchmarks (their tables and JSON)."""
import hashlib
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from benchmarks import (bench_cpu_engines, bench_inference, bench_loader, bench_projection,
                        bench_restore_photo, bench_test_script, bench_train, eval_fbcnn_d,
                        eval_qf_head, figure_restored, gpu_session, gpu_train_lite,
                        make_graphics_set, no_harm)
from benchmarks.benchlib import PeakMemory, fbcnn_conv_flops
from data.graphics import GRAPHIC_KINDS, neutral_copy
from data.jpeg import double_jpeg, jpeg, shift_crop
from models.engines import openvino_available
from models.inference import predict_qf, restore
from models.model_zoo import infer_fbcnn_kwargs, load_model, read_fbcnn_kwargs
from models.network_fbcnn import FBCNN
from safetensors import safe_open
from tests.conftest import REPO_ROOT
from utils.checkpoint import save_network
from utils.errors import UserError
from utils.image import imread_uint, imwrite
from utils.metrics import psnr


def _hooked_conv_flops(net, height, width):
    """FLOPs of every convolution of one forward pass, read from the layers' real shapes."""
    total = []

    def count(module, inputs, output):
        k = module.kernel_size[0] * module.kernel_size[1]
        positions = (inputs[0] if isinstance(module, torch.nn.ConvTranspose2d) else output)
        total.append(2 * module.in_channels * module.out_channels * k
                     * positions.shape[-2] * positions.shape[-1])

    hooks = [m.register_forward_hook(count) for m in net.modules()
             if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))]
    with torch.no_grad():
        net(torch.rand(1, net.in_nc, height, width))
    for hook in hooks:
        hook.remove()
    return sum(total)


def test_conv_flops_match_the_layers_and_the_reference_cost():
    net = FBCNN(in_nc=1, out_nc=1, nc=(8, 16, 24, 40), nb=2)
    assert fbcnn_conv_flops(net, 37, 50) == _hooked_conv_flops(net, 37, 50)
    full = FBCNN()  # nc 64..512, nb 4: 5.41 TFLOP per megapixel
    assert fbcnn_conv_flops(full, 1000, 1000) / 1e12 == pytest.approx(5.41, abs=0.01)
    assert (fbcnn_conv_flops(full, 1000, 1000, with_qf_head=False)
            < fbcnn_conv_flops(full, 1000, 1000))


def test_peak_memory_sees_a_large_allocation():
    with PeakMemory("cpu") as small:
        np.ones(1 << 20, dtype=np.uint8)
    with PeakMemory("cpu") as large:
        block = np.ones(256 << 20, dtype=np.uint8)  # 256 MiB, touched
        del block
    assert large.peak - small.peak > 200 << 20


def _noise_images(folder, count, shape, seed):
    """`count` PNGs of uniform noise in a new `folder`, named 0.png, 1.png, ..."""
    folder.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(count):
        imwrite(str(folder / f"{i}.png"), rng.integers(0, 256, shape, dtype=np.uint8))
    return folder


@pytest.fixture
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_inference_benchmark_writes_its_table_and_json(tmp_path, capsys, keep_threads):
    path = tmp_path / "bench.json"
    assert bench_inference.main(["--random-init", "--nc", "4", "8", "8", "16", "--nb", "1",
                                 "--device", "cpu", "--precision", "fp32", "--limit", "1",
                                 "--synthetic-mp", "0.05", "--tile", "128", "--threads", "1",
                                 "--tile-cache-gib", "0", "1",
                                 "--json", str(path)]) == 0
    rows = json.loads(path.read_text())["rows"]
    assert [(r["input"].split()[0], r["tiling"]) for r in rows] == [
        ("LIVE1_color", "untiled"), ("LIVE1_color", "128/32, cache 0 GiB"),
        ("LIVE1_color", "128/32, cache 1 GiB"),
        ("synthetic", "untiled"), ("synthetic", "128/32, cache 0 GiB"),
        ("synthetic", "128/32, cache 1 GiB")]
    assert rows[0]["max_diff"] == 0 and all(r["max_diff"] <= 1 for r in rows)
    assert {r["compile"] for r in rows} == {"off"}  # the default: no torch.compile
    assert rows[3]["megapixels"] == pytest.approx(0.05, rel=0.02)
    assert rows[1]["max_diff"] == rows[2]["max_diff"] and rows[4]["max_diff"] == rows[5]["max_diff"]
    assert all(r["mp_per_s"] > 0 and r["peak_gib"] > 0 for r in rows)
    assert "| LIVE1_color (1 images) | fp32" in capsys.readouterr().out


def test_inference_benchmark_compares_tile_sizes_blind_and_fed(tmp_path, keep_threads):
    """Several tile sizes and a fed QF in one run: a row each, each fed row against its own
    untiled reference (a fed QF changes the output)."""
    path = tmp_path / "tiles.json"
    assert bench_inference.main(["--random-init", "--nc", "4", "8", "8", "16", "--nb", "1",
                                 "--device", "cpu", "--precision", "fp32", "--limit", "0",
                                 "--synthetic-mp", "0.05", "--tile", "64", "128", "--threads",
                                 "1", "--tile-cache-gib", "0", "--qf-input", "blind", "30",
                                 "--json", str(path)]) == 0
    rows = json.loads(path.read_text())["rows"]
    assert [(r["qf_input"], r["tiling"]) for r in rows] == [
        ("blind", "untiled"), ("blind", "64/32, cache 0 GiB"), ("blind", "128/32, cache 0 GiB"),
        ("30", "untiled"), ("30", "64/32, cache 0 GiB"), ("30", "128/32, cache 0 GiB")]
    assert rows[0].get("reference") and rows[3].get("reference")
    assert rows[3]["max_diff"] == 0 and all(r["max_diff"] <= 1 for r in rows)
    with pytest.raises(SystemExit):
        bench_inference.main(["--random-init", "--qf-input", "0"])


def test_train_benchmark_writes_its_table_and_json(tmp_path, capsys, keep_threads):
    path = tmp_path / "train.json"
    assert bench_train.main(["--device", "cpu", "--threads", "1", "--set", "netG.nc=[4,8,8,16]",
                             "--set", "netG.nb=1", "--set", "datasets.train.H_size=32",
                             "--set", "datasets.train.dataloader_batch_size=2", "--precision",
                             "fp32", "bf16", "--steps", "1", "--warmup", "1",
                             "--json", str(path)]) == 0
    rows = json.loads(path.read_text())["rows"]
    assert [(r["precision"], r["compile"], r["batch"], r["patch"]) for r in rows] == [
        ("fp32", "off", 2, 32), ("bf16", "off", 2, 32)]
    assert all(r["patches_per_s"] > 0 and r["tflops"] > 0 for r in rows)
    table = [line.split("|")[1:4] for line in capsys.readouterr().out.splitlines()
             if line.startswith("| ") and "patches/s" not in line]
    assert [[cell.strip() for cell in row] for row in table] == [["fp32", "False", "off"],
                                                                 ["bf16", "False", "off"]]


def test_loader_benchmark_writes_its_table_and_json(tmp_path, capsys):
    folder = _noise_images(tmp_path / "train", 3, (40, 48, 3), seed=0)
    path = tmp_path / "loader.json"
    assert bench_loader.main(["--set", f"datasets.train.dataroot_H={folder}",
                              "--set", "datasets.train.H_size=32",
                              "--set", "datasets.train.dataloader_batch_size=4",
                              "--workers", "0", "1", "--batches", "2", "--warmup", "1",
                              "--json", str(path)]) == 0
    rows = json.loads(path.read_text())["rows"]
    assert [(r["workers"], r["batch"], r["patch"]) for r in rows] == [(0, 4, 32), (1, 4, 32)]
    assert all(r["patches_per_s"] > 0 for r in rows)
    assert "3 images in" in capsys.readouterr().out


def test_test_script_benchmark_times_the_runner_per_stage(tmp_path, capsys, keep_threads,
                                                          monkeypatch):
    folder = _noise_images(tmp_path / "set", 2, (48, 64, 3), seed=1)
    path = tmp_path / "script.json"
    runs = []
    real_run = bench_test_script.run
    monkeypatch.setattr(bench_test_script, "run",
                        lambda *a, **k: runs.append(a[1].qf) or real_run(*a, **k))
    assert bench_test_script.main(["--random-init", "--nc", "4", "8", "8", "16", "--nb", "1",
                                   "--device", "cpu", "--testset", str(folder), "--qf", "10",
                                   "30", "--workers", "0", "2", "--threads", "1", "--warmup", "1",
                                   "--json", str(path)]) == 0
    assert runs == [(10,)] * 3 + [(30,)] * 2  # the warm-up run comes before the timed ones
    result = json.loads(path.read_text())
    rows = result["rows"]
    assert [(r["qf"], r["workers"], r["n_images"]) for r in rows] == [
        (10, 0, 2), (10, 2, 2), (30, 0, 2), (30, 2, 2)]
    assert rows[0]["megapixels"] == pytest.approx(2 * 48 * 64 / 1e6)
    assert rows[0]["psnr"] == rows[1]["psnr"]  # serial and pipelined runs score alike
    assert all(r["network_s"] > 0 and r["metrics_s"] > 0 for r in rows)
    # the script itself, in a new process per workers value, with both QFs: the same scores,
    # and the start-up the warm runner rows leave out
    process = result["process_rows"]
    assert [(r["precision"], r["qfs"], r["workers"]) for r in process] == [
        ("fp32", "10,30", 0), ("fp32", "10,30", 2)]
    for r in process:
        assert r["psnr"] == [rows[0]["psnr"], rows[2]["psnr"]] and r["max_psnr_diff"] == 0
        assert r["runner_s"] == pytest.approx(sum(x["wall_s"] for x in rows
                                                  if x["workers"] == r["workers"]))
        assert r["process_s"] > 0  # (outside_runner_s is process_s - runner_s by definition)
    assert "| fp32      | 10,30 | 0       |" in capsys.readouterr().out


def test_fbcnn_d_evaluation_scores_blind_dominant_and_oracle(tmp_path, capsys, keep_threads):
    folder = tmp_path / "set"
    folder.mkdir()
    classic5 = os.path.join(REPO_ROOT, "testsets", "Classic5")
    for name in ("1.bmp", "2.bmp"):
        imwrite(str(folder / name.replace(".bmp", ".png")),
                imread_uint(os.path.join(classic5, name), 1)[:96, :112])
    torch.manual_seed(0)
    weights = tmp_path / "tiny_gray.pth"
    torch.save(FBCNN(in_nc=1, out_nc=1, nc=[8, 16, 32, 64], nb=1).state_dict(), weights)
    path = tmp_path / "fbcnn_d.json"
    assert eval_fbcnn_d.main(["--testset", str(folder), "--pairs", "10,30", "30,10",
                              "--workers", "1", "--max-size", "64", "--model", str(weights),
                              "--device", "cpu", "--json", str(path)]) == 0
    result = json.loads(path.read_text())
    assert ([(s["qf1"], s["qf2"], s["dominant"], s["n_images"]) for s in result["summaries"]]
            == [(10, 30, 10, 2), (30, 10, 10, 2)])
    model = load_model(str(weights))
    for row in result["images"]:
        img_H = imread_uint(str(folder / row["image"]), 1)
        img_L = double_jpeg(img_H, row["qf1"], row["qf2"], 4)
        img_H = shift_crop(img_H, 4)
        assert row["psnr_jpeg"] == psnr(img_L, img_H)
        assert row["psnr_oracle"] == psnr(restore(model, img_L, qf=10)[0], img_H)
        assert row["psnr_dominant"] == psnr(restore(model, img_L, qf=row["estimate"])[0], img_H)
        assert row["psnr_blind"] == psnr(restore(model, img_L)[0], img_H)
    first = result["summaries"][0]
    assert first["psnr_blind"] == pytest.approx(np.mean(
        [r["psnr_blind"] for r in result["images"] if (r["qf1"], r["qf2"]) == (10, 30)]))
    assert "| 10,30 | 10 |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        eval_fbcnn_d.main(["--testset", "no_such_set", "--workers", "1"])
    assert "--testset 'no_such_set': no folder" in capsys.readouterr().err


def test_fbcnn_d_evaluation_rejects_a_colour_model_on_a_gray_set_before_estimating(tmp_path, capsys,
                                                                     monkeypatch):
    weights = tmp_path / "tiny_color.pth"
    torch.save(FBCNN(in_nc=3, out_nc=3, nc=[8, 16, 32, 64], nb=1).state_dict(), weights)

    def no_pool(*args, **kwargs):
        raise AssertionError("the estimator ran before the model was checked")

    monkeypatch.setattr(eval_fbcnn_d, "Pool", no_pool)
    with pytest.raises(SystemExit):
        eval_fbcnn_d.main(["--testset", "Classic5", "--workers", "1", "--model", str(weights),
                           "--device", "cpu"])
    assert ("a colour model; give a colour --testset such as LIVE1_color"
            in capsys.readouterr().err)


def test_fbcnn_d_evaluation_runs_a_colour_model_on_a_colour_set(tmp_path, capsys):
    torch.manual_seed(0)
    weights = tmp_path / "tiny_color.pth"
    torch.save(FBCNN(in_nc=3, out_nc=3, nc=[8, 16, 32, 64], nb=1).state_dict(), weights)
    assert eval_fbcnn_d.main(["--testset", "LIVE1_color", "--limit", "1", "--workers", "1",
                              "--pairs", "10,30", "--model", str(weights), "--device", "cpu",
                              "--json", str(tmp_path / "d.json")]) == 0
    (summary,) = json.loads((tmp_path / "d.json").read_text())["summaries"]
    assert summary["n_images"] == 1 and summary["psnr_jpeg"] > 20


def test_gpu_session_steps_mirror_the_gpu_commands_on_the_cpu():
    for name, limit, gpu_args, smoke_args in gpu_session.STEPS:
        assert gpu_args[:2] == smoke_args[:2] == ["-m", gpu_args[1]] and 0 < limit <= 150, name
        assert ("cuda" in gpu_args) == (name != "gpu_tests") and "cuda" not in smoke_args
        assert ("{json}" in gpu_args) == ("{json}" in smoke_args) == (name != "gpu_tests")


def test_docs_list_the_gpu_session_steps_as_the_script_runs_them():
    """docs/benchmarks.md's table of gpu_session.py's steps: the same names, order and limits."""
    with open(os.path.join(REPO_ROOT, "docs", "benchmarks.md"), encoding="utf-8") as f:
        rows = [line.split("|")[1:3] for line in f if line.startswith("| `")]
    documented = [(name.strip(" `"), int(limit)) for name, limit in rows
                  if limit.strip().isdigit()]
    assert documented == [(name, limit) for name, limit, _, _ in gpu_session.STEPS]


def test_the_first_gpu_session_steps_fit_the_budget_the_docs_give():
    """The figures wanted first (forward, whole test script, training, the tiled 12 MP photo)
    come first and fit the 480 s the docs name; only the compile steps come after."""
    first = gpu_session.STEPS[:gpu_session.FIRST_STEPS]
    assert sum(limit for _, limit, _, _ in first) == 480
    assert {"inference_live1", "test_script_fp32", "train", "inference_12mp"} <= {
        name for name, _, _, _ in first}
    assert all("compile" in name for name, _, _, _ in gpu_session.STEPS[gpu_session.FIRST_STEPS:])


def test_a_step_at_its_limit_is_killed_with_its_children(tmp_path):
    """A step that started a process of its own (bench_test_script starts the test script) is
    killed whole at its limit: nothing of it keeps the device busy during the next steps."""
    script = ("import subprocess, sys, time\n"
              "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
              "print(child.pid, flush=True)\n"
              "time.sleep(120)\n")
    log_path = tmp_path / "step.log"
    with open(log_path, "w") as log:
        status = gpu_session._run_step([sys.executable, "-c", script], log, 3)
    assert status == "timed out after 3 s"
    child = int(log_path.read_text().split()[0])
    for _ in range(50):
        try:
            with open(f"/proc/{child}/stat") as f:
                if f.read().split(") ")[1].startswith("Z"):
                    break  # killed, left for its new parent to reap
        except FileNotFoundError:
            break  # killed and reaped
        time.sleep(0.1)
    else:
        pytest.fail(f"the step's child {child} outlived the step")


def _bare_environment(tmp_path):
    """An environment whose Python sees the installed packages but not this project's editable
    install (its finder is a .pth file, which `python -S` does not run), as on a GPU machine
    where the project is not installed; checked: the project does not import from elsewhere."""
    import site
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(site.getsitepackages()))
    probe = subprocess.run([sys.executable, "-S", "-c", "import benchmarks"], cwd=tmp_path,
                           env=env, capture_output=True, text=True)
    assert "No module named 'benchmarks'" in probe.stderr
    return env


def test_gpu_session_spends_no_step_past_its_budget(tmp_path):
    result = gpu_session.run_session(str(tmp_path), smoke=True, budget_s=0)
    assert ([s["status"] for s in result["steps"]]
            == ["not started (budget spent)"] * len(gpu_session.STEPS))
    assert json.loads((tmp_path / "gpu_session.json").read_text())["steps"] == result["steps"]


@pytest.mark.slow
def test_gpu_session_smoke_runs_every_step_and_merges_the_results(tmp_path):
    """From a bare checkout (the project not installed), as on the GPU machine: the session and
    each of its steps."""
    run = subprocess.run([sys.executable, "-S", "-m", "benchmarks.gpu_session", "--smoke",
                          "--out", str(tmp_path / "out")], cwd=REPO_ROOT,
                         env=_bare_environment(tmp_path), capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    result = json.loads((tmp_path / "out" / "gpu_session.json").read_text())
    assert [s["name"] for s in result["steps"]] == [s[0] for s in gpu_session.STEPS]
    assert all(s["status"] == "ok" for s in result["steps"])
    by_name = {s["name"]: s for s in result["steps"]}
    assert ([r["input"].split()[0] for r in by_name["inference_12mp"]["results"]["rows"]] ==
            ["synthetic"] * 3)  # --limit 0: the synthetic photo alone, untiled and two caches
    script = by_name["test_script_fp32"]["results"]
    assert script["rows"][0]["n_images"] == 5
    # the serial run is the pipelined one's baseline, in the runner and as a new process
    assert [r["workers"] for r in script["rows"]] == [0, 2]
    assert [r["workers"] for r in script["process_rows"]] == [0, 2]
    assert [r["precision"] for r in by_name["test_script_precision"]["results"]["rows"]] == [
        "fp32", "bf16"]
    assert by_name["train"]["results"]["rows"][0]["patches_per_s"] > 0
    assert [r["compile"] for r in by_name["inference_compile"]["results"]["rows"]] == ["off"]
    log = (tmp_path / "out" / "gpu_session.log").read_text()
    assert all(f"===== {s[0]}: ok" in log for s in gpu_session.STEPS)


def test_qf_head_evaluation_reports_predict_qf_per_true_qf(tmp_path, capsys):
    torch.manual_seed(0)
    weights = tmp_path / "tiny_gray.pth"
    torch.save(FBCNN(in_nc=1, out_nc=1, nc=[8, 16, 32, 64], nb=1).state_dict(), weights)
    path = tmp_path / "qf_head.json"
    assert eval_qf_head.main(["--model", str(weights), "--testset", "Classic5", "--limit", "2",
                              "--qf", "10", "90", "--qf-input", "30", "--device", "cpu",
                              "--json", str(path)]) == 0
    result = json.loads(path.read_text())
    model = load_model(str(weights))
    classic5 = os.path.join(REPO_ROOT, "testsets", "Classic5")
    images = [imread_uint(os.path.join(classic5, name), 1)
              for name in ("1.bmp", "2.bmp")]  # the first two, sorted by name
    for qf, row, psnr_row in zip((10, 90), result["rows"], result["psnr"]):
        expected = [predict_qf(model, jpeg(img, qf)) for img in images]
        assert row["qf"] == qf and row["mean"] == pytest.approx(np.mean(expected))
        assert (row["min"], row["max"]) == (min(expected), max(expected))
        assert row["mae"] == pytest.approx(np.mean(np.abs(np.array(expected) - qf)))
        assert row["medae"] == pytest.approx(np.median(np.abs(np.array(expected) - qf)))
        net_psnr = {key: np.mean([psnr(restore(model, jpeg(img, qf), qf=given)[0], img)
                                  for img in images])
                    for key, given in (("blind", None), ("qf_input 30", 30))}
        assert psnr_row == pytest.approx({"qf": qf, **net_psnr, "jpeg": np.mean(
            [psnr(jpeg(img, qf), img) for img in images])})
        assert psnr_row["blind"] != psnr_row["qf_input 30"]  # the untrained net still reacts
    out = capsys.readouterr().out
    assert "| 10      |" in out and "qf_input 30" in out


@pytest.mark.parametrize("bias,share", [(-1.0, 0.0), (1.0, 1.0)])
def test_qf_head_evaluation_counts_the_live_units_of_the_qf_mlps(tmp_path, bias, share):
    """--units: with the QF MLPs' Linear weights zero, every unit outputs its bias: none is
    ever active at bias -1, all are at +1."""
    torch.manual_seed(0)
    net = FBCNN(in_nc=1, out_nc=1, nc=[8, 16, 32, 64], nb=1)
    with torch.no_grad():
        for part in (net.qf_pred, net.qf_embed):
            for layer in part:
                if isinstance(layer, torch.nn.Linear):
                    layer.weight.zero_()
                    layer.bias.fill_(bias)
    weights = tmp_path / "tiny.pth"
    torch.save(net.state_dict(), weights)
    path = tmp_path / "units.json"
    assert eval_qf_head.main(["--model", str(weights), "--testset", "Classic5", "--limit", "1",
                              "--qf", "10", "--qf-input", "50", "--units", "--device", "cpu",
                              "--json", str(path)]) == 0
    units = json.loads(path.read_text())["units"]
    assert [u["layer"] for u in units] == ["qf_pred.4", "qf_pred.6", "qf_embed.1", "qf_embed.3",
                                          "qf_embed.5"]
    width = net.qf_pred[-2].in_features  # the MLPs' width (512, whatever nc)
    assert all(u["units"] == width and u["active"] == share for u in units)


def test_gpu_train_lite_plans_from_the_probe_records():
    records = [{"iter": 10, "time": 100.0}, {"iter": 30, "time": 102.0},
               {"iter": 50, "time": 104.0}]
    rate, startup = gpu_train_lite.probe_rate(records, started=95.0)
    assert rate == pytest.approx(10.0)  # the first interval (start-up included) is left out
    assert startup == pytest.approx(100.0 - 95.0 - 10 / 10.0)
    assert gpu_train_lite.plan_iterations(10.0, 100.0) == (950, 855)  # 95% filled, fold at 90%
    assert gpu_train_lite.plan_iterations(10.0, 100.0, max_iter=40) == (40, 36)
    assert gpu_train_lite.plan_iterations(10.0, 100.0, merge=False) == (950, None)
    assert gpu_train_lite.plan_iterations(10.0, 0.25) == (2, 1)  # the fold before the end
    with pytest.raises(UserError, match="fewer than 2 iterations"):
        gpu_train_lite.plan_iterations(10.0, 0.1)


@pytest.mark.parametrize("model, in_nc, dataset_type", [("color", 3, "jpeg"),
                                                       ("gray", 1, "jpeggray"),
                                                       ("gray_double", 1, "jpeggraydouble")])
def test_gpu_train_lite_smoke_trains_writes_and_scores_a_lite_model(model, in_nc, dataset_type,
                                                                    tmp_path, capsys,
                                                                    keep_threads):
    out, work = tmp_path / "out", tmp_path / "work"
    assert gpu_train_lite.main(["--smoke", "--model", model, "--out", str(out),
                                "--workdir", str(work)]) == 0
    name = gpu_train_lite.RECIPES[model].name
    assert sorted(os.listdir(out)) == sorted(f"{name}{end}" for end in (
        ".safetensors", ".json", "_train.log", "_metrics.jsonl", "_eval.log"))
    result = json.loads((out / f"{name}.json").read_text())
    assert result["options"]["datasets"]["train"]["dataset_type"] == dataset_type
    assert result["plan"] == {**result["plan"], "total_iter": 20, "merge_bn_startpoint": 18}
    assert result["training"]["iterations"] == 20 and not result["training"]["stopped_at_deadline"]
    assert result["probe"]["it_per_s"] > 0 and result["probe"]["iterations"] >= 6
    # the written network: fp16, BatchNorm folded, its architecture in the metadata
    weights = out / f"{name}.safetensors"
    with safe_open(str(weights), framework="pt") as f:
        meta = f.metadata()
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    assert json.loads(meta["fbcnn_kwargs"]) == result["weights"]["fbcnn_kwargs"]
    assert json.loads(meta["fbcnn_kwargs"])["act_mode"] == "R"
    assert meta["dataset_type"] == dataset_type and meta["iterations"] == "20"
    assert result["weights"]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    # its scores are the runner's on the written file, beside the JPEG input's
    loaded = load_model(str(weights))
    assert loaded.in_nc == in_nc
    testset = work / "smoke_testset"
    images = [imread_uint(str(path), in_nc) for path in sorted(testset.iterdir())]
    rows = result["evaluation"]["rows"]
    assert [r["qf"] for r in rows] == [10, 20, 30, 40] and rows[0]["n_images"] == 2
    for row in (rows[0], rows[3]):
        assert row["psnr"] == pytest.approx(np.mean(
            [psnr(restore(loaded, jpeg(img, row["qf"]))[0], img) for img in images]))
        assert row["jpeg_psnr"] == pytest.approx(np.mean(
            [psnr(jpeg(img, row["qf"]), img) for img in images]))
    assert "(asked to end early)" in (out / f"{name}_train.log").read_text()  # the probe
    assert f"| 10 | {rows[0]['jpeg_psnr']:.2f}" in capsys.readouterr().out


def test_gpu_train_lite_stops_at_its_deadline_and_folds_batchnorm_on_writing(tmp_path,
                                                                           monkeypatch,
                                                                           keep_threads):
    # a plan far past the budget: the run ends at budget - reserve, before the fold
    monkeypatch.setattr(gpu_train_lite, "plan_iterations", lambda *a: (10 ** 6, 9 * 10 ** 5))
    out = tmp_path / "out"
    assert gpu_train_lite.main(["--smoke", "--model", "gray", "--out", str(out),
                                "--budget-s", "16", "--eval-reserve-s", "4", "--measure-s", "1",
                                "--set", "train.checkpoint_save=1000"]) == 0
    result = json.loads((out / "fbcnn_gray_lite.json").read_text())
    training = result["training"]
    assert training["stopped_at_deadline"] and 0 < training["iterations"] < 10 ** 6
    weights = str(out / "fbcnn_gray_lite.safetensors")
    with safe_open(weights, framework="pt") as f:  # the iteration reached, not a checkpoint's
        assert f.metadata()["iterations"] == str(training["iterations"])
    kwargs = read_fbcnn_kwargs(weights)
    assert kwargs["act_mode"] == "R" and kwargs["in_nc"] == 1


def test_gpu_train_lite_names_a_missing_data_folder(tmp_path, capsys):
    assert gpu_train_lite.main(["--model", "color", "--data", str(tmp_path / "none"),
                                "--device", "cpu", "--out", str(tmp_path / "out"),
                                "--budget-s", "600"]) == 2
    assert "copy the training tiles to trainsets/train_pack" in capsys.readouterr().err


@pytest.mark.slow
def test_gpu_train_lite_smoke_runs_from_a_bare_checkout(tmp_path):
    run = subprocess.run([sys.executable, "-S", "-m", "benchmarks.gpu_train_lite", "--smoke",
                          "--model", "color", "--out", str(tmp_path / "out"), "--workdir",
                          str(tmp_path / "work")], cwd=REPO_ROOT, env=_bare_environment(tmp_path),
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert (tmp_path / "out" / "fbcnn_color_lite.safetensors").is_file()


def test_projection_benchmark_reports_each_stage_per_megapixel(tmp_path, capsys):
    path = tmp_path / "p.json"
    assert bench_projection.main(["--limit", "1", "--repeat", "1", "--json", str(path)]) == 0
    result = json.loads(path.read_text())
    stages = {row["stage"]: row for row in result["rows"]}
    assert list(stages) == ["read coefficients", "network", "project (calibrated)",
                            "project (posterior)", "calibrated: twin's network pass",
                            "calibrated: arithmetic"]
    parts = (stages["calibrated: twin's network pass"]["s_per_mp"]
             + stages["calibrated: arithmetic"]["s_per_mp"])
    assert parts == pytest.approx(stages["project (calibrated)"]["s_per_mp"], rel=1e-3)
    read, net = stages["read coefficients"]["s_per_mp"], stages["network"]["s_per_mp"]
    for method in ("calibrated", "posterior"):
        own = stages[f"project ({method})"]["s_per_mp"]
        assert stages[f"project ({method})"]["share"] == pytest.approx((read + own)
                                                                       / (read + own + net))
    assert all(row["s_per_mp"] > 0 for row in stages.values())
    assert stages["network"]["vs_network"] == 1
    # --limit 1: LIVE1_color's first image, bikes.png, 768x512
    assert result["model"] == "fbcnn_color_lite" and result["megapixels"] == 768 * 512 / 1e6


def test_no_harm_scores_main_restore_outputs_against_the_clean_images(tmp_path, capsys):
    """With the `jpeg` pseudo-model main_restore returns each file as decoded: every gain is
    0 exactly and the clean originals come back identical (infinite PSNR)."""
    path = tmp_path / "nh.json"
    assert no_harm.main(["--testset", "LIVE1_color", "Classic5", "--qf", "20", "95", "--limit",
                         "2", "--variant", "default", "header", "--model", "jpeg",
                         "--gray-model", "jpeg", "--clean", "--json", str(path), "--plot",
                         str(tmp_path / "nh.png")]) == 0
    rows = json.loads(path.read_text())["rows"]
    scored = [r for r in rows if r["qf"] != "clean"]
    assert [(r["testset"], r["variant"], r["qf"]) for r in scored] == [
        (t, v, q) for t in ("LIVE1_color", "Classic5") for q in (20, 95)
        for v in ("default", "header")]
    assert all(r["n"] == 2 and r["gain"] == 0 and r["worst"] == 0 and r["losers"] == 0
               for r in scored)
    assert {r["jpeg"] > 25 for r in scored} == {True}
    clean = [r for r in rows if r["qf"] == "clean"]
    assert len(clean) == 2 and all(r["psnr"] == float("inf") for r in clean)
    assert (tmp_path / "nh.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_qf_head_evaluation_compresses_at_the_chroma_sampling_asked(tmp_path):
    path = tmp_path / "qf_head.json"
    assert eval_qf_head.main(["--model", "fbcnn_color_lite", "--limit", "2", "--qf", "30",
                              "--sampling", "444", "--device", "cpu", "--json", str(path)]) == 0
    result = json.loads(path.read_text())
    model = load_model("fbcnn_color_lite")
    live1 = os.path.join(REPO_ROOT, "testsets", "LIVE1_color")
    images = [imread_uint(os.path.join(live1, name)) for name in sorted(os.listdir(live1))[:2]]
    expected = [predict_qf(model, jpeg(img, 30, "444")) for img in images]
    assert result["sampling"] == "444"
    assert result["rows"][0]["mean"] == pytest.approx(np.mean(expected))


def test_cpu_engine_benchmark_compares_every_engine_with_pytorch_fp32(tmp_path, capsys):
    path = tmp_path / "engines.json"
    variants = ["torch fp32", "torch fp32 channels_last", "torch bf16 channels_last",
                "onnxruntime fp32", "openvino fp32"]
    assert bench_cpu_engines.main(["--lite-mp", "0.02", "--released-mp", "--repeat", "1",
                                   "--psnr-qf", "10", "--psnr-limit", "1", "--variants",
                                   *variants, "--json", str(path)]) == 0
    result = json.loads(path.read_text())
    rows = {row["variant"]: row for row in result["rows"]}
    expected = [v for v in variants if v != "openvino fp32" or openvino_available()]
    assert list(rows) == expected and rows["torch fp32"]["max_diff"] == 0
    for name, row in rows.items():  # fp32 engines: a 16-bit level at most; bf16 further off
        assert row["mp_per_s"] > 0 and row["peak_gib"] > 0
        assert (row["max_diff"] <= 2 / 65535) == ("bf16" not in name), name
    psnr_rows = {row["variant"]: row for row in result["psnr"]}
    assert psnr_rows["torch fp32"]["delta"] == 0
    assert abs(psnr_rows["torch fp32 channels_last"]["delta"]) < 1e-3
    assert "AVX-512 bf16:" in capsys.readouterr().out


@pytest.mark.parametrize("gray", [False, True])
def test_photo_benchmark_times_main_restore_against_plain_forwards(tmp_path, gray):
    path = tmp_path / "photo.json"
    assert bench_restore_photo.main(["--mp", "0.05", "--repeat", "1", "--variant", "torch",
                                     "--breakdown", "--json", str(path)] + ["--gray"] * gray) == 0
    result = json.loads(path.read_text())
    assert result["channels"] == (1 if gray else 3)
    rows = result["rows"]
    assert [r["variant"] for r in rows] == ["plain forwards", "main_restore torch"]
    assert rows[0]["vs_baseline"] == 1.0
    assert rows[1]["vs_baseline"] == pytest.approx(rows[1]["seconds"] / rows[0]["seconds"])
    part, = result["breakdown"]  # every part found: a renamed function would leave it at 0
    assert all(part[k] > 0 for k in ("startup", "network", "projection", "write", "rest"))


@pytest.mark.parametrize("gray", [False, True])
def test_photo_benchmark_runs_main_restore_with_the_model_it_is_given(tmp_path, monkeypatch,
                                                                      gray):
    """`--model FILE`: the baseline's network and main_restore's (`--gray-model` for a gray
    photo), every timed run given it."""
    torch.manual_seed(0)
    n = 1 if gray else 3
    net = FBCNN(in_nc=n, out_nc=n, nc=[8, 16, 32, 64], nb=1).eval()
    model = str(tmp_path / "tiny.safetensors")
    save_network(model, net.state_dict(), infer_fbcnn_kwargs(net.state_dict()))
    commands, real_run = [], subprocess.run
    monkeypatch.setattr(bench_restore_photo.subprocess, "run",
                        lambda command, **kw: commands.append(command) or real_run(command, **kw))
    path = tmp_path / "photo.json"
    assert bench_restore_photo.main(["--mp", "0.05", "--repeat", "1", "--variant", "torch",
                                     "--model", model, "--breakdown", "--json", str(path)]
                                    + ["--gray"] * gray) == 0
    flag = "--gray-model" if gray else "--model"
    assert len(commands) == 3  # the untimed run, the timed one, the profiled one
    assert all(command[command.index(flag) + 1] == model for command in commands)
    assert json.loads(path.read_text())["model"] == model


def test_the_readme_figure_is_main_restores_restoration(tmp_path, capsys):
    out = tmp_path / "figure.png"
    assert figure_restored.main(["--qf", "10", "--crop", "0", "0", "64", "-o", str(out)]) == 0
    figure = imread_uint(str(out))
    assert figure.shape == (128, 3 * 128, 3)  # one row: JPEG, restored, original, 2x
    clean = imread_uint(os.path.join(REPO_ROOT, "testsets", "LIVE1_color", "parrots.png"))
    # the original's crop, enlarged, below the label band
    np.testing.assert_array_equal(figure[24:, 256:][::2, ::2], clean[12:64, :64])
    assert "QF 10: JPEG " in capsys.readouterr().out


def test_the_graphics_set_is_a_function_of_its_seed_with_neutral_copies(tmp_path, capsys):
    args = ["--per-kind", "1", "--size", "48"]
    assert make_graphics_set.main([str(tmp_path / "a"), *args]) == 0
    assert capsys.readouterr().out == f"wrote 10 graphics to {tmp_path / 'a'}\n"
    assert make_graphics_set.main([str(tmp_path / "b"), *args]) == 0
    names = sorted(os.listdir(tmp_path / "a"))
    assert names == sorted(f"{k}_0{s}.png" for k in GRAPHIC_KINDS for s in ("", "_neutral"))
    for name in names:
        a, b = (imread_uint(str(tmp_path / d / name)) for d in "ab")
        assert a.shape == (48, 48, 3) and np.array_equal(a, b)
        if "neutral" in name:
            assert np.array_equal(a, neutral_copy(imread_uint(
                str(tmp_path / "a" / name.replace("_neutral", "")))))
    assert make_graphics_set.main([str(tmp_path / "a"), *args]) == 2  # never over a set
    assert "not empty; give a new folder" in capsys.readouterr().err


def test_no_harm_counts_an_exact_jpeg_kept_exact_as_no_gain_and_one_made_inexact_as_a_loss():
    row = no_harm._row("Graphics", "default", 95, ["kept", "lost", "photo"],
                       [np.inf, np.inf, 30.0], [np.inf, 40.0, 31.0], 1.0)
    assert row["images"] == {"kept": 0.0, "lost": -np.inf, "photo": 1.0}
    assert row["losers"] == 1 and row["worst"] == -np.inf
