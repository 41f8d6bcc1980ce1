"""The ground floor: image I/O, file formats, metrics, options engine, checkpoints, logging.

Nothing here imports the project's other packages (data, models, runners); they import this.

Importing this package caps OpenCV's decoders at $FBCNN_MAX_PIXELS (default 100 megapixels)
through OPENCV_IO_MAX_IMAGE_PIXELS, unless that is already set. OpenCV reads the variable once,
when it is first imported, so every package of the project (data, models, runners) imports
`utils` in its `__init__`, before any of its modules imports OpenCV: the scripts and the
`python -m` tools all run with the cap. It backs the header check of `utils.image` for
formats the header sniffer does not know. `REPO_ROOT` is the repository's folder (testsets/,
model_zoo/ and options/ are found from it).
"""
import os as _os

REPO_ROOT = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))


def parse_pixel_count(text):
    """$FBCNN_MAX_PIXELS's value as an int ("100000000" or "1e8"); 0 when it is not a number."""
    try:
        return int(float(text)) if "e" in text.lower() else int(text)
    except ValueError:
        return 0


_limit = parse_pixel_count(_os.environ.get("FBCNN_MAX_PIXELS", "").strip())
# anything but a positive number leaves the default here; utils.image.max_pixels reports it
_os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(_limit) if _limit > 0 else "100000000")
