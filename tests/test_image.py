"""utils/image.py and utils/fileio.py: bad image files are refused with a message naming them,
unusual but valid ones are converted as documented, writes are atomic, tiny images restore."""
import errno
import io
import logging
import os
import struct
import subprocess
import sys
import zlib

import cv2
import numpy as np
import pytest
import torch

from data import dataset_jpeg
from models.inference import restore
from models.model_zoo import LoadedModel
from models.network_fbcnn import FBCNN
from tests.conftest import REPO_ROOT
from utils import fileio, metrics
from utils import image as image_module
from utils.errors import UserError
from utils.fileio import WriteError, display_path
from utils.image import (ImageReadError, imread_uint, imwrite, read_header, read_image_header,
                         rgb2y_matlab)

pytestmark = pytest.mark.usefixtures("one_thread")


RNG = np.random.default_rng(5)
IMG = cv2.GaussianBlur((RNG.random((40, 48, 3)) * 255).astype(np.uint8), (3, 3), 1)  # RGB


def _encode(ext, img, params=()):
    """Bytes of `img` (RGB or gray) encoded by OpenCV as `ext`."""
    if img.ndim == 3 and img.shape[2] == 3:
        img = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(ext, img, list(params))
    assert ok
    return buf.tobytes()


def _png_chunk(kind, payload):
    return (struct.pack(">I", len(payload)) + kind + payload
            + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF))


def _png_claiming(width, height):
    """A small PNG whose IHDR claims `width` x `height` RGB pixels."""
    return (b"\x89PNG\r\n\x1a\n"
            + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + _png_chunk(b"IEND", b""))


def _jpeg_claiming(width, height):
    """A real JPEG with its SOF0 size field rewritten."""
    data = bytearray(_encode(".jpg", IMG))
    sof = data.find(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, height, width)
    return bytes(data)


def _bombs(side=30000):
    """A header claiming side x side pixels, for every format the sniffer reads."""
    bmp = bytearray(_encode(".bmp", IMG))
    struct.pack_into("<ii", bmp, 18, side, -side)  # negative height: a top-down bitmap
    gif = bytearray(_encode(".gif", IMG))
    struct.pack_into("<HH", gif, 6, side, side)
    tiff = (b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", 2)
            + struct.pack("<HHII", 256, 4, 1, side) + struct.pack("<HHII", 257, 4, 1, side)
            + struct.pack("<I", 0))
    vp8x = (b"RIFF" + struct.pack("<I", 22) + b"WEBPVP8X" + struct.pack("<I", 10)
            + bytes(4) + (side - 1).to_bytes(3, "little") + (side - 1).to_bytes(3, "little"))
    lossless = bytearray(_encode(".webp", IMG, [cv2.IMWRITE_WEBP_QUALITY, 101]))
    assert lossless[12:16] == b"VP8L"
    struct.pack_into("<I", lossless, 21, 16383 | 16383 << 14)  # 14-bit fields: 16384 at most
    return {"bomb.png": _png_claiming(side, side), "bomb.jpg": _jpeg_claiming(side, side),
            "bomb.bmp": bytes(bmp), "bomb.gif": bytes(gif), "bomb.tif": tiff,
            "bomb.webp": vp8x, "bomb_lossless.webp": bytes(lossless),
            "bomb.ppm": f"P6\n# a comment\n{side} {side}\n255\n".encode() + bytes(100)}


@pytest.fixture
def no_decoding(monkeypatch):
    """Fail the test if OpenCV is asked to decode anything."""
    def imdecode(*args):
        raise AssertionError("cv2.imdecode was called")
    monkeypatch.setattr(image_module.cv2, "imdecode", imdecode)


def _write(folder, name, data):
    path = os.path.join(folder, name)
    with open(path, "wb") as f:
        f.write(data)
    return path


@pytest.mark.parametrize("name", sorted(_bombs()))
def test_decompression_bomb_is_refused_from_the_header(tmp_path, name, no_decoding):
    path = _write(tmp_path, name, _bombs()[name])
    for channels in (1, 3):
        with pytest.raises(ImageReadError) as err:
            imread_uint(path, channels)
        message = str(err.value)
        claim = ("16384x16384 = 268,435,456" if "lossless" in name
                 else "30000x30000 = 900,000,000")
        assert message.startswith(f"{path}: the ") and f"{claim} pixels" in message
        assert "over the limit of 100,000,000" in message and "FBCNN_MAX_PIXELS" in message
    with pytest.raises(ImageReadError, match="over the limit of 100,000,000"):
        read_image_header(path)


def test_pixel_limit_follows_the_environment(tmp_path, monkeypatch):
    path = _write(tmp_path, "small.png", _encode(".png", IMG))  # 48 x 40 = 1920 pixels
    monkeypatch.setenv("FBCNN_MAX_PIXELS", "1919")
    with pytest.raises(ImageReadError, match="48x40 = 1,920 pixels, over the limit of 1,919"):
        imread_uint(path)
    monkeypatch.setenv("FBCNN_MAX_PIXELS", "1920")
    assert np.array_equal(imread_uint(path), IMG)
    monkeypatch.setenv("FBCNN_MAX_PIXELS", "lots")
    with pytest.raises(UserError, match="FBCNN_MAX_PIXELS='lots': expected a positive number"):
        imread_uint(path)


@pytest.mark.parametrize("limit", ["1500", "1.5e3"])  # max_pixels reads both: OpenCV too
def test_opencv_limit_is_the_backstop_for_formats_the_sniffer_does_not_know(tmp_path, limit):
    over = _write(tmp_path, "over.jp2", _encode(".jp2", IMG))  # 48 x 40 = 1920 pixels
    under = _write(tmp_path, "under.jp2", _encode(".jp2", IMG[:32, :40]))  # 1280 pixels
    with open(over, "rb") as f:
        assert read_header(f.read()) is None  # JPEG 2000: not sniffed
    code = ("import sys; from utils.image import imread_uint, ImageReadError\n"
            "for path in sys.argv[1:]:\n"
            "    try:\n        print(imread_uint(path).shape)\n"
            "    except ImageReadError as e:\n        print(e)\n")
    env = {**os.environ, "FBCNN_MAX_PIXELS": limit, "PYTHONPATH": REPO_ROOT}
    env.pop("OPENCV_IO_MAX_IMAGE_PIXELS", None)
    out = subprocess.run([sys.executable, "-c", code, over, under], env=env,
                         capture_output=True, text=True, timeout=120)
    refused, decoded = out.stdout.splitlines()
    assert refused.startswith(f"{over}: OpenCV refused to decode it")
    assert "CV_IO_MAX_IMAGE_PIXELS" in refused  # OpenCV's check, before it decoded anything
    assert decoded == "(32, 40, 3)"


@pytest.mark.parametrize("ext,params", [(".png", ()), (".jpg", ()), (".bmp", ()), (".gif", ()),
                                        (".webp", ()), (".webp", (cv2.IMWRITE_WEBP_QUALITY, 101)),
                                        (".tif", ()), (".ppm", ()), (".pgm", ())])
@pytest.mark.parametrize("shape", [(1, 1), (9, 7), (17, 33)])
def test_header_size_matches_the_decoded_size(ext, params, shape):
    img = IMG[:shape[0], :shape[1]]
    data = _encode(ext, img[..., 0] if ext == ".pgm" else img, params)
    header = read_header(data)
    assert (header.width, header.height, header.complete) == (shape[1], shape[0], True)
    decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert decoded.shape[:2] == shape


def test_empty_file(tmp_path):
    path = _write(tmp_path, "empty.png", b"")
    with pytest.raises(ImageReadError, match=r"empty\.png: empty file \(0 bytes\)$"):
        imread_uint(path)


@pytest.mark.parametrize("cut", ["half", "no_eoi", "header_only", "inside_app1"])
def test_truncated_jpeg_is_refused(tmp_path, cut):
    data = _encode(".jpg", IMG)
    thumbed = _with_thumbnail(data)  # the thumbnail's EOI must not count
    truncated = {"half": data[:len(data) // 2], "no_eoi": data[:-2],
                 "header_only": data[:data.find(b"\xff\xda") + 20],
                 "inside_app1": thumbed[:thumbed.rfind(b"\xff\xda") + 100]}[cut]
    path = _write(tmp_path, "cut.jpg", truncated)
    with pytest.raises(ImageReadError, match=r"cut\.jpg: truncated JPEG file \(no EOI marker\)"):
        imread_uint(path)


def _with_thumbnail(data):
    """`data` with an APP1 segment holding a whole JPEG (its own EOI) before the frame."""
    thumb = _encode(".jpg", IMG[:8, :8])
    payload = b"Exif\x00\x00" + thumb
    return data[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + data[2:]


def test_complete_jpeg_with_thumbnail_or_trailing_bytes_reads(tmp_path):
    data = _encode(".jpg", IMG)
    expected = cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR),
                            cv2.COLOR_BGR2RGB)
    for name, variant in (("thumb.jpg", _with_thumbnail(data)), ("tail.jpg", data + b"\0" * 50)):
        assert np.array_equal(imread_uint(_write(tmp_path, name, variant)), expected)


def test_truncated_png_is_refused(tmp_path):
    data = _encode(".png", IMG)
    path = _write(tmp_path, "cut.png", data[:len(data) - 20])
    with pytest.raises(ImageReadError, match=r"cut\.png: truncated PNG file \(no IEND chunk\)"):
        imread_uint(path)
    short = _write(tmp_path, "short.png", data[:20])
    with pytest.raises(ImageReadError, match=r"short\.png: corrupt or truncated image header"):
        imread_uint(short)


def test_random_bytes_named_like_an_image(tmp_path):
    path = _write(tmp_path, "noise.jpg", np.random.default_rng(1).bytes(5000))
    with pytest.raises(ImageReadError, match=r"noise\.jpg: not an image OpenCV can decode "
                                             r"\(unknown format"):
        imread_uint(path)
    with pytest.raises(ImageReadError, match=r"noise\.jpg: not a PNG, JPEG"):
        read_image_header(path)
    corrupt = bytearray(_encode(".png", IMG))
    corrupt[60:200] = bytes(140)  # IDAT data zeroed: the header is fine, the pixels are not
    path = _write(tmp_path, "corrupt.png", bytes(corrupt))
    with pytest.raises(ImageReadError, match=r"corrupt\.png: corrupt PNG file"):
        imread_uint(path)


def test_folder_named_like_an_image(tmp_path):
    folder = tmp_path / "x.png"
    folder.mkdir()
    for read in (imread_uint, read_image_header):
        with pytest.raises(ImageReadError, match=r"x\.png: a folder, not an image file"):
            read(str(folder))


def test_sixteen_bit_png_is_rounded_to_eight_bits(tmp_path, caplog):
    image_module._warned_16bit.clear()
    values = np.arange(0, 65536, 7, dtype=np.uint16)[:48 * 40 * 3]
    img16 = np.resize(values, (40, 48, 3))
    img16[0, :3, 0] = (0, 65535, 32896)  # 32896 = 128 * 257
    path = _write(tmp_path, "deep.png", _encode(".png", img16))
    with caplog.at_level(logging.WARNING, logger="fbcnn.utils.image"):
        got = imread_uint(path, 3)
        imread_uint(path, 3)
    expected = np.floor(img16.astype(np.float64) / 257 + 0.5).astype(np.uint8)
    assert got.dtype == np.uint8 and np.array_equal(got, expected)
    assert tuple(got[0, :3, 0]) == (0, 255, 128)
    assert not np.array_equal(got, (img16 >> 8).astype(np.uint8))  # not OpenCV's truncation
    assert [r.message.count("16-bit") for r in caplog.records] == [1]  # logged once
    exact = _write(tmp_path, "exact.png", _encode(".png", IMG.astype(np.uint16) * 257))
    assert np.array_equal(imread_uint(exact, 3), IMG)
    gray = _write(tmp_path, "gray16.png", _encode(".png", IMG[..., 1].astype(np.uint16) * 257))
    assert np.array_equal(imread_uint(gray, 1), IMG[..., 1])


@pytest.mark.parametrize("channels", [1, 3])
def test_float_pixels_are_refused(tmp_path, channels):
    path = _write(tmp_path, "float.tif", _encode(".tiff", IMG.astype(np.float32) / 255))
    gray = _write(tmp_path, "gray.tif", _encode(".tiff", IMG[:, :, 0].astype(np.float32) / 255))
    for name, file in (("float", path), ("gray", gray)):  # also read with the other channels
        with pytest.raises(ImageReadError, match=rf"{name}\.tif: float32 pixels are not "):
            imread_uint(file, channels)


def test_alpha_is_dropped_colour_kept(tmp_path):
    rgba = np.dstack([IMG, np.zeros(IMG.shape[:2], np.uint8)])
    rgba[::2, :, 3] = 255
    bgra = cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA)
    path = _write(tmp_path, "alpha.png", cv2.imencode(".png", bgra)[1].tobytes())
    assert np.array_equal(imread_uint(path, 3), IMG)  # transparent pixels keep their colour
    gray = imread_uint(path, 1).astype(int)
    assert np.abs(gray - cv2.cvtColor(IMG, cv2.COLOR_RGB2GRAY)).max() <= 1


def test_gray_file_read_as_colour_has_three_equal_channels(tmp_path):
    path = _write(tmp_path, "gray.png", _encode(".png", IMG[..., 0]))
    rgb = imread_uint(path, 3)
    assert rgb.shape == (40, 48, 3) and all(np.array_equal(rgb[..., c], IMG[..., 0])
                                            for c in range(3))
    assert np.array_equal(imread_uint(path, 1), IMG[..., 0])


def test_palette_png_is_expanded_to_rgb(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    palette = Image.fromarray(IMG).convert("P", palette=Image.ADAPTIVE, colors=16)
    buf = io.BytesIO()
    palette.save(buf, "PNG")
    path = _write(tmp_path, "palette.png", buf.getvalue())
    assert np.array_equal(imread_uint(path, 3), np.asarray(palette.convert("RGB")))
    assert len(np.unique(imread_uint(path, 3).reshape(-1, 3), axis=0)) <= 16


def test_cmyk_jpeg_is_converted_to_rgb(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    buf = io.BytesIO()
    Image.fromarray(IMG).convert("CMYK").save(buf, "JPEG", quality=95)
    path = _write(tmp_path, "cmyk.jpg", buf.getvalue())
    assert Image.open(path).mode == "CMYK"
    rgb = imread_uint(path, 3)
    reference = np.asarray(Image.open(path).convert("RGB")).astype(int)
    assert rgb.shape == (40, 48, 3)
    assert np.abs(rgb.astype(int) - reference).mean() < 2  # both undo Adobe's inverted CMYK
    assert np.abs(rgb.astype(int) - IMG).mean() < 4
    assert imread_uint(path, 1).shape == (40, 48)


def test_file_names_that_are_not_utf8(tmp_path):
    folder = os.fsencode(tmp_path)
    raw = os.path.join(folder, b"caf\xe9.png")
    with open(raw, "wb") as f:
        f.write(_encode(".png", IMG))
    with open(os.path.join(folder, b"bad\xff.jpg"), "wb") as f:
        f.write(b"not a jpeg")
    names = sorted(os.listdir(tmp_path))
    assert names == ["bad\udcff.jpg", "caf\udce9.png"]  # surrogate-escaped by the OS layer
    good = os.path.join(tmp_path, names[1])
    assert np.array_equal(imread_uint(good), IMG) and np.array_equal(imread_uint(raw), IMG)
    with pytest.raises(ImageReadError) as err:
        imread_uint(os.path.join(tmp_path, names[0]))
    message = str(err.value)
    assert "bad\\xff.jpg: not an image" in message
    assert message.encode("utf-8")  # printable on any UTF-8 terminal, no surrogates left
    assert display_path(raw) == display_path(good) == os.path.join(str(tmp_path), "caf\\xe9.png")
    out = os.path.join(tmp_path, "out_" + names[1])
    imwrite(out, IMG)
    assert os.path.isfile(os.path.join(folder, b"out_caf\xe9.png"))
    assert np.array_equal(imread_uint(out), IMG)


class _FullDisk:
    """`open` replacement for utils.fileio: after `free_files` files, writes stop with ENOSPC
    once `room` more bytes are written."""

    def __init__(self, room, free_files=0):
        self.room, self.free_files = room, free_files

    def __call__(self, path, mode="r", *args, **kwargs):
        real = open(path, mode, *args, **kwargs)
        if self.free_files > 0:
            self.free_files -= 1
            return real
        room = self

        class Limited:
            def write(self, data):
                data = bytes(data)
                if len(data) > room.room:
                    real.write(data[:room.room])  # the disk takes what fits, then refuses
                    real.flush()
                    room.room = 0
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                room.room -= len(data)
                return real.write(data)

            def __getattr__(self, name):
                return getattr(real, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                real.close()

        return Limited()


def test_full_disk_leaves_no_partial_image(tmp_path, monkeypatch):
    path = str(tmp_path / "out.png")
    imwrite(path, IMG[:8, :8])
    before = open(path, "rb").read()
    monkeypatch.setattr(fileio, "open", _FullDisk(100), raising=False)
    with pytest.raises(WriteError) as err:
        imwrite(path, IMG)
    assert str(err.value).startswith(f"{path}: cannot write (No space left on device)")
    assert os.listdir(tmp_path) == ["out.png"] and open(path, "rb").read() == before
    with pytest.raises(WriteError):
        imwrite(str(tmp_path / "new.png"), IMG)
    assert os.listdir(tmp_path) == ["out.png"]


@pytest.mark.parametrize("hard_links", [True, False])
def test_atomic_write_without_replace_never_replaces(tmp_path, monkeypatch, hard_links):
    if not hard_links:  # a file system without hard links: check, then rename
        def no_link(src, dst):
            raise OSError(errno.EPERM, "no hard links here")
        monkeypatch.setattr(fileio.os, "link", no_link)
    path = tmp_path / "sub" / "out.bin"
    fileio.atomic_write_bytes(path, b"first", replace=False)  # creates the folder too
    assert path.read_bytes() == b"first"
    with pytest.raises(FileExistsError):
        fileio.atomic_write_bytes(path, b"second", replace=False)

    def appears_meanwhile(f):  # another process writes the target while we write ours
        f.write(b"ours")
        (tmp_path / "sub" / "late.bin").write_bytes(b"theirs")
    with pytest.raises(FileExistsError):
        fileio.atomic_write(tmp_path / "sub" / "late.bin", appears_meanwhile, replace=False)
    assert (tmp_path / "sub" / "late.bin").read_bytes() == b"theirs"
    assert path.read_bytes() == b"first"
    assert sorted(os.listdir(tmp_path / "sub")) == ["late.bin", "out.bin"]
    fileio.atomic_write_bytes(path, b"third")
    assert path.read_bytes() == b"third"


@pytest.mark.parametrize("replace", [True, False])
def test_a_file_where_the_folder_should_be_is_a_write_error_saying_so(tmp_path, replace):
    (tmp_path / "sub").write_bytes(b"a file")
    with pytest.raises(WriteError, match=r"sub: cannot create this folder \(a file of that "
                                         r"name is in the way\)"):
        fileio.atomic_write_bytes(tmp_path / "sub" / "out.bin", b"x", replace=replace)
    assert (tmp_path / "sub").read_bytes() == b"a file"


def test_atomic_write_lets_the_writers_own_errors_through(tmp_path):
    def refuse(f):
        f.write(b"partial")
        raise UserError("checksum mismatch")
    with pytest.raises(UserError, match="checksum mismatch") as err:
        fileio.atomic_write(tmp_path / "x.bin", refuse)
    assert not isinstance(err.value, WriteError) and os.listdir(tmp_path) == []


def test_imwrite_round_trip_and_unknown_extension(tmp_path):
    imwrite(str(tmp_path / "a.png"), IMG)
    imwrite(str(tmp_path / "g.bmp"), IMG[..., 0])
    assert np.array_equal(imread_uint(str(tmp_path / "a.png")), IMG)
    assert np.array_equal(imread_uint(str(tmp_path / "g.bmp"), 1), IMG[..., 0])
    with pytest.raises(WriteError, match=r"a\.xyz: OpenCV could not encode"):
        imwrite(str(tmp_path / "a.xyz"), IMG)
    assert sorted(os.listdir(tmp_path)) == ["a.png", "g.bmp"]


@pytest.fixture(scope="module")
def tiny_nets():
    torch.manual_seed(0)
    return {c: LoadedModel("tiny", FBCNN(in_nc=c, out_nc=c, nc=[8, 16, 32, 64], nb=1).eval(), c)
            for c in (1, 3)}


@pytest.mark.parametrize("shape", [(1, 1), (7, 9), (1, 9), (9, 1), (8, 8)])
@pytest.mark.parametrize("channels", [1, 3])
def test_images_smaller_than_a_jpeg_block_restore(tmp_path, tiny_nets, shape, channels):
    """Through the file reader and the network: same shape out, and the network sees the image
    replicate-padded to a multiple of 8 (so a tiny image restores as its padded version does)."""
    img = IMG[:shape[0], :shape[1]] if channels == 3 else IMG[:shape[0], :shape[1], 1]
    path = str(tmp_path / "tiny.png")
    imwrite(path, img)
    read = imread_uint(path, channels)
    assert np.array_equal(read, img)
    restored, qf = restore(tiny_nets[channels], read)
    assert restored.shape == img.shape and restored.dtype == np.uint8 and 0 <= qf <= 100
    pad = ((0, -shape[0] % 8), (0, -shape[1] % 8)) + (((0, 0),) if channels == 3 else ())
    padded, qf_padded = restore(tiny_nets[channels], np.pad(img, pad, mode="edge"))
    assert np.array_equal(restored, padded[:shape[0], :shape[1]]) and qf == qf_padded


def test_matlab_y_is_the_weighted_sum_then_one_division_on_all_rgb_triples():
    """rgb2y_matlab over all 2^24 RGB triples equals round((65.481 R + 128.553 G + 24.966 B)
    / 255 + 16) in float64; dividing each term first (the old formula) differs in exactly the
    42 triples the spec counts. The data layer and the metrics use this one function."""
    v = np.arange(1 << 24, dtype=np.uint32)
    rgb = np.stack([(v >> 16) & 255, (v >> 8) & 255, v & 255], axis=-1).astype(np.uint8)
    y = rgb2y_matlab(rgb.reshape(4096, 4096, 3)).reshape(-1)
    x = rgb.astype(np.float64)
    formula = np.round((65.481 * x[:, 0] + 128.553 * x[:, 1] + 24.966 * x[:, 2]) / 255 + 16)
    assert np.array_equal(y, formula.astype(np.uint8))
    per_term = np.round(x[:, 0] * 65.481 / 255 + x[:, 1] * 128.553 / 255
                        + x[:, 2] * 24.966 / 255 + 16)
    assert int(np.count_nonzero(y != per_term)) == 42
    assert (y.min(), y.max()) == (16, 235)
    assert dataset_jpeg.rgb2y_matlab is rgb2y_matlab and metrics.rgb2y_matlab is rgb2y_matlab
