"""Shared fixtures: the locations of the repository and of the test data (pytest.ini puts the
repository on the path)."""
import os

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(REPO_ROOT), "shared")


@pytest.fixture(scope="session")
def repo_root():
    return REPO_ROOT


@pytest.fixture(scope="session")
def testsets_dir():
    return os.path.join(REPO_ROOT, "testsets")


@pytest.fixture(scope="session")
def shared_testsets():
    """../shared/testsets (BSDS500 and McMaster live only there)."""
    path = os.path.join(SHARED, "testsets")
    if not os.path.isdir(path):
        pytest.skip(f"{path} is not present beside the repository")
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
