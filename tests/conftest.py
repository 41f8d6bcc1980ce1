"""Shared fixtures: the locations of the repository and of the test data (pytest.ini puts the
repository on the path). The small references live in tests/reference/; only the large test
sets (BSDS500, McMaster) are read from outside the clone, by `shared_testset`: from the folder
$FBCNN_TESTSETS_ROOT names (the one main_test_fbcnn_*.py takes as --testsets-root), else from
the project's data folder beside the clone where there is one."""
import os

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE = os.path.join(REPO_ROOT, "tests", "reference")
SHARED = os.path.join(os.path.dirname(REPO_ROOT), "shared")


def calibrated_projection(img_E, data, network):
    """The calibrated projection of `img_E`, the restoration of the JPEG bytes `data`, step by
    step: its twin restored by `network` (the network and options that made `img_E`), the
    shares the twin teaches, the projection with them."""
    from data.jpeg_projection import make_twin, project, read_coefficients, twin_shares
    coefficients = read_coefficients(data)
    twin = make_twin(img_E, coefficients)
    return project(img_E, coefficients, "calibrated", shares=twin_shares(twin,
                                                                          network(twin.image)))


class TouchOnUnpickle:
    """A pickled object whose unpickling runs `touch PATH`: what the weight loaders must never
    let run (the file at PATH tells)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def with_skip_gate(net, std, seed):
    """A copy of `net` (a plain FBCNN) with a skip gate whose Linear weights are drawn with
    spread `std` (bias 0; `std` 0: closed): the same weights, output and input blended by a
    gate of the QF."""
    import torch
    from models.network_fbcnn import FBCNN
    gated = FBCNN(net.in_nc, net.out_nc, net.nc, net.nb, global_skip=True, skip_gate=True)
    gated.load_state_dict(net.state_dict(), strict=False)  # every weight but the gate's
    torch.nn.init.normal_(gated.to_skip_gate.weight, std=std,
                          generator=torch.Generator().manual_seed(seed))
    return gated.eval()


def closed_port():
    """A local port nothing listens on: a download from it fails at once."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def offline_zoo(tmp_path, monkeypatch):
    """A machine without the released weights and without network: FBCNN_MODEL_DIR is an empty
    folder (returned), FBCNN_MODEL_URL a closed local port, and the bundled-model notice is
    told afresh."""
    from models import model_zoo
    folder = tmp_path / "no_downloads"
    monkeypatch.setenv("FBCNN_MODEL_DIR", str(folder))
    monkeypatch.setenv("FBCNN_MODEL_URL", f"http://127.0.0.1:{closed_port()}/")
    monkeypatch.setattr(model_zoo, "_fallbacks_told", set())
    return folder


@pytest.fixture(scope="session", autouse=True)
def openvino_cache(tmp_path_factory):
    """The OpenVINO engine's converted networks go to a folder of this run, not the user's cache
    (subprocesses started by the tests inherit it)."""
    folder = str(tmp_path_factory.mktemp("openvino_cache"))
    previous = os.environ.get("FBCNN_CACHE_DIR")
    os.environ["FBCNN_CACHE_DIR"] = folder
    yield folder
    if previous is None:
        os.environ.pop("FBCNN_CACHE_DIR", None)
    else:
        os.environ["FBCNN_CACHE_DIR"] = previous


@pytest.fixture(scope="session")
def repo_root():
    return REPO_ROOT


@pytest.fixture(scope="session")
def testsets_dir():
    return os.path.join(REPO_ROOT, "testsets")


def shared_testset(name):
    """The folder of a large test set that is not in the repository (BSDS500_color,
    BSDS500_gray, McMaster); the calling test is skipped, saying how to provide it, without it."""
    root = os.environ.get("FBCNN_TESTSETS_ROOT") or os.path.join(SHARED, "testsets")
    path = os.path.join(root, name)
    if not os.path.isdir(path):
        pytest.skip(f"needs the {name} test set, too large for the repository "
                    f"(docs/evaluation.md, 'Reproducing the tables': where to get it); set "
                    f"FBCNN_TESTSETS_ROOT to the folder that holds it")
    return path


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for modules of tiny networks: on 2 shared cores a second OpenMP
    thread makes small convolutions several times slower, not faster."""
    import torch
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def option_file(tmp_path_factory):
    """The tiny training run's option file (tests/train_support.py)."""
    from tests.train_support import write_tiny_options
    return write_tiny_options(tmp_path_factory.mktemp("train"))


@pytest.fixture(scope="module")
def reference_run(option_file, tmp_path_factory):
    """The uninterrupted 6-iteration tiny run every other run is compared with: its folder."""
    from tests.train_support import run_tiny
    root = tmp_path_factory.mktemp("reference")
    assert run_tiny(option_file, root) == {"start": 0, "end": 6}
    return os.path.join(root, "tiny")
