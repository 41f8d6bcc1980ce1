"""main_restore.py / runners/restore.py: what the written image carries (EXIF orientation,
ICC profile, 16 bits) and the projection onto each file's DCT."""
import os

import cv2
import numpy as np
import pytest

from models import consistency
from data.jpeg import jpeg_encode
from models.model_zoo import load_model
from utils.image import imread_uint
from utils.image_meta import apply_orientation, read_icc_profile

from tests.restore_cli.restore_support import (IDENTITY, exif_segment, icc_profile, icc_segment,
                                               png_iccp, read_rgb, restored_and_projected, run,
                                               write_jpeg)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied(tmp_path, photo, orientation, capsys):
    path = write_jpeg(tmp_path / "o.jpg", photo, 90, exif_segment(orientation))
    code, _, _ = run([str(path), "-o", str(tmp_path / "out"), *IDENTITY], capsys)
    assert code == 0
    as_opencv_shows_it = cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    restored = read_rgb(tmp_path / "out" / "o.png")
    assert restored.shape == as_opencv_shows_it.shape
    np.testing.assert_array_equal(restored, as_opencv_shows_it)



def test_network_runs_on_the_stored_grid_then_turns(tmp_path, photo, tiny_models, capsys):
    path = write_jpeg(tmp_path / "o.jpg", photo, 20, exif_segment(6))
    code, _, _ = run([str(path), "-o", str(tmp_path / "out"), "--model", tiny_models["color"]],
                     capsys)
    assert code == 0
    expected = apply_orientation(restored_and_projected(load_model(tiny_models["color"]),
                                                        jpeg_encode(photo, 20), 3), 6)
    np.testing.assert_array_equal(read_rgb(tmp_path / "out" / "o.png"), expected)



def test_icc_profile_is_carried(tmp_path, photo, capsys):
    rgb_profile, gray_profile = icc_profile(b"RGB "), icc_profile(b"GRAY")
    write_jpeg(tmp_path / "c.jpg", photo, 80, icc_segment(rgb_profile))
    write_jpeg(tmp_path / "g.jpg", photo[..., 1], 80, icc_segment(gray_profile))
    code, _, _ = run([str(tmp_path / "c.jpg"), str(tmp_path / "g.jpg"), "-o",
                      str(tmp_path / "png"), *IDENTITY], capsys)
    assert code == 0
    assert png_iccp(tmp_path / "png" / "c.png") == rgb_profile
    assert png_iccp(tmp_path / "png" / "g.png") == gray_profile
    assert cv2.imread(str(tmp_path / "png" / "c.png")) is not None

    code, _, _ = run([str(tmp_path / "c.jpg"), "-o", str(tmp_path / "jpg"), "--format", "jpg",
                      *IDENTITY], capsys)
    out_jpg = (tmp_path / "jpg" / "c.jpg").read_bytes()
    assert code == 0 and read_icc_profile(out_jpg) == rgb_profile
    assert b"ICC_PROFILE\x00\x01\x01" + rgb_profile in out_jpg

    code, _, err = run([str(tmp_path / "c.jpg"), "-o", str(tmp_path / "webp"), "--format",
                        "webp", *IDENTITY], capsys)
    assert code == 0 and "ICC profile not carried" in err
    assert (tmp_path / "webp" / "c.webp").is_file()



def test_bit_depth_16_keeps_the_levels_between_8_bit_ones(tmp_path, testsets_dir, tiny_models,
                                                          capsys):
    """`--bit-depth 16`: a 16-bit PNG (and TIFF) whose rounding to 8 bits is the 8-bit run's
    output within one level (the network's output rounded twice), and which holds values
    between 8-bit levels; projected, it stays within rounding of the 8-bit projection (which
    starts from the rounded restoration). A format that holds 8 bits is refused."""
    clean = imread_uint(os.path.join(testsets_dir, "LIVE1_color", "monarch.png"))[:96, :128]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "m.jpg").write_bytes(jpeg_encode(clean, 30))
    common = [str(tmp_path / "in"), "--model", tiny_models["color"], "--device", "cpu"]
    for projection in ("--no-projection", "--projection"):
        assert run([*common, "-o", str(tmp_path / f"o8{projection}"), projection], capsys)[0] == 0
        eight = cv2.imread(str(tmp_path / f"o8{projection}" / "m.png"), cv2.IMREAD_UNCHANGED)
        for fmt in ("png", "tif"):
            out = tmp_path / f"o16{fmt}{projection}"
            code, stdout, _ = run([*common, "-o", str(out), "--bit-depth", "16", "--format", fmt,
                                   projection], capsys)
            assert code == 0 and ("projected onto" in stdout) == (projection == "--projection")
            sixteen = cv2.imread(str(out / f"m.{fmt}"), cv2.IMREAD_UNCHANGED)
            assert sixteen.dtype == np.uint16 and sixteen.shape == eight.shape
            diff = np.abs(np.rint(sixteen / 257.0) - eight)
            if projection == "--no-projection":
                assert diff.max() <= 1
            else:
                assert diff.max() <= 2 and diff.mean() < 0.2
            inside = sixteen[(sixteen > 0) & (sixteen < 65535)]  # the test network clips many
            assert inside.size > 1000 and (inside % 257 != 0).mean() > 0.9
    code, _, err = run([*common, "-o", str(tmp_path / "oj"), "--bit-depth", "16", "--format",
                        "jpg"], capsys)
    assert code == 2 and "--bit-depth 16: jpg holds 8 bits" in err



def test_a_jpeg_that_cannot_be_projected_is_still_restored_and_named(tmp_path, photo,
                                                                      tiny_models, capsys):
    """A CMYK JPEG (four components): restored as the network made it, one warning naming the
    file and the reason, and its line says it was not projected."""
    from PIL import Image
    path = tmp_path / "cmyk.jpg"
    Image.fromarray(photo).convert("CMYK").save(path, "JPEG", quality=60)
    code, out, err = run([str(path), "-o", str(tmp_path / "out"), "--model",
                          tiny_models["color"], "--device", "cpu"], capsys)
    assert code == 0 and (tmp_path / "out" / "cmyk.png").is_file()
    assert ("cmyk.jpg: not projected onto the file's DCT (4 components (CMYK or YCCK)); "
            "written as the network restored it") in err
    assert "not projected onto the file's DCT]" in out



def test_each_jpegs_coefficients_are_read_once(tmp_path, photo, tiny_models, capsys,
                                               monkeypatch):
    """The twin of the calibration and the projection share one read of the file's DCT."""
    for name, qf in (("a.jpg", 20), ("b.jpg", 80)):
        write_jpeg(tmp_path / name, photo, qf)
    reads = []
    real = consistency.read_coefficients
    monkeypatch.setattr(consistency, "read_coefficients",
                        lambda data: reads.append(1) or real(data))
    code, out, _ = run([str(tmp_path / "a.jpg"), str(tmp_path / "b.jpg"), "-o",
                        str(tmp_path / "out"), "--model", tiny_models["color"], "--device",
                        "cpu"], capsys)
    assert code == 0 and out.count("projected onto the file's DCT") == 2
    assert len(reads) == 2
