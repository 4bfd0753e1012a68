"""Bytes -> RGB uint8 at the model resolution, or a per-image error; tensors <-> arrays; PNG grids.

Internet photos are messy: grayscale, palette and 16-bit files, CMYK JPEGs, EXIF-rotated phone shots,
truncated downloads, HTML pages saved as .jpg, decompression bombs. :func:`decode_image` turns each into
either an RxRx3 uint8 array or an error row with a message; it never raises, so one bad file never
aborts a scoring job. Truncated files are errors, never silently padded (``LOAD_TRUNCATED_IMAGES`` stays
off and ``load()`` runs inside the ``try``).
"""

from __future__ import annotations

import io
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from sdsg_ray.shards import read_samples
from sdsg_ray.storage import Storage

if TYPE_CHECKING:
    import torch


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# Larger images are rejected before decoding (a 64-megapixel RGB image is ~200 MB of pixels). Our own
# check, so it holds whatever PIL.Image.MAX_IMAGE_PIXELS another library set process-wide.
MAX_IMAGE_PIXELS = 64 * 1024 * 1024
# Transparent pixels are composited on white: web images with alpha (product shots, logos, stickers)
# are designed to be shown on white pages, and black would invent dark silhouettes.
ALPHA_BACKGROUND = (255, 255, 255)
_RESAMPLE = Image.Resampling.LANCZOS  # antialiased when downscaling (the filter widens with the scale)


@dataclass
class Decoded:
    status: str  # "ok" | "error"
    error: str | None  # None when ok
    image: np.ndarray | None  # HWC uint8 RxRx3 when ok


def _error(message: str) -> Decoded:
    return Decoded("error", message, None)


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: alpha composited on white, 16/32-bit grayscale scaled (not clipped) to 8 bit."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        values = np.asarray(img, dtype=np.float64)
        # 16-bit data (the usual case for I/I;16) spans 0..65535; PIL's convert would clip it at 255.
        scale = 257.0 if mode.startswith("I;16") or values.max(initial=0) > 255 else 1.0
        gray = np.clip(np.rint(values / scale), 0, 255).astype(np.uint8)
        return Image.fromarray(np.repeat(gray[..., None], 3, axis=2))
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, P, CMYK (incl. Adobe-inverted, handled by PIL), YCbCr, ...


def decode_image(data: bytes, resolution: int) -> Decoded:
    """Decode ``data`` to an RxRx3 uint8 RGB array: EXIF orientation applied, shorter side resized to
    ``resolution`` (LANCZOS), centre-cropped. Never raises: failures come back as status "error"."""
    if not data:
        return _error("empty file (0 bytes)")
    try:
        source = img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:
        return _error(f"decompression bomb: {err}")
    except UnidentifiedImageError:
        return _error(f"not an image: unrecognised format ({len(data)} bytes, starts {data[:8]!r})")
    except Exception as err:  # malformed headers raise a zoo of types
        return _error(f"unreadable header: {type(err).__name__}: {err}")
    try:
        width, height = img.size
        if width <= 0 or height <= 0:
            return _error(f"invalid image size {width}x{height}")
        if width * height > MAX_IMAGE_PIXELS:
            return _error(f"decompression bomb: {width}x{height} = {width * height} pixels exceeds the limit "
                          f"{MAX_IMAGE_PIXELS} (sdsg_ray.imaging.MAX_IMAGE_PIXELS)")
        # JPEG only: let libjpeg decode at 1/2, 1/4 or 1/8 scale, still >= resolution on both sides.
        img.draft(None, (resolution, resolution))
        img.load()  # decodes now, so truncated or corrupt data fails here, inside the try
        try:
            img = ImageOps.exif_transpose(img)
        except Exception:
            pass  # malformed EXIF is common on the web; the pixels are still good, keep them as stored
        img = _to_rgb(img)  # always RGB, so the array below is [R, R, 3]
        side = min(img.size)
        left, top = (img.size[0] - side) / 2, (img.size[1] - side) / 2
        img = img.resize((resolution, resolution), _RESAMPLE, box=(left, top, left + side, top + side))
        array = np.asarray(img, dtype=np.uint8)
    except Image.DecompressionBombError as err:
        return _error(f"decompression bomb: {err}")
    except Exception as err:
        return _error(f"corrupt or truncated image: {type(err).__name__}: {err}")
    finally:
        source.close()
    return Decoded("ok", None, array)


def load_batch(
    uris: Sequence[str], storage: Storage, resolution: int, threads: int = 8
) -> dict[str, np.ndarray]:
    """Read and decode many images with a thread pool (I/O bound on object stores; PIL's decoders
    release the GIL). Returns columns ``key``, ``status``, ``error`` ("" when ok) and ``image``
    (uint8 [N, R, R, 3], zeros on error rows). A read failure (missing object, access denied) is an
    error row like a corrupt file. ``uris`` may hold sample addresses inside shards (sdsg_ray.shards)."""
    uris = list(uris)
    # Samples inside shards (sample addresses) are read grouped by shard, in a few ranged reads.
    in_shards = read_samples(uris, storage)

    def one(i: int) -> Decoded:
        try:
            data = in_shards[i] if i in in_shards else storage.read_bytes(uris[i])
            if isinstance(data, Exception):
                raise data
        except Exception as err:
            return _error(f"read failed: {err}")
        return decode_image(data, resolution)

    images = np.zeros((len(uris), resolution, resolution, 3), dtype=np.uint8)
    status = np.empty(len(uris), dtype=object)
    errors = np.empty(len(uris), dtype=object)
    if uris:
        with ThreadPoolExecutor(max_workers=max(1, min(threads, len(uris)))) as pool:
            for i, decoded in enumerate(pool.map(one, range(len(uris)))):
                status[i] = decoded.status
                errors[i] = decoded.error or ""
                if decoded.image is not None:
                    images[i] = decoded.image
    keys = np.empty(len(uris), dtype=object)
    keys[:] = uris
    return {"key": keys, "status": status, "error": errors, "image": images}


def to_tensor(images: np.ndarray) -> "torch.Tensor":
    """NHWC uint8 -> NCHW float32 in [-1, 1]."""
    import torch

    assert images.ndim == 4 and images.shape[-1] == 3, f"expected NHWC RGB, got {images.shape}"
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    return x.to(torch.float32) / 127.5 - 1.0


def to_uint8(images: "torch.Tensor") -> np.ndarray:
    """NCHW float in [-1, 1] -> NHWC uint8 (rounded, clipped)."""
    import torch

    assert images.ndim == 4 and images.shape[1] == 3, f"expected NCHW RGB, got {tuple(images.shape)}"
    x = (images.detach().float() + 1.0) * 127.5
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def encode_png(image: np.ndarray) -> bytes:
    """HWC (or HW) uint8 -> PNG bytes."""
    assert image.dtype == np.uint8, f"expected uint8, got {image.dtype}"
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def square_grid(images: np.ndarray) -> np.ndarray:
    """NHWC -> one HWC grid as near square as the count allows (ceil(sqrt(N)) columns), row-major."""
    return image_grid(images, ncols=math.ceil(math.sqrt(len(images))))


def image_grid(images: np.ndarray, ncols: int, pad: int = 0, pad_value: int = 255) -> np.ndarray:
    """NHWC -> one HWC grid, ``ncols`` wide, row-major; empty cells and ``pad``-pixel gaps filled."""
    assert images.ndim == 4, f"expected NHWC, got {images.shape}"
    n, h, w, c = images.shape
    ncols = max(1, min(ncols, n))
    nrows = -(-n // ncols)
    grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), pad_value, dtype=images.dtype)
    for i in range(n):
        r, col = divmod(i, ncols)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y : y + h, x : x + w] = images[i]
    return grid
