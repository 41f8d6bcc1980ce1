"""The fixtures main_restore's tests (tests/restore_cli/) share: a tiny colour and gray model
on disk and a textured photo, made once per module (tests/restore_cli/restore_support.py)."""
import pytest

from tests.restore_cli.restore_support import textured_photo, tiny_model_files


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    return tiny_model_files(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def photo():
    return textured_photo()
