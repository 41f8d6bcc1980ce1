"""hubconf.py: torch.hub.load(repo, NAME, source='local') for every name in MODEL_ZOO."""
import dataclasses
import hashlib
import os

import pytest
import torch

from models.model_zoo import MODEL_ZOO, load_state_dict_file
from models.network_fbcnn import FBCNN
from utils.checkpoint import save_network
from utils.errors import UserError

TINY = dict(nc=[8, 16, 32, 64], nb=1)


def _place_weights(folder, monkeypatch, name):
    """Write a tiny state dict as NAME's weight file and register its real sha256.

    The zoo's own check stays active: the entry is replaced (for this test only) by one whose
    sha256 is that of the file written, so loading still verifies the file.
    """
    entry = MODEL_ZOO[name]
    torch.manual_seed(len(name))
    net = FBCNN(in_nc=entry.in_nc, out_nc=entry.in_nc, **TINY).eval()
    path = folder / entry.filename
    if entry.filename.endswith(".safetensors"):
        save_network(str(path), net.state_dict())
    else:
        torch.save(net.state_dict(), path)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    monkeypatch.setitem(MODEL_ZOO, name, dataclasses.replace(entry, sha256=sha))
    return net


@pytest.mark.parametrize("name", sorted(MODEL_ZOO))
def test_every_zoo_name_loads_through_torch_hub(monkeypatch, repo_root, offline_zoo, name):
    offline_zoo.mkdir()
    expected = _place_weights(offline_zoo, monkeypatch, name)
    net = torch.hub.load(repo_root, name, source="local", pretrained=True)
    assert isinstance(net, FBCNN) and not net.training
    x = torch.rand(1, MODEL_ZOO[name].in_nc, 20, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = net(x), expected(x)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_model_dir_argument_and_sha_check(tmp_path, monkeypatch, repo_root):
    _place_weights(tmp_path, monkeypatch, "fbcnn_gray")
    monkeypatch.delenv("FBCNN_MODEL_DIR", raising=False)
    net = torch.hub.load(repo_root, "fbcnn_gray", source="local", model_dir=str(tmp_path))
    assert net.in_nc == 1 and net.nc == TINY["nc"]
    (tmp_path / MODEL_ZOO["fbcnn_gray"].filename).write_bytes(b"tampered")
    with pytest.raises(UserError, match="sha256"):
        torch.hub.load(repo_root, "fbcnn_gray", source="local", model_dir=str(tmp_path))


def test_untrained_architecture(repo_root):
    net = torch.hub.load(repo_root, "fbcnn_color", source="local", pretrained=False)
    assert (net.in_nc, net.out_nc, net.nc, net.nb) == (3, 3, [64, 128, 256, 512], 4)
    assert sum(p.numel() for p in net.parameters()) == 71_921_796  # the released colour model


@pytest.mark.parametrize("name", sorted(n for n, e in MODEL_ZOO.items() if e.bundled))
def test_the_bundled_models_load_through_torch_hub_as_shipped(repo_root, offline_zoo, name):
    """No weights placed, no download possible: pretrained=True gives the shipped file's
    weights (fp16 in the file, fp32 in the network), and pretrained=False builds the same
    architecture (the zoo entry's arch agrees with the file's metadata), untrained."""
    shipped = load_state_dict_file(os.path.join(repo_root, "model_zoo", MODEL_ZOO[name].filename))
    net = torch.hub.load(repo_root, name, source="local", pretrained=True)
    untrained = torch.hub.load(repo_root, name, source="local", pretrained=False)
    assert net.state_dict().keys() == shipped.keys() == untrained.state_dict().keys()
    for key, value in net.state_dict().items():
        assert torch.equal(value, shipped[key].to(value.dtype)), key
    assert any(not torch.equal(untrained.state_dict()[k], net.state_dict()[k])
               for k in shipped if shipped[k].is_floating_point())
