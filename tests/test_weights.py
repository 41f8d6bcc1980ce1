"""The released colour weights against the reference outputs (needs model_zoo/fbcnn_color.pth).

The references in tests/reference/spandrel_fbcnn_color are the official model's blind
outputs (RGB, uint8), with a tolerance of one grey level.
"""
import os

import numpy as np
import pytest

from models.inference import restore
from models.model_zoo import MODEL_ZOO, load_model, model_folder
from tests.conftest import REFERENCE
from utils.image import imread_uint

REFERENCE_DIR = os.path.join(REFERENCE, "spandrel_fbcnn_color")
WEIGHTS = os.path.join(model_folder(), MODEL_ZOO["fbcnn_color"].filename)

pytestmark = [pytest.mark.weights,
              pytest.mark.skipif(not os.path.isfile(WEIGHTS), reason=f"{WEIGHTS} not present")]


@pytest.mark.parametrize("name", ["8x8", "jpeg-15"])
def test_released_colour_model_matches_reference(name):
    inputs = [f for f in os.listdir(REFERENCE_DIR) if f.startswith(f"input_{name}.")]
    img = imread_uint(os.path.join(REFERENCE_DIR, inputs[0]), 3)
    expected = imread_uint(os.path.join(REFERENCE_DIR, f"output_{name}_fbcnn_color.png"), 3)
    restored, _ = restore(load_model("fbcnn_color", progress=False), img)
    assert np.abs(restored.astype(int) - expected).max() <= 1
