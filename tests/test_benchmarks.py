"""benchmarks/: the analytic FLOP count, peak-memory reading and tiny end-to-end runs of the
inference, training-step and loader benchmarks (their tables and JSON)."""
import json
import os

import numpy as np
import pytest
import torch

from benchmarks import (bench_inference, bench_loader, bench_test_script, bench_train, eval_fbcnn_d,
                        eval_qf_head, gpu_session)
from benchmarks.benchlib import PeakMemory, fbcnn_conv_flops
from data.jpeg import double_jpeg, jpeg, shift_crop
from models.inference import predict_qf, restore
from models.model_zoo import load_model
from models.network_fbcnn import FBCNN
from tests.conftest import REPO_ROOT
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
    full = FBCNN()  # nc 64..512, nb 4: the 5.41 TFLOP per megapixel
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
    assert rows[3]["megapixels"] == pytest.approx(0.05, rel=0.02)
    assert rows[1]["max_diff"] == rows[2]["max_diff"] and rows[4]["max_diff"] == rows[5]["max_diff"]
    assert all(r["mp_per_s"] > 0 and r["peak_gib"] > 0 for r in rows)
    assert "| LIVE1_color (1 images) | fp32" in capsys.readouterr().out


def test_train_benchmark_writes_its_table_and_json(tmp_path, capsys, keep_threads):
    path = tmp_path / "train.json"
    assert bench_train.main(["--device", "cpu", "--threads", "1", "--set", "netG.nc=[4,8,8,16]",
                             "--set", "netG.nb=1", "--set", "datasets.train.H_size=32",
                             "--set", "datasets.train.dataloader_batch_size=2", "--amp", "off",
                             "bf16", "--steps", "1", "--warmup", "1", "--json", str(path)]) == 0
    rows = json.loads(path.read_text())["rows"]
    assert [(r["amp"], r["compile"], r["batch"], r["patch"]) for r in rows] == [
        ("off", "off", 2, 32), ("bf16", "off", 2, 32)]
    assert all(r["patches_per_s"] > 0 and r["tflops"] > 0 for r in rows)
    table = [line.split("|")[1:4] for line in capsys.readouterr().out.splitlines()
             if line.startswith("| ") and "patches/s" not in line]
    assert [[cell.strip() for cell in row] for row in table] == [["off", "False", "off"],
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


def test_test_script_benchmark_times_the_runner_per_stage(tmp_path, capsys, keep_threads):
    folder = _noise_images(tmp_path / "set", 2, (48, 64, 3), seed=1)
    path = tmp_path / "script.json"
    assert bench_test_script.main(["--random-init", "--nc", "4", "8", "8", "16", "--nb", "1",
                                   "--device", "cpu", "--testset", str(folder), "--qf", "10",
                                   "--workers", "0", "2", "--threads", "1",
                                   "--json", str(path)]) == 0
    rows = json.loads(path.read_text())["rows"]
    assert [(r["qf"], r["workers"], r["n_images"]) for r in rows] == [(10, 0, 2), (10, 2, 2)]
    assert rows[0]["megapixels"] == pytest.approx(2 * 48 * 64 / 1e6)
    assert rows[0]["psnr"] == rows[1]["psnr"]  # serial and pipelined runs score alike
    assert all(r["network_s"] > 0 and r["metrics_s"] > 0 for r in rows)


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


def test_fbcnn_d_evaluation_rejects_a_colour_model_before_estimating(tmp_path, capsys,
                                                                     monkeypatch):
    weights = tmp_path / "tiny_color.pth"
    torch.save(FBCNN(in_nc=3, out_nc=3, nc=[8, 16, 32, 64], nb=1).state_dict(), weights)

    def no_pool(*args, **kwargs):
        raise AssertionError("the estimator ran before the model was checked")

    monkeypatch.setattr(eval_fbcnn_d, "Pool", no_pool)
    with pytest.raises(SystemExit):
        eval_fbcnn_d.main(["--testset", "Classic5", "--workers", "1", "--model", str(weights),
                           "--device", "cpu"])
    assert "the protocol is grayscale; give a 1-channel model" in capsys.readouterr().err


def test_gpu_session_steps_mirror_the_gpu_commands_on_the_cpu():
    for name, limit, gpu_args, smoke_args in gpu_session.STEPS:
        assert gpu_args[0] == smoke_args[0] and 0 < limit <= 150, name
        assert ("cuda" in gpu_args) == (name != "gpu_tests") and "cuda" not in smoke_args
        assert ("{json}" in gpu_args) == ("{json}" in smoke_args) == (name != "gpu_tests")


def test_gpu_session_spends_no_step_past_its_budget(tmp_path):
    result = gpu_session.run_session(str(tmp_path), smoke=True, budget_s=0)
    assert [s["status"] for s in result["steps"]] == ["not started (budget spent)"] * 6
    assert json.loads((tmp_path / "gpu_session.json").read_text())["steps"] == result["steps"]


@pytest.mark.slow
def test_gpu_session_smoke_runs_every_step_and_merges_the_results(tmp_path):
    assert gpu_session.main(["--smoke", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "gpu_session.json").read_text())
    assert [s["name"] for s in result["steps"]] == [s[0] for s in gpu_session.STEPS]
    assert all(s["status"] == "ok" for s in result["steps"])
    by_name = {s["name"]: s for s in result["steps"]}
    assert ([r["input"].split()[0] for r in by_name["inference_12mp"]["results"]["rows"]] ==
            ["synthetic"] * 3)  # --limit 0: the synthetic photo alone, untiled and two caches
    assert by_name["test_script_fp32"]["results"]["rows"][0]["n_images"] == 5
    assert by_name["train"]["results"]["rows"][0]["patches_per_s"] > 0
    log = (tmp_path / "gpu_session.log").read_text()
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
