"""One shard of URLs -> one img2dataset-layout shard: fetch (bounded threads, retries), crop, resize, write.

Per URL the paper's download script does: fetch, crop ``img[y0:y1, x0:x1]``, RGBA -> RGB, resize to a
square with LANCZOS. Without a box the image is centre-cropped to a square first (as
:func:`sdsg_ray.imaging.decode_image` does) rather than squashed. Every URL gets a status, as img2dataset
records them: ``success``, ``failed_to_download`` (HTTP error, timeout, connection) or
``failed_to_resize`` (the bytes are not a readable image, or the box is outside it), with the error.

The tar holds ``<key>.jpg`` + ``<key>.json`` for the successes only (as img2dataset writes it); the
parquet holds one row per URL with the JPEG bytes (null on failure); ``<shard>_stats.json`` holds the
counts and every URL's status. The tar (or parquet) is written first and the stats file last, each in one
atomic put, so a shard is finished exactly when its stats file exists next to its data.
"""

from __future__ import annotations

import io
import json
import logging
import socket
import tarfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageOps

from sdsg_ray.config import IngestConfig
from sdsg_ray.imaging import MAX_IMAGE_PIXELS
from sdsg_ray.storage import Storage, join

from .urls import UrlItem

log = logging.getLogger(__name__)

SUCCESS, FAILED_DOWNLOAD, FAILED_RESIZE = "success", "failed_to_download", "failed_to_resize"
USER_AGENT = "sdsg-ray-ingest/0.1"


def shard_data_name(shard: int, fmt: str) -> str:
    return f"{shard:05d}.{fmt}"


def shard_stats_name(shard: int) -> str:
    return f"{shard:05d}_stats.json"


def sample_key(shard: int, position: int, shard_size: int) -> str:
    """img2dataset's key: the shard number then the position inside it, zero-padded."""
    return f"{shard:05d}{position:0{len(str(max(shard_size - 1, 1)))}d}"


@dataclass
class Fetched:
    key: str
    url: str
    status: str
    error: str = ""
    jpeg: bytes | None = None
    width: int | None = None
    height: int | None = None
    original_width: int | None = None
    original_height: int | None = None
    box: tuple[int, int, int, int] | None = None

    def meta(self) -> dict:
        return {
            "key": self.key, "url": self.url, "status": self.status, "error_message": self.error or None,
            "width": self.width, "height": self.height, "original_width": self.original_width,
            "original_height": self.original_height, "bounding_box": list(self.box) if self.box else None,
        }


def _retryable(err: BaseException) -> bool:
    if isinstance(err, urllib.error.HTTPError):
        return err.code >= 500 or err.code == 429
    return isinstance(err, (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError, OSError))


def fetch(url: str, timeout_s: float, retries: int) -> bytes:
    """The body of ``url``; retries timeouts, connection errors, truncated bodies and 5xx/429 with backoff."""
    for attempt in range(retries + 1):
        try:
            request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                return response.read()
        except Exception as err:  # http.client.IncompleteRead is an HTTPException, not an OSError
            import http.client

            transient = _retryable(err) or isinstance(err, http.client.HTTPException)
            if attempt == retries or not transient:
                raise
            time.sleep(min(0.2 * 2**attempt, 5.0))
    raise AssertionError("unreachable")


def process(data: bytes, box: tuple[int, int, int, int] | None, resolution: int, quality: int) -> tuple[bytes, int, int]:
    """Crop to the box (y0, y1, x0, x1), RGB, square LANCZOS resize; JPEG bytes and the original size."""
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        width, height = im.size
        if im.mode in ("RGBA", "LA", "P"):
            im = im.convert("RGBA")
            background = Image.new("RGBA", im.size, (255, 255, 255, 255))
            im = Image.alpha_composite(background, im)
        im = im.convert("RGB")
        if box is not None:
            y0, y1, x0, x1 = box
            if not (0 <= y0 < y1 <= height and 0 <= x0 < x1 <= width):
                raise ValueError(f"bounding box {list(box)} outside the {width}x{height} image")
            im = im.crop((x0, y0, x1, y1))
        else:
            im = ImageOps.fit(im, (min(im.size),) * 2, method=Image.Resampling.LANCZOS)
        im = im.resize((resolution, resolution), Image.Resampling.LANCZOS)
        out = io.BytesIO()
        im.save(out, format="JPEG", quality=quality)
    return out.getvalue(), width, height


def fetch_one(key: str, item: UrlItem, cfg: IngestConfig) -> Fetched:
    result = Fetched(key, item.url, SUCCESS, box=item.box)
    try:
        data = fetch(item.url, cfg.timeout_s, cfg.retries)
    except Exception as err:
        result.status, result.error = FAILED_DOWNLOAD, f"{type(err).__name__}: {err}"
        return result
    try:
        result.jpeg, result.original_width, result.original_height = process(data, item.box, cfg.resolution, cfg.jpeg_quality)
        result.width = result.height = cfg.resolution
    except Exception as err:  # not an image, truncated, box outside it
        result.status, result.error = FAILED_RESIZE, f"{type(err).__name__}: {err}"
    return result


def _tar_bytes(results: list[Fetched]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for r in results:
            if r.status != SUCCESS:
                continue
            for name, blob in ((f"{r.key}.jpg", r.jpeg), (f"{r.key}.json", json.dumps(r.meta()).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(blob)
                info.mtime = 0
                tar.addfile(info, io.BytesIO(blob))
    return buf.getvalue()


def _parquet_bytes(results: list[Fetched]) -> bytes:
    table = pa.table({
        "key": pa.array([r.key for r in results], pa.string()),
        "url": pa.array([r.url for r in results], pa.string()),
        "status": pa.array([r.status for r in results], pa.string()),
        "error_message": pa.array([r.error or None for r in results], pa.string()),
        "width": pa.array([r.width for r in results], pa.int32()),
        "height": pa.array([r.height for r in results], pa.int32()),
        "original_width": pa.array([r.original_width for r in results], pa.int32()),
        "original_height": pa.array([r.original_height for r in results], pa.int32()),
        "jpg": pa.array([r.jpeg for r in results], pa.binary()),
    })
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def ingest_shard(shard: int, items: list[UrlItem], storage: Storage, cfg: IngestConfig) -> dict:
    """Download one shard's URLs (cfg.threads at a time) and write its data file, then its stats file."""
    started = time.time()
    keys = [sample_key(shard, i, cfg.shard_size) for i in range(len(items))]
    with ThreadPoolExecutor(max_workers=max(1, min(cfg.threads, len(items)))) as pool:
        results = list(pool.map(lambda ki: fetch_one(ki[0], ki[1], cfg), zip(keys, items)))
    data = _tar_bytes(results) if cfg.format == "tar" else _parquet_bytes(results)
    storage.write_bytes(join(cfg.out, shard_data_name(shard, cfg.format)), data)
    counts = {s: sum(r.status == s for r in results) for s in (SUCCESS, FAILED_DOWNLOAD, FAILED_RESIZE)}
    stats = {
        "count": len(results),
        "successes": counts[SUCCESS],
        "failed_to_download": counts[FAILED_DOWNLOAD],
        "failed_to_resize": counts[FAILED_RESIZE],
        "duration": round(time.time() - started, 3),
        "start_time": started,
        "end_time": time.time(),
        "status_dict": {k: v for k, v in counts.items() if v},
        "samples": [{k: r.meta()[k] for k in ("key", "url", "status", "error_message")} for r in results],
    }
    storage.write_text(join(cfg.out, shard_stats_name(shard)), json.dumps(stats))  # last: marks the shard finished
    return {k: stats[k] for k in ("count", "successes", "failed_to_download", "failed_to_resize", "duration")}
