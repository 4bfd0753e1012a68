"""Decoding a corpus of real-world-messy files generated here: every file gets a status, none raises."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from sdsg_ray.imaging import (
    decode_image,
    encode_png,
    image_grid,
    load_batch,
    to_tensor,
    to_uint8,
)
from sdsg_ray.storage import Storage, join

R = 16


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _noise(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _png_with_size(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height (valid CRC) but carries almost no data: a bomb header."""
    data = bytearray(_save(Image.new("L", (1, 1)), "PNG"))
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
    return bytes(data)


def _exif_rotated() -> bytes:
    """40x20 landscape stored red|blue, tagged orientation 6 (display rotated 90° clockwise)."""
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = (255, 0, 0)
    arr[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    return _save(Image.fromarray(arr), "JPEG", quality=95, exif=exif.tobytes())


def _corpus() -> dict[str, tuple[bytes, str]]:
    """name -> (bytes, expected status)."""
    jpeg = _save(_noise(64, 48), "JPEG", quality=90)
    png = _save(_noise(64, 48, 1), "PNG")
    palette = Image.new("P", (30, 20))
    palette.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    palette.paste(1, (0, 0, 15, 20))  # left half index 1 (green), right half index 0 (red)
    transparent = palette.copy()
    transparent.info["transparency"] = 0
    gray16 = Image.fromarray(np.full((20, 30), 32768, np.uint16))
    assert gray16.mode.startswith("I;16")
    return {
        "zero.jpg": (b"", "error"),
        "truncated.jpg": (jpeg[: len(jpeg) // 2], "error"),
        "truncated.png": (png[: len(png) // 2], "error"),
        "html.jpg": (b"<!doctype html><html><body>403 Forbidden</body></html>", "error"),
        "bomb-pil.png": (_png_with_size(30000, 30000), "error"),  # past PIL's own hard limit
        "bomb-ours.png": (_png_with_size(9000, 9000), "error"),  # 81 MP: past MAX_IMAGE_PIXELS only
        "ok.jpg": (jpeg, "ok"),
        "ok.png": (png, "ok"),
        "gray.png": (_save(Image.new("L", (20, 30), 77), "PNG"), "ok"),
        "bilevel.png": (_save(Image.new("1", (20, 30), 1), "PNG"), "ok"),
        "palette.gif": (_save(palette, "GIF"), "ok"),
        "palette-transparent.png": (_save(transparent, "PNG", transparency=0), "ok"),
        "rgba.png": (_save(Image.new("RGBA", (20, 20), (0, 0, 0, 0)), "PNG"), "ok"),
        "la.png": (_save(Image.new("LA", (20, 20), (0, 128)), "PNG"), "ok"),
        "cmyk.jpg": (_save(Image.new("CMYK", (20, 20), (0, 255, 255, 0)), "JPEG", quality=95), "ok"),
        "gray16.png": (_save(gray16, "PNG"), "ok"),
        "exif.jpg": (_exif_rotated(), "ok"),
        "tiny.bmp": (_save(Image.new("RGB", (3, 5), (10, 200, 30)), "BMP"), "ok"),
        "large.webp": (_save(_noise(300, 200), "WEBP"), "ok"),
    }


@pytest.fixture(scope="module")
def decoded() -> dict[str, tuple]:
    return {name: (decode_image(data, R), want) for name, (data, want) in _corpus().items()}


def test_every_file_gets_status_and_message(decoded):
    for name, (d, want) in decoded.items():
        assert d.status == want, f"{name}: {d}"
        if want == "error":
            assert d.image is None and d.error, name
        else:
            assert d.error is None and d.image.shape == (R, R, 3) and d.image.dtype == np.uint8, name


def test_error_messages_say_what_happened(decoded):
    assert "empty" in decoded["zero.jpg"][0].error
    assert "truncated" in decoded["truncated.jpg"][0].error
    assert "not an image" in decoded["html.jpg"][0].error
    assert "decompression bomb" in decoded["bomb-pil.png"][0].error
    assert "decompression bomb" in decoded["bomb-ours.png"][0].error
    assert "MAX_IMAGE_PIXELS" in decoded["bomb-ours.png"][0].error


def test_colour_conversions(decoded):
    def mean(name):
        return decoded[name][0].image.reshape(-1, 3).mean(0)

    assert np.allclose(mean("gray.png"), 77, atol=1)
    assert np.allclose(mean("bilevel.png"), 255, atol=1)
    assert np.allclose(mean("rgba.png"), 255, atol=1)  # fully transparent -> the white background
    assert np.allclose(mean("la.png"), (255 + 0) / 2, atol=2)  # half-transparent black on white
    assert np.allclose(mean("gray16.png"), 128, atol=1)  # scaled from 16 bit, not clipped to 255
    assert np.allclose(mean("cmyk.jpg"), (255, 0, 0), atol=8)  # C=0 M=Y=255 is red
    pal = decoded["palette-transparent.png"][0].image
    assert np.allclose(pal[:, R // 2 + 2 :], 255, atol=2)  # index 0 (red) is transparent -> white
    assert np.allclose(pal[:, : R // 2 - 2], (0, 255, 0), atol=2)
    pal = decoded["palette.gif"][0].image
    assert np.allclose(pal[:, R - 2 :], (255, 0, 0), atol=2)


def test_exif_rotation_applied(decoded):
    """Orientation 6 turns the stored red|blue landscape into a red-over-blue portrait."""
    image = decoded["exif.jpg"][0].image.astype(int)
    top, bottom = image[: R // 2 - 2].reshape(-1, 3).mean(0), image[R // 2 + 2 :].reshape(-1, 3).mean(0)
    assert top[0] > 200 and top[2] < 60, top
    assert bottom[2] > 200 and bottom[0] < 60, bottom


def test_center_crop_of_landscape():
    arr = np.zeros((20, 60, 3), np.uint8)
    arr[:, 20:40] = 255  # only the centre third is white
    d = decode_image(_save(Image.fromarray(arr), "PNG"), R)
    assert d.image.min() >= 240  # the filter reaches a pixel past the crop: edges are 248


def test_load_batch_reads_and_decodes_with_errors(tmp_path):
    storage = Storage()
    corpus = _corpus()
    uris = []
    for name, (data, _) in corpus.items():
        uri = join(str(tmp_path), name)
        storage.write_bytes(uri, data)
        uris.append(uri)
    uris.append(join(str(tmp_path), "missing.jpg"))
    batch = load_batch(uris, storage, R, threads=4)
    assert list(batch["key"]) == uris
    assert batch["image"].shape == (len(uris), R, R, 3) and batch["image"].dtype == np.uint8
    expected = [want for _, want in corpus.values()] + ["error"]
    assert list(batch["status"]) == expected
    assert "read failed" in batch["error"][-1] and "missing.jpg" in batch["error"][-1]
    for status, error, image in zip(batch["status"], batch["error"], batch["image"]):
        assert (error == "") == (status == "ok")
        if status == "error":
            assert not image.any()
    assert load_batch([], storage, R)["image"].shape == (0, R, R, 3)


def test_tensor_roundtrip_png_and_grid():
    images = np.random.default_rng(0).integers(0, 256, (5, R, R, 3), dtype=np.uint8)
    x = to_tensor(images)
    assert x.shape == (5, 3, R, R) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    assert np.array_equal(to_uint8(x), images)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(encode_png(images[0])))), images[0])
    grid = image_grid(images, ncols=3, pad=1)
    assert grid.shape == (2 * (R + 1) + 1, 3 * (R + 1) + 1, 3)
    assert np.array_equal(grid[1 : 1 + R, 1 + R + 1 : 1 + 2 * R + 1], images[1])
