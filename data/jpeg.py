"""The JPEG degradations of FBCNN, as pure functions shared by training and testing.

This module owns how a clean uint8 image becomes its JPEG-compressed counterpart, with OpenCV as
in the paper: colour images are RGB (converted to BGR for the codec and back), grayscale images
are HxW and are encoded single-channel. The test runner and the training datasets both call these
functions, so both degrade images the same way. Functions that draw random numbers take an
explicit `numpy.random.Generator`. A colour JPEG's chroma sampling is OpenCV's default, 4:2:0,
unless `sampling` names another ("444", "422", "420": what cameras and editors write).
"""
import cv2
import numpy as np

__all__ = ["SAMPLINGS", "jpeg_encode", "jpeg_decode", "jpeg", "jpeg_file", "double_jpeg",
           "double_jpeg_file", "shift_crop", "qf_to_label", "label_to_qf"]


# chroma sampling -> OpenCV's IMWRITE_JPEG_SAMPLING_FACTOR value
SAMPLINGS = {"444": cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444,
             "422": cv2.IMWRITE_JPEG_SAMPLING_FACTOR_422,
             "420": cv2.IMWRITE_JPEG_SAMPLING_FACTOR_420}


def _check_qf(qf):
    if int(qf) != qf or not 0 <= qf <= 100:
        raise ValueError(f"JPEG quality factor must be an integer in [0, 100], got {qf!r}")
    return int(qf)


def jpeg_encode(img, qf, sampling=None):
    """Encode a uint8 RGB (HxWx3) or grayscale (HxW) image as JPEG bytes at quality `qf`, a
    colour one with the chroma `sampling` (a key of SAMPLINGS; None: OpenCV's, 4:2:0)."""
    if img.dtype != np.uint8:
        raise TypeError(f"jpeg_encode expects uint8 pixels, got {img.dtype}")
    if img.ndim == 3 and img.shape[2] == 3:
        img = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
    elif img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    elif img.ndim != 2:
        raise ValueError(f"jpeg_encode expects HxW or HxWx3 images, got shape {img.shape}")
    params = [int(cv2.IMWRITE_JPEG_QUALITY), _check_qf(qf)]
    if sampling is not None:
        if sampling not in SAMPLINGS:
            raise ValueError(f"chroma sampling {sampling!r}: choose one of {', '.join(SAMPLINGS)}")
        if img.ndim == 3:
            params += [int(cv2.IMWRITE_JPEG_SAMPLING_FACTOR), int(SAMPLINGS[sampling])]
    ok, buf = cv2.imencode(".jpg", img, params)
    if not ok:
        raise ValueError(f"OpenCV could not JPEG-encode an image of shape {img.shape}")
    return buf.tobytes()


def jpeg_decode(data, n_channels):
    """Decode JPEG bytes to uint8 RGB HxWx3 (n_channels 3) or grayscale HxW (n_channels 1)."""
    buf = np.frombuffer(data, dtype=np.uint8)
    if n_channels == 1:
        return cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE)
    return cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def jpeg_file(img, qf, sampling=None):
    """`(jpeg(img, qf, sampling), the JPEG bytes it decodes)`: the file too, for what reads it."""
    data = jpeg_encode(img, qf, sampling)
    n_channels = 1 if img.ndim == 2 else img.shape[2]
    out = jpeg_decode(data, 1 if n_channels == 1 else 3)
    return (out[:, :, None] if img.ndim == 3 and n_channels == 1 else out), data


def jpeg(img, qf, sampling=None):
    """Compress and decompress once at quality `qf` (chroma `sampling` as for `jpeg_encode`);
    the layout (RGB or gray) is kept."""
    return jpeg_file(img, qf, sampling)[0]


def shift_crop(img, shift):
    """Drop the first `shift` rows and columns (an int, or a (rows, cols) pair)."""
    dy, dx = (shift, shift) if np.isscalar(shift) else shift
    return img[dy:, dx:]


def double_jpeg_file(img, qf1, qf2, shift=4):
    """`(double_jpeg(img, qf1, qf2, shift), the second JPEG's bytes)`."""
    return jpeg_file(shift_crop(jpeg(img, qf1), shift), qf2)


def double_jpeg(img, qf1, qf2, shift=4):
    """Non-aligned double JPEG: `jpeg(qf1)`, crop `shift` rows/columns, `jpeg(qf2)`.

    The result is aligned with `shift_crop(img, shift)`, the matching ground truth.
    """
    return double_jpeg_file(img, qf1, qf2, shift)[0]


def qf_to_label(qf):
    """The network's QF target, `1 - QF/100` (the original's `(100 - QF) / 100`)."""
    return (100.0 - qf) / 100.0


def label_to_qf(label):
    """The displayed QF of a predicted label: `round(100 * (1 - label))`."""
    return int(round(100.0 * (1.0 - float(label))))


# Training-side sampling: QF draws, crops and flips, each taking an explicit Generator so that a
# training sample is a pure function of its seed (this is what makes resumed runs repeat exactly).

__all__ += ["sample_qf", "random_offset", "crop", "random_crop", "augment_img"]


def sample_qf(rng, uniform_range, choices, uniform_prob):
    """A QF: with probability `uniform_prob` uniform in the inclusive `uniform_range`, else one of
    `choices`."""
    if rng.random() < uniform_prob:
        return int(rng.integers(uniform_range[0], uniform_range[1] + 1))
    return int(choices[int(rng.integers(len(choices)))])


def random_offset(rng, max_offset):
    """A (row, column) offset, each uniform in [0, max_offset]; (0, 0) when max_offset <= 0."""
    if max_offset <= 0:
        return 0, 0
    return int(rng.integers(0, max_offset + 1)), int(rng.integers(0, max_offset + 1))


def crop(img, top, left, size):
    """The `size` x `size` window of `img` whose top-left corner is (top, left)."""
    return img[top:top + size, left:left + size]


def random_crop(img, size, rng):
    """A `size` x `size` window at a uniform position (KAIR's `randint(0, H - size)`, inclusive)."""
    h, w = img.shape[:2]
    if h < size or w < size:
        raise ValueError(f"cannot crop {size}x{size} from an image of {h}x{w}")
    top = int(rng.integers(0, h - size + 1))
    left = int(rng.integers(0, w - size + 1))
    return crop(img, top, left, size)


def augment_img(img, mode):
    """One of KAIR's 8 flip/rotate modes (0 is the identity), returned contiguous."""
    ops = {0: lambda a: a,
           1: lambda a: np.flipud(np.rot90(a)),
           2: np.flipud,
           3: lambda a: np.rot90(a, k=3),
           4: lambda a: np.flipud(np.rot90(a, k=2)),
           5: np.rot90,
           6: lambda a: np.rot90(a, k=2),
           7: lambda a: np.flipud(np.rot90(a, k=3))}
    if mode not in ops:
        raise ValueError(f"augment mode must be in 0..7, got {mode}")
    return np.ascontiguousarray(ops[mode](img))
