"""Shared utilities: options, image I/O, metrics, checkpoints, file writes, logging, runners.

Importing this package caps OpenCV's decoders at $FBCNN_MAX_PIXELS (default 100 megapixels)
through OPENCV_IO_MAX_IMAGE_PIXELS, unless that is already set. OpenCV reads the variable once,
when it is first imported, and every script imports `utils` before OpenCV, so this backstop of
the header check in `utils.image` is in place for formats the header sniffer does not know.
"""
import os as _os

_limit = _os.environ.get("FBCNN_MAX_PIXELS", "").strip()
_os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS",
                       _limit if _limit.isdigit() and int(_limit) > 0 else "100000000")
