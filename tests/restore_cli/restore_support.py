"""What the main_restore tests share: tiny models, a textured photo, JPEGs written with EXIF
and ICC segments, and the expected output of a default run (restored, then projected)."""
import struct
import zlib

import cv2
import numpy as np
import torch
from safetensors.torch import save_file

import runners.restore as cli
from data.jpeg import jpeg_decode, jpeg_encode
from models.engines import fastest_options
from models.inference import restore
from models.network_fbcnn import FBCNN
from tests.conftest import calibrated_projection

TINY = dict(nc=[8, 16, 32, 64], nb=1)


def tiny_model_files(folder):
    """Paths of a tiny colour and a tiny gray FBCNN, saved as safetensors in `folder`."""
    paths = {}
    for name, n in (("color", 3), ("gray", 1)):
        torch.manual_seed(n)
        net = FBCNN(in_nc=n, out_nc=n, **TINY)
        paths[name] = str(folder / f"tiny_{name}.safetensors")
        save_file(net.state_dict(), paths[name])
    return paths


def textured_photo():
    """A 48x40 colour image with some texture, RGB uint8."""
    rng = np.random.default_rng(1)
    base = cv2.resize(rng.integers(0, 256, (6, 5, 3), dtype=np.uint8), (40, 48),
                      interpolation=cv2.INTER_CUBIC)
    return np.clip(base.astype(int) + rng.integers(-15, 16, base.shape), 0, 255).astype(np.uint8)


def write_jpeg(path, img, qf=50, segments=b""):
    """Write `img` (RGB or gray) as an OpenCV JPEG, with `segments` inserted after SOI."""
    data = jpeg_encode(img, qf)
    path.write_bytes(data[:2] + segments + data[2:])
    return path


def exif_segment(orientation):
    tiff = (b"MM\x00\x2a" + struct.pack(">I", 8) + struct.pack(">H", 1)
            + struct.pack(">HHIHH", 0x0112, 3, 1, orientation, 0) + struct.pack(">I", 0))
    payload = b"Exif\x00\x00" + tiff
    return b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload


def icc_profile(colour_space=b"RGB "):
    """A minimal, well-formed ICC header (132 bytes, no tags) that libpng accepts."""
    header = bytearray(128)
    struct.pack_into(">I", header, 0, 132)
    header[8:12] = b"\x02\x10\x00\x00"
    header[12:16] = b"mntr"
    header[16:20] = colour_space
    header[20:24] = b"XYZ "
    header[36:40] = b"acsp"
    struct.pack_into(">iii", header, 68, 63190, 65536, 54061)  # D50
    return bytes(header) + struct.pack(">I", 0)


def icc_segment(profile):
    payload = b"ICC_PROFILE\x00\x01\x01" + profile
    return b"\xff\xe2" + struct.pack(">H", len(payload) + 2) + payload


def png_iccp(path):
    """The decompressed iCCP profile of a PNG file, read independently of utils/image_meta."""
    data, pos = path.read_bytes(), 8
    while pos < len(data):
        length, kind = struct.unpack_from(">I4s", data, pos)
        if kind == b"iCCP":
            payload = data[pos + 8:pos + 8 + length]
            return zlib.decompress(payload[payload.index(b"\x00") + 2:])
        pos += 12 + length
    return None


def run(argv, capsys):
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def restored_and_projected(model, data, n_channels, **kwargs):
    """What main_restore writes for JPEG bytes by default: the network's restoration of the
    decoded file, projected onto the file's quantization intervals (calibrated on a twin by
    the same network and options), with main_restore's engine and layout."""
    kwargs = fastest_options(kwargs, "cpu")
    restored, _ = restore(model, jpeg_decode(data, n_channels), **kwargs)
    return calibrated_projection(restored, data, lambda x: restore(model, x, **kwargs)[0])


def read_rgb(path):
    return cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


IDENTITY = ["--model", "jpeg", "--gray-model", "jpeg"]
