"""Image decoding: every PIL mode to 8-bit RGB, EXIF orientation, the pixel limit."""

import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import REPO, noise_image
from PIL import Image

from pretrain.data.datasets import (
    build_image_dataset,
)
from pretrain.data.images import CorruptImageError, DataError, PixelLimitError, load_rgb, to_rgb
from pretrain.data.loader import TwoViewDataset
from pretrain.data.transforms import AugmentConfig


def _frombytes(mode, arr):
    """A PIL image of ``mode`` holding exactly the bytes of ``arr`` (h, w[, bands])."""
    arr = np.ascontiguousarray(arr)
    return Image.frombytes(mode, (arr.shape[1], arr.shape[0]), arr.tobytes())


def _grid16(h=4, w=5):
    """16-bit values covering the range, including 0, 65535 and values that round up/down."""
    v = np.array([0, 1, 128, 129, 256, 257, 385, 386, 1000, 32767, 32768, 40000, 65278, 65407,
                  65408, 65535, 12345, 54321, 300, 60000], dtype=np.int64)  # fmt: skip
    return v.reshape(h, w)


def _expect16(v):
    out = np.array([[round(x / 257) for x in row] for row in v.tolist()], dtype=np.uint8)
    return np.repeat(out[..., None], 3, axis=2)


def _composite(rgb, alpha):
    # over white, rounded to nearest, computed in floats independently of the code under test
    a = alpha[..., None].astype(np.float64) / 255.0
    return np.round(rgb.astype(np.float64) * a + 255.0 * (1.0 - a)).astype(np.uint8)


def _mode_cases():
    rng = np.random.default_rng(0)
    v16 = _grid16()
    rgb = rng.integers(0, 256, (4, 5, 3)).astype(np.uint8)
    alpha = rng.integers(0, 256, (4, 5)).astype(np.uint8)
    alpha[0, :3] = [0, 255, 128]
    grey = rng.integers(0, 256, (4, 5)).astype(np.uint8)
    cases = {}
    cases["I;16"] = (_frombytes("I;16", v16.astype("<u2")), _expect16(v16))
    cases["I;16B"] = (_frombytes("I;16B", v16.astype(">u2")), _expect16(v16))
    big = v16.copy()
    big[0, 0], big[0, 1] = -5, 70000  # clipped to 0..65535
    cases["I"] = (_frombytes("I", big.astype(np.int32)), _expect16(np.clip(big, 0, 65535)))
    f = np.linspace(-0.2, 1.2, 20).reshape(4, 5).astype(np.float32)
    f_exp = np.array([[round(min(max(float(x), 0.0), 1.0) * 255) for x in r] for r in f.tolist()])
    cases["F"] = (_frombytes("F", f), np.repeat(f_exp.astype(np.uint8)[..., None], 3, 2))
    cases["L"] = (_frombytes("L", grey), np.repeat(grey[..., None], 3, 2))
    bits = grey > 127
    one = _frombytes("L", bits.astype(np.uint8) * 255).convert("1")
    cases["1"] = (one, np.repeat(bits[..., None].astype(np.uint8) * 255, 3, 2))
    cases["RGBA"] = (_frombytes("RGBA", np.dstack([rgb, alpha])), _composite(rgb, alpha))
    cases["LA"] = (
        _frombytes("LA", np.dstack([grey, alpha])),
        _composite(np.repeat(grey[..., None], 3, 2), alpha),
    )
    palette = rng.integers(0, 256, (256, 3)).astype(np.uint8)
    idx = rng.integers(0, 4, (4, 5)).astype(np.uint8)
    p = _frombytes("P", idx)
    p.putpalette(palette.ravel().tolist())
    cases["P"] = (p, palette[idx])
    pt = p.copy()
    pt.info["transparency"] = 2  # palette entry 2 fully transparent
    cases["P+transparency"] = (pt, np.where((idx == 2)[..., None], 255, palette[idx]))
    pa = _frombytes("PA", np.dstack([idx, alpha]))
    pa.putpalette(palette.ravel().tolist())
    cases["PA"] = (pa, _composite(palette[idx], alpha))
    cmyk = rng.integers(0, 256, (4, 5, 4)).astype(np.uint8)
    k = cmyk[..., 3:].astype(np.float64)
    exp = np.round((255.0 - cmyk[..., :3]) * (255.0 - k) / 255.0).astype(np.uint8)
    cases["CMYK"] = (_frombytes("CMYK", cmyk), exp)
    cases["RGB"] = (_frombytes("RGB", rgb), rgb)
    return cases


MODE_CASES = _mode_cases()
# file formats that store each mode as itself (the loader path, not only the conversion)
FILE_FORMATS = {"I;16": "png", "I;16B": "tiff", "I": "tiff", "F": "tiff", "L": "png",
                "1": "png", "RGBA": "png", "LA": "png", "P": "png", "P+transparency": "png",
                "CMYK": "tiff", "RGB": "png"}  # fmt: skip


@pytest.mark.parametrize("mode", sorted(MODE_CASES))
def test_every_mode_converts_to_the_expected_8bit_rgb(mode, tmp_path):
    img, expected = MODE_CASES[mode]
    out = to_rgb(img)
    assert out.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(out), expected)
    fmt = FILE_FORMATS.get(mode)
    if fmt:
        path = tmp_path / f"img.{fmt}"
        kw = {"transparency": 2} if mode == "P+transparency" else {}
        img.save(path, **kw)
        with Image.open(path) as check:  # the file really holds this mode
            assert check.mode == img.mode
        np.testing.assert_array_equal(np.asarray(load_rgb(str(path))), expected)


def test_sixteen_bit_png_is_not_saturated(tmp_path):
    # the reported case: a mid-grey 16-bit PNG came out (almost) all white
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    out = np.asarray(load_rgb(str(tmp_path / "ramp.png")))
    assert (out == 255).mean() < 0.01
    np.testing.assert_array_equal(out[..., 0], np.round(ramp / 257.0).astype(np.uint8))
    # and the pretraining loader decodes it the same way in both pipelines
    os.makedirs(tmp_path / "tree" / "a")
    for i in range(2):
        Image.fromarray(ramp).save(tmp_path / "tree" / "a" / f"{i}.png")
    ds = build_image_dataset(str(tmp_path / "tree"))
    for pipeline in ("fast", "pil"):
        img, _ = TwoViewDataset(ds, AugmentConfig(size=16), 0, pipeline)._open(0)
        assert img.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(img), out)


def test_lab_and_unknown_modes():
    lab = Image.new("LAB", (1, 1), (255, 128, 128))  # L = 100, a = b = 0: white
    assert all(c >= 250 for c in to_rgb(lab).getpixel((0, 0)))
    with pytest.raises(CorruptImageError, match="'La'"):
        to_rgb(Image.new("La", (1, 1)))


def _exif_image(path, orientation, size=(40, 20)):
    """A JPEG whose pixels are ``size`` (w, h): left half red, right half blue, with an EXIF
    orientation tag."""
    a = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    a[:, : size[0] // 2] = (255, 0, 0)
    a[:, size[0] // 2 :] = (0, 0, 255)
    img = Image.fromarray(a)
    exif = img.getexif()
    exif[0x0112] = orientation
    img.save(path, exif=exif, quality=95)
    return path


@pytest.mark.parametrize(
    "orientation, size", [(1, (40, 20)), (3, (40, 20)), (6, (20, 40)), (8, (20, 40)), (5, (20, 40))]
)
def test_exif_orientation_is_applied_everywhere(tmp_path, orientation, size):
    path = _exif_image(tmp_path / "x.jpg", orientation)
    img = load_rgb(str(path))
    assert img.size == size
    if orientation == 6:  # rotate 90 clockwise to display: the red (left) half is on top
        top = np.asarray(img)[2, 10]
        assert top[0] > 200 and top[2] < 60
    # the pretraining loader, both pipelines, and the evaluation datasets read it the same way
    (tmp_path / "c").mkdir()
    os.replace(path, tmp_path / "c" / "x.jpg")
    ds = build_image_dataset(str(tmp_path))
    for pipeline in ("fast", "pil"):
        got, _ = TwoViewDataset(ds, AugmentConfig(size=16), 0, pipeline)._open(0)
        assert got.size == size, pipeline
    assert ds[0][0].size == size


@pytest.mark.parametrize("size, ok", [((10, 10), True), ((11, 10), False), ((1, 101), False)])
def test_pixel_limit_refuses_large_images_with_a_clear_message(tmp_path, monkeypatch, size, ok):
    monkeypatch.setenv("IMSVD_MAX_IMAGE_PIXELS", "100")
    path = tmp_path / "big.png"
    Image.new("1", size).save(path)
    if ok:
        assert load_rgb(str(path)).size == size
        return
    with pytest.raises(CorruptImageError, match=r"over the limit of 100 pixels.*IMSVD_MAX_IMAGE"):
        load_rgb(str(path))
    (tmp_path / "c").mkdir()
    os.replace(path, tmp_path / "c" / "big.png")
    ds = build_image_dataset(str(tmp_path))
    got, _ = TwoViewDataset(ds, AugmentConfig(size=16), 0, "fast")._open(0)
    assert got is None  # unreadable: counted and replaced, never decoded


def test_default_pixel_limit_refuses_a_small_file_that_decodes_huge(tmp_path, monkeypatch):
    monkeypatch.delenv("IMSVD_MAX_IMAGE_PIXELS", raising=False)
    path = tmp_path / "bomb.png"
    Image.new("1", (10000, 10000)).save(path, optimize=True)
    assert path.stat().st_size < 50_000
    with pytest.raises(CorruptImageError, match="10000 x 10000"):
        load_rgb(str(path))
    for bad in ("0", "-5", "many"):
        monkeypatch.setenv("IMSVD_MAX_IMAGE_PIXELS", bad)
        with pytest.raises(PixelLimitError, match="IMSVD_MAX_IMAGE_PIXELS"):
            load_rgb(str(path))


@pytest.mark.parametrize("bad", ["1e9", "many", "0", "-5", "1.5"])
def test_a_malformed_pixel_limit_is_one_error_not_unreadable_images(tmp_path, monkeypatch, bad):
    (tmp_path / "c").mkdir()
    noise_image(tmp_path / "c" / "a.png")
    ds = build_image_dataset(str(tmp_path))
    monkeypatch.setenv("IMSVD_MAX_IMAGE_PIXELS", bad)
    assert not issubclass(PixelLimitError, DataError)  # the readers catch DataError / ValueError
    message = rf"IMSVD_MAX_IMAGE_PIXELS='{bad}' must be a positive integer"
    with pytest.raises(PixelLimitError, match=message):
        load_rgb(ds.samples[0][0])
    with pytest.raises(PixelLimitError, match=message):
        ds[0]  # not "unreadable, dropped"
    for pipeline in ("fast", "pil"):
        with pytest.raises(PixelLimitError, match=message):
            TwoViewDataset(ds, AugmentConfig(size=16), 0, pipeline)._open(0)
    assert ds.num_skipped == 0


def test_a_raised_pixel_limit_reaches_pil_before_any_image_is_opened(tmp_path, monkeypatch):
    # PIL refuses in Image.open an image over twice its own limit, before check_pixels runs:
    # emulated with a small PIL limit (1000, so 60 x 60 is over 2 x 1000) and a larger setting
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    monkeypatch.setenv("IMSVD_MAX_IMAGE_PIXELS", "5000")
    (tmp_path / "c").mkdir()
    path = tmp_path / "c" / "big.png"
    Image.new("RGB", (60, 60)).save(path)
    assert load_rgb(str(path)).size == (60, 60)
    assert Image.MAX_IMAGE_PIXELS == 5000
    # the loader opens the file first, then checks: the limit is given to PIL at import
    script = (
        "import sys; from PIL import Image; Image.MAX_IMAGE_PIXELS = 1000\n"
        "from pretrain.data.loader import TwoViewDataset\n"
        "from pretrain.data.datasets import build_image_dataset\n"
        "from pretrain.data.transforms import AugmentConfig\n"
        "ds = build_image_dataset(sys.argv[1])\n"
        "img, _ = TwoViewDataset(ds, AugmentConfig(size=16), 0, 'fast')._open(0)\n"
        "print(Image.MAX_IMAGE_PIXELS, img.size, ds.num_skipped)\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["5000", "(60,", "60)", "0"]
