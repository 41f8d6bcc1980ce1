"""Shared utilities: options, image I/O, metrics, checkpoints, file writes, logging, runners.

Importing this package caps OpenCV's decoders at $FBCNN_MAX_PIXELS (default 100 megapixels)
through OPENCV_IO_MAX_IMAGE_PIXELS, unless that is already set. OpenCV reads the variable once,
when it is first imported, and every script imports `utils` before OpenCV, so this backstop of
the header check in `utils.image` is in place for formats the header sniffer does not know.
"""
import os as _os


def parse_pixel_count(text):
    """$FBCNN_MAX_PIXELS's value as an int ("100000000" or "1e8"); 0 when it is not a number."""
    try:
        return int(float(text)) if "e" in text.lower() else int(text)
    except ValueError:
        return 0


_limit = parse_pixel_count(_os.environ.get("FBCNN_MAX_PIXELS", "").strip())
# anything but a positive number leaves the default here; utils.image.max_pixels reports it
_os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(_limit) if _limit > 0 else "100000000")
