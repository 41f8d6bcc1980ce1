"""models/model_zoo.py: downloads against a local HTTP server, safe loading, arch inference."""
import hashlib
import http.server
import json
import os
import pickle
import threading

import pytest
import torch
from safetensors.torch import save_file

from models import model_zoo
from models.model_zoo import (MODEL_ZOO, ZooEntry, build_from_state_dict, download,
                              infer_fbcnn_kwargs, load_model, load_state_dict_file, resolve_weights)
from models.network_fbcnn import FBCNN
from tests.conftest import TouchOnUnpickle, closed_port
from tests.test_image import _FullDisk
from utils import checkpoint as ckpt
from utils import fileio
from utils.errors import UserError
from utils.fileio import WriteError

PAYLOAD = os.urandom(300_000)
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path.endswith("/truncated.bin"):
            self.send_response(200)
            self.send_header("Content-Length", str(len(PAYLOAD)))
            self.end_headers()
            self.wfile.write(PAYLOAD[:1000])
            self.wfile.flush()
            self.close_connection = True
            return
        if self.path.endswith("/missing.bin"):
            self.send_error(404)
            return
        name = self.path.rsplit("/", 1)[-1]
        body = self.server.files.get(name, PAYLOAD)
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.files = {}
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_download_good_file(server, tmp_path):
    _, url = server
    dest = tmp_path / "zoo" / "good.bin"
    assert download(f"{url}/good.bin", str(dest), PAYLOAD_SHA, progress=False) == str(dest)
    assert dest.read_bytes() == PAYLOAD
    assert os.listdir(tmp_path / "zoo") == ["good.bin"]  # no temporary file left


def test_download_wrong_hash_keeps_nothing(server, tmp_path):
    _, url = server
    dest = tmp_path / "bad.bin"
    with pytest.raises(UserError) as err:
        download(f"{url}/bad.bin", str(dest), "0" * 64, progress=False)
    message = str(err.value)
    assert f"{url}/bad.bin" in message and str(dest) in message and "not kept" in message
    assert os.listdir(tmp_path) == []


def test_download_truncated_transfer_keeps_nothing(server, tmp_path):
    _, url = server
    dest = tmp_path / "cut.bin"
    with pytest.raises(UserError, match="truncated.bin"):
        download(f"{url}/truncated.bin", str(dest), PAYLOAD_SHA, progress=False, timeout=5)
    assert os.listdir(tmp_path) == []


def test_download_server_down(tmp_path):
    url = f"http://127.0.0.1:{closed_port()}/fbcnn_color.pth"
    dest = tmp_path / "fbcnn_color.pth"
    with pytest.raises(UserError) as err:
        download(url, str(dest), PAYLOAD_SHA, progress=False, timeout=5)
    assert url in str(err.value) and "by hand" in str(err.value) and str(dest) in str(err.value)
    assert os.listdir(tmp_path) == []


def test_download_to_a_full_disk_names_the_file_and_keeps_nothing(server, tmp_path,
                                                                 monkeypatch):
    _, url = server
    dest = tmp_path / "full.bin"
    monkeypatch.setattr(fileio, "open", _FullDisk(100_000), raising=False)
    with pytest.raises(WriteError) as err:
        download(f"{url}/full.bin", str(dest), PAYLOAD_SHA, progress=False)
    assert str(err.value).startswith(f"{dest}: cannot write (No space left on device)")
    assert os.listdir(tmp_path) == []


def test_download_http_error(server, tmp_path):
    _, url = server
    with pytest.raises(UserError, match="404"):
        download(f"{url}/missing.bin", str(tmp_path / "m.bin"), PAYLOAD_SHA, progress=False)
    assert os.listdir(tmp_path) == []


@pytest.fixture
def tiny_zoo(monkeypatch, server, tmp_path):
    """Register a tiny FBCNN under the name fbcnn_color, served by the local server."""
    httpd, url = server
    torch.manual_seed(0)
    net = FBCNN(nc=[8, 16, 32, 64], nb=1)
    path = tmp_path / "src.pth"
    torch.save(net.state_dict(), path)
    data = path.read_bytes()
    httpd.files["fbcnn_color.pth"] = data
    monkeypatch.setitem(MODEL_ZOO, "fbcnn_color",
                        ZooEntry("fbcnn_color.pth", hashlib.sha256(data).hexdigest(), 3))
    monkeypatch.setenv("FBCNN_MODEL_URL", url)
    model_dir = tmp_path / "model_zoo"
    monkeypatch.setenv("FBCNN_MODEL_DIR", str(model_dir))
    return net, model_dir


def test_load_model_by_name_downloads_once(tiny_zoo):
    net, model_dir = tiny_zoo
    model = load_model("fbcnn_color", progress=False)
    assert (model_dir / "fbcnn_color.pth").is_file()
    for key, value in net.state_dict().items():
        assert torch.equal(model.net.state_dict()[key], value)
    assert model.in_nc == 3 and model.name == "fbcnn_color" and not model.net.training
    mtime = os.path.getmtime(model_dir / "fbcnn_color.pth")
    load_model("fbcnn_color", progress=False)  # verified and reused, not downloaded again
    assert os.path.getmtime(model_dir / "fbcnn_color.pth") == mtime


def test_existing_file_with_wrong_hash_is_an_error(tiny_zoo):
    _, model_dir = tiny_zoo
    model_dir.mkdir()
    (model_dir / "fbcnn_color.pth").write_bytes(b"not the weights")
    with pytest.raises(UserError, match="expected"):
        resolve_weights("fbcnn_color", progress=False)


def test_offline_error_names_the_environment_variables_and_the_models_at_hand(tmp_path,
                                                                              monkeypatch):
    monkeypatch.setenv("FBCNN_MODEL_URL", f"http://127.0.0.1:{closed_port()}/mirror")
    monkeypatch.setenv("FBCNN_MODEL_DIR", str(tmp_path))
    with pytest.raises(UserError) as err:
        load_model("fbcnn_color", progress=False)
    message = str(err.value)
    assert message.startswith("--model fbcnn_color: cannot download http://127.0.0.1:")
    assert ("or set FBCNN_MODEL_DIR to a folder that holds fbcnn_color.pth, or FBCNN_MODEL_URL "
            "to a mirror of http://127.0.0.1:") in message
    bundled = [n for n, e in MODEL_ZOO.items() if e.bundled]
    assert "models already in" not in message  # none is there yet
    assert message.endswith("models that ship with the repository, no download needed: "
                            + ", ".join(bundled))
    (tmp_path / MODEL_ZOO["fbcnn_gray"].filename).write_bytes(b"weights")
    with pytest.raises(UserError) as err:
        load_model("fbcnn_color", progress=False)
    assert f"models already in {tmp_path}, no download needed: fbcnn_gray;" in str(err.value)
    assert model_zoo.available_models() == ["fbcnn_gray", *bundled]


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_load_model_by_path_infers_architecture(tmp_path, suffix):
    torch.manual_seed(1)
    net = FBCNN(in_nc=1, out_nc=1, nc=[8, 16, 32, 48], nb=2).eval()
    path = tmp_path / f"mine{suffix}"
    if suffix == ".pth":
        torch.save(net.state_dict(), path)
    else:
        save_file(net.state_dict(), str(path))
    model = load_model(str(path))
    assert model.in_nc == 1 and model.name == "mine"
    x = torch.rand(1, 1, 20, 20)
    with torch.no_grad():
        torch.testing.assert_close(model.net(x)[0], net(x)[0], rtol=0, atol=0)


def test_safetensors_metadata_tells_what_the_keys_cannot(tmp_path):
    """LeakyReLU and max pooling have the keys of ReLU and average pooling: only the metadata
    written with training checkpoints tells them apart."""
    torch.manual_seed(2)
    kwargs = dict(in_nc=1, out_nc=1, nc=[8, 16, 32, 64], nb=1, act_mode="L",
                  downsample_mode="maxpool", upsample_mode="convtranspose")
    net = FBCNN(**kwargs).eval()
    with_meta, without = tmp_path / "meta.safetensors", tmp_path / "plain.safetensors"
    save_file(net.state_dict(), str(with_meta), metadata={"fbcnn_kwargs": json.dumps(kwargs)})
    save_file(net.state_dict(), str(without))
    x = torch.rand(1, 1, 24, 24) - 0.5
    with torch.no_grad():
        expected = net(x)[0]
        assert torch.equal(load_model(str(with_meta)).net(x)[0], expected)
        assert not torch.allclose(load_model(str(without)).net(x)[0], expected, atol=1e-4)
    bad = tmp_path / "bad.safetensors"
    save_file(net.state_dict(), str(bad), metadata={"fbcnn_kwargs": '{"depth": 3}'})
    with pytest.raises(UserError, match=r"bad\.safetensors: metadata fbcnn_kwargs has unknown "
                                        r"keys depth"):
        load_model(str(bad))
    wrong = tmp_path / "wrong.safetensors"
    save_file(net.state_dict(), str(wrong), metadata={"fbcnn_kwargs": '{"nb": 2}'})
    with pytest.raises(UserError, match=r"wrong\.safetensors: keys or shapes do not match"):
        load_model(str(wrong))


@pytest.mark.parametrize("kwargs", [
    dict(), dict(act_mode="BR"), dict(downsample_mode="avgpool", upsample_mode="upconv"),
    dict(upsample_mode="pixelshuffle", nb=3), dict(in_nc=1, out_nc=3, nc=[4, 8, 12, 16]),
    dict(global_skip=True, skip_gate=True),  # the gate's keys say both
])
def test_infer_kwargs_round_trip(kwargs):
    full = dict(in_nc=3, out_nc=3, nc=[8, 16, 32, 64], nb=1, act_mode="R",
                downsample_mode="strideconv", upsample_mode="convtranspose",
                global_skip=False, skip_gate=False)  # an ungated skip: only metadata says
    full.update(kwargs)
    assert infer_fbcnn_kwargs(FBCNN(**full).state_dict()) == full


def test_wrapped_and_ddp_prefixed_state_dicts_load(tmp_path):
    net = FBCNN(nc=[8, 16, 32, 64], nb=1)
    wrapped = {"params": {f"module.{k}": v for k, v in net.state_dict().items()}}
    torch.save(wrapped, tmp_path / "w.pth")
    loaded = load_state_dict_file(str(tmp_path / "w.pth"))
    assert set(loaded) == set(net.state_dict())


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_pickled_code_is_never_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open("evil.pth", "wb") as f:
        pickle.dump({"m_head.weight": _Evil()}, f)
    with pytest.raises(UserError, match="evil.pth"):
        load_state_dict_file("evil.pth")
    assert not os.path.exists("pwned")


def test_torch_zip_file_with_a_malicious_pickle_is_refused_without_running_it(tmp_path):
    sentinel = tmp_path / "pwned"
    weights = FBCNN(nc=[8, 16, 32, 64], nb=1).state_dict()
    evil = tmp_path / "evil.pth"
    torch.save({**weights, "m_head.weight": TouchOnUnpickle(sentinel)}, evil)  # zip, data.pkl
    with open(evil, "rb") as f:
        assert f.read(2) == b"PK"
    with pytest.raises(UserError) as err:
        load_state_dict_file(str(evil))
    assert str(err.value).startswith(f"{evil}: not a loadable state dict (corrupt, or holds "
                                      "objects other than tensors, which are not loaded (")
    assert "weights_only" not in str(err.value)  # torch's advice to run the file's code
    assert not sentinel.exists()
    disguised = tmp_path / "evil.safetensors"
    disguised.write_bytes(evil.read_bytes())
    with pytest.raises(UserError, match="evil.safetensors: not a loadable state dict"):
        load_model(str(disguised))
    assert not sentinel.exists()
    # the unsafe loader would have run it: the test can fail
    torch.load(evil, weights_only=False)
    assert sentinel.exists()


def test_tampered_training_state_is_refused_without_running_it(tmp_path):
    sentinel = tmp_path / "pwned"
    models = str(tmp_path / "models")
    ckpt.save_checkpoint(models, 2, {"w": torch.zeros(3)}, {"iteration": 2})
    state = os.path.join(models, "2_state.pth")
    torch.save({"iteration": 2, "rng": TouchOnUnpickle(sentinel)}, state)
    manifest = os.path.join(models, "2_done.json")
    with open(manifest) as f:
        data = json.load(f)
    data["files"]["2_state.pth"] = os.path.getsize(state)  # as if the marker were forged too
    with open(manifest, "w") as f:
        json.dump(data, f)
    assert ckpt.latest_checkpoint(models) == 2
    with pytest.raises(UserError, match=r"2_state\.pth: cannot load checkpoint"):
        ckpt.load_training_state(models, 2)
    assert not sentinel.exists()


def test_corrupt_and_foreign_files_are_clear_errors(tmp_path):
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"\x80\x02garbage" * 10)
    with pytest.raises(UserError, match="corrupt.pth: not a loadable state dict"):
        load_state_dict_file(str(corrupt))
    foreign = tmp_path / "foreign.pth"
    torch.save({"conv.weight": torch.zeros(1)}, foreign)
    with pytest.raises(UserError, match="not an FBCNN state dict"):
        build_from_state_dict(load_state_dict_file(str(foreign)), str(foreign))
    broken = FBCNN(nc=[8, 16, 32, 64], nb=1).state_dict()
    broken["m_tail.bias"] = torch.zeros(5)
    with pytest.raises(UserError, match="do not match"):
        build_from_state_dict(broken)


def test_unknown_name_lists_known_models():
    with pytest.raises(UserError) as err:
        load_model("fbcnn_colour")
    assert "fbcnn_color" in str(err.value) and "jpeg" in str(err.value)


def test_jpeg_pseudo_model():
    model = load_model("jpeg")
    assert model.net is None and model.in_nc is None


def test_release_urls_follow_the_spec():
    assert model_zoo.RELEASE_URL == "https://github.com/jiaxi-jiang/FBCNN/releases/download/v1.0/"
    assert {e.filename for e in MODEL_ZOO.values()} >= {
        "fbcnn_color.pth", "fbcnn_gray.pth", "fbcnn_gray_double.pth"}


def test_model_labels_keep_checkpoints_of_different_runs_apart(tmp_path):
    assert model_zoo.model_label("fbcnn_color") == "fbcnn_color"
    assert model_zoo.model_label("jpeg") == "jpeg"
    assert model_zoo.model_label(str(tmp_path / "weights" / "mine.safetensors")) == "mine"
    for task in ("color_run", "gray_run"):
        path = tmp_path / "deblocking" / task / "models" / "5000_G.safetensors"
        assert model_zoo.model_label(str(path)) == f"{task}_5000_G"
    assert model_zoo.model_label(str(tmp_path / "5000_G.pth")) == "5000_G"  # not in a run


@pytest.fixture
def bundled_lite(tmp_path, monkeypatch):
    """A zoo with a bundled `tiny_lite` (3 channels) in a stand-in for the repository's
    model_zoo/, the model folder pointed elsewhere; returns (repository folder, network)."""
    repo_zoo, elsewhere = tmp_path / "repo_zoo", tmp_path / "elsewhere"
    repo_zoo.mkdir()
    elsewhere.mkdir()
    torch.manual_seed(3)
    net = FBCNN(in_nc=3, out_nc=3, nc=[8, 16, 32, 64], nb=1).eval()
    path = ckpt.save_network(str(repo_zoo / "tiny_lite.safetensors"), net.state_dict(),
                             infer_fbcnn_kwargs(net.state_dict()), dtype=torch.float16)
    with open(path, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    monkeypatch.setattr(model_zoo, "DEFAULT_MODEL_DIR", str(repo_zoo))
    monkeypatch.setitem(MODEL_ZOO, "tiny_lite", ZooEntry("tiny_lite.safetensors", sha, 3,
                                                         bundled=True))
    monkeypatch.setenv("FBCNN_MODEL_DIR", str(elsewhere))
    monkeypatch.setenv("FBCNN_MODEL_URL", f"http://127.0.0.1:{closed_port()}/never")
    monkeypatch.setattr(model_zoo, "_fallbacks_told", set())
    return repo_zoo, net


def test_a_bundled_model_loads_from_the_repository_whatever_the_model_folder(bundled_lite):
    repo_zoo, net = bundled_lite
    loaded = load_model("tiny_lite", progress=False)
    assert loaded.name == "tiny_lite" and loaded.in_nc == 3
    for key, value in net.state_dict().items():
        assert torch.equal(loaded.net.state_dict()[key], value.half().float())
    assert "tiny_lite" in model_zoo.available_models()


def test_a_bundled_model_is_verified_and_never_downloaded(bundled_lite):
    repo_zoo, _ = bundled_lite
    (repo_zoo / "tiny_lite.safetensors").write_bytes(b"tampered")
    with pytest.raises(UserError, match=r"expected .* for tiny_lite; restore the repository's "
                                        r"copy \(git checkout -- model_zoo/tiny_lite"):
        load_model("tiny_lite", progress=False)
    os.remove(repo_zoo / "tiny_lite.safetensors")
    with pytest.raises(UserError, match=r"tiny_lite ships with the repository as "
                                        r"model_zoo/tiny_lite.safetensors, which is missing"):
        load_model("tiny_lite", progress=False)  # the closed port is never asked


def test_default_model_is_the_released_one_at_hand_else_the_bundled_lite(bundled_lite, caplog):
    repo_zoo, _ = bundled_lite
    with caplog.at_level("INFO", logger="fbcnn"):
        assert model_zoo.default_model("fbcnn_color", "tiny_lite") == "tiny_lite"
        assert model_zoo.default_model("fbcnn_color", "tiny_lite") == "tiny_lite"
    told = [r.getMessage() for r in caplog.records if "using the bundled" in r.getMessage()]
    assert len(told) == 1 and "fbcnn_color.pth is not in" in told[0]  # said once
    assert model_zoo.default_model("fbcnn_color", "not_registered") == "fbcnn_color"
    (repo_zoo.parent / "elsewhere" / MODEL_ZOO["fbcnn_color"].filename).write_bytes(b"x")
    assert model_zoo.default_model("fbcnn_color", "tiny_lite") == "fbcnn_color"
