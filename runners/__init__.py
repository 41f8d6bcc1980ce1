"""The applications behind the entry scripts: test runner, training loop, restore tool, demo,
ONNX export, sub-image preparation, and the command-line helpers they share.

The top floor: runners import models, data and utils; nothing below imports runners.
"""
import utils  # noqa: F401  (caps OpenCV's decoders before any module here imports cv2)
