"""img2dataset-layout shards and URL lists: `sdsg ingest` from a loopback HTTP server (generated images,
404s, truncated bodies, slow and flaky answers), sample addresses inside .tar/.parquet shards, and the
shards scored, selected and read back as stage-2 training data."""

from __future__ import annotations

import io
import json
import tarfile
import threading
import time
import urllib.parse
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from sdsg_ray import shards
from sdsg_ray.config import ModelConfig, load_config
from sdsg_ray.imaging import load_batch
from sdsg_ray.ingest.download import process
from sdsg_ray.ingest.urls import read_url_list
from sdsg_ray.manifest import list_images, read_manifest, resolve_images
from sdsg_ray.storage import get_storage, join

N_GOOD, N_MISSING, N_TRUNCATED, N_SLOW, N_FLAKY = 14, 3, 3, 2, 2
SHARD_SIZE = 6
LOOPBACK = "127.0.0.1/32"  # the test servers' network; by default ingest refuses it like any non-public one


def _png(index: int, size: int = 48) -> bytes:
    """A smooth image that depends on index (gradient + blob), PNG, at a non-model size."""
    rng = np.random.default_rng(index)
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = rng.uniform(0, 255, 3) + xx[..., None] * rng.uniform(-120, 120, 3) + yy[..., None] * rng.uniform(-120, 120, 3)
    cy, cx = rng.uniform(0.2, 0.8, 2)
    img[(yy - cy) ** 2 + (xx - cx) ** 2 < 0.03] = rng.uniform(0, 255, 3)
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


class ImageServer:
    """127.0.0.1 HTTP server in a thread: /img/i.png, /missing/i (404), /trunc/i.png (half a PNG with a
    matching Content-Length), /slow/i.png (0.3 s late), /flaky/i.png (503 on the first request).
    ``requests`` counts every request by path."""

    def __init__(self) -> None:
        self.requests: Counter = Counter()
        self.slower_s = 2.0  # /slower/i.png
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                with server.lock:
                    server.requests[self.path] += 1
                    seen = server.requests[self.path]
                kind, _, name = self.path.strip("/").partition("/")
                index = int(name.split(".")[0]) if name.split(".")[0].isdigit() else 0
                if kind == "missing" or (kind == "flaky" and seen == 1):
                    self.send_response(404 if kind == "missing" else 503)
                    self.end_headers()
                    return
                body = _png(index)
                if kind == "trunc":
                    body = body[: len(body) // 2]
                elif kind == "slow":
                    time.sleep(0.3)
                elif kind == "slower":
                    time.sleep(server.slower_s)
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def server():
    s = ImageServer()
    yield s
    s.close()


def url_list(base: str) -> list[str]:
    """Good, failing and slow URLs interleaved, so that every shard of 6 holds a mix."""
    urls = [f"{base}/img/{i}.png" for i in range(N_GOOD)]
    urls[1:1] = [f"{base}/missing/{i}" for i in range(N_MISSING)]
    urls[7:7] = [f"{base}/trunc/{i}.png" for i in range(N_TRUNCATED)]
    urls[13:13] = [f"{base}/slow/{100 + i}.png" for i in range(N_SLOW)]
    urls[19:19] = [f"{base}/flaky/{200 + i}.png" for i in range(N_FLAKY)]
    return urls


def ingest_config(urls: str, out: str, fmt: str = "tar", **extra):
    values = {"ingest.urls": urls, "ingest.out": out, "ingest.format": fmt, "ingest.resolution": 32,
              "ingest.shard_size": SHARD_SIZE, "ingest.threads": 4, "ingest.tasks": 2, "ingest.retries": 2,
              "ingest.timeout_s": 5.0, "ingest.allow_networks": [LOOPBACK], **extra}
    return load_config(None, values)


# ----- without Ray -------------------------------------------------------------------------------


def _tar_shard(path, samples: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, blob in samples.items():
            for name, data in ((f"{key}.jpg", blob), (f"{key}.json", json.dumps({"key": key}).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_samples_inside_tar_and_parquet_shards_read_with_a_status_each(tmp_path) -> None:
    """A prefix of shards lists one address per image (metadata parquets skipped); load_batch decodes
    them, a broken sample and an img2dataset failed row are error rows, the good ones equal the source."""
    storage = get_storage()
    good = {f"0000{i}": _png(i) for i in range(3)}
    _tar_shard(tmp_path / "00000.tar", {**good, "00009": b"not an image"})
    pq.write_table(pa.table({
        "key": ["00010", "00011"], "url": ["http://x/a", "http://x/b"], "status": ["success", "failed_to_download"],
        "error_message": [None, "HTTP Error 404"], "jpg": pa.array([_png(7), None], pa.binary()),
    }), tmp_path / "00001.parquet")
    pq.write_table(pa.table({"key": ["00000"], "url": ["http://x/a"]}), tmp_path / "00000_meta.parquet")
    (tmp_path / "00000_stats.json").write_text("{}")

    keys = list(list_images(str(tmp_path), storage))
    assert len(keys) == 6 and all(shards.parse_address(k) for k in keys)
    assert [shards.parse_address(k).key for k in keys] == ["00000", "00001", "00002", "00009", "00010", "00011"]
    batch = load_batch(keys, storage, 32)
    assert batch["status"].tolist() == ["ok", "ok", "ok", "error", "ok", "error"]
    assert "failed_to_download" in batch["error"][5] and "HTTP Error 404" in batch["error"][5]
    reference = load_batch([str(tmp_path / "ref.png")], storage, 32)  # missing: an error row
    assert reference["status"][0] == "error"
    (tmp_path / "ref.png").write_bytes(_png(1))
    reference = load_batch([str(tmp_path / "ref.png")], storage, 32)
    np.testing.assert_array_equal(batch["image"][1], reference["image"][0])
    assert shards.read_bytes(keys[4], storage) == _png(7)
    # a plain file name with '#' is an object, not an address
    assert shards.parse_address(str(tmp_path / "a#key=1.jpg")) is None
    # a single image-bytes parquet is data, not a manifest
    assert len(resolve_images(str(tmp_path / "00001.parquet"), storage)) == 2

    # training reads them: stage 1 on the shard prefix, stage 2 on a kept manifest of addresses
    from sdsg_ray.distributed.train import _check_data
    from sdsg_ray.manifest import write_manifest
    from sdsg_ray.training.loop import load_dataset

    write_manifest([keys[0], keys[4]], str(tmp_path / "sel" / "kept.parquet"), storage)
    for data, readable in ((str(tmp_path), 5), (str(tmp_path / "sel" / "kept.parquet"), 2)):  # 4 samples + ref.png
        config = load_config(None, {"train.data": data})
        _check_data(config)
        dataset = load_dataset(config, storage, progress=False)
        assert len(dataset) == readable and set(dataset.failed) <= {keys[3], keys[5]}


def test_url_lists_and_the_papers_crop(tmp_path) -> None:
    """The paper's JSON (image_name + [y0, y1, x0, x1]), CSV and text lists; crop takes img[y0:y1, x0:x1]."""
    storage = get_storage()
    (tmp_path / "l.json").write_text(json.dumps([{"image_name": "http://a/1.jpg", "bounding_box": [0, 20, 30, 60]},
                                                 {"image_name": "http://a/2.jpg"}]))
    (tmp_path / "l.csv").write_text("url,caption\nhttp://a/1.jpg,x\nhttp://a/2.jpg,y\n")
    (tmp_path / "l.txt").write_text("http://a/1.jpg\n\nhttp://a/2.jpg\n")
    items = read_url_list(str(tmp_path / "l.json"), storage)
    assert items[0].box == (0, 20, 30, 60) and items[1].box is None
    assert [i.url for i in read_url_list(str(tmp_path / "l.csv"), storage)] == ["http://a/1.jpg", "http://a/2.jpg"]
    assert len(read_url_list(str(tmp_path / "l.txt"), storage)) == 2
    # Four quadrants (RGBA, 40 high x 80 wide): red | green over blue | white. The box [y0, y1, x0, x1] =
    # [0, 20, 40, 80] is the top-right quadrant (green); read as [y0, x0, y1, x1] it would be rows 0..40,
    # columns 20..80 (a mix of all four), and as PIL's (x0, y0, x1, y1) an empty or different region.
    img = np.zeros((40, 80, 4), np.uint8)
    img[..., 3] = 255
    img[:20, :40, :3] = (255, 0, 0)
    img[:20, 40:, :3] = (0, 255, 0)
    img[20:, :40, :3] = (0, 0, 255)
    img[20:, 40:, :3] = (255, 255, 255)
    buf = io.BytesIO()
    Image.fromarray(img, "RGBA").save(buf, format="PNG")
    jpeg, w, h = process(buf.getvalue(), (0, 20, 40, 80), 16, 95)
    out = np.asarray(Image.open(io.BytesIO(jpeg))).astype(int)
    assert (w, h) == (80, 40) and out.shape == (16, 16, 3)
    np.testing.assert_allclose(out.reshape(-1, 3).mean(0), (0, 255, 0), atol=12)  # all green, nothing else
    jpeg, _, _ = process(buf.getvalue(), (20, 40, 0, 40), 16, 95)  # bottom-left: blue
    np.testing.assert_allclose(np.asarray(Image.open(io.BytesIO(jpeg))).reshape(-1, 3).mean(0), (0, 0, 255), atol=12)
    with pytest.raises(ValueError, match="outside"):
        process(buf.getvalue(), (0, 50, 0, 10), 16, 95)


# ----- untrusted URL lists: the fetch policy, on loopback only --------------------------------------

CAP = 256 * 1024  # ingest.max_bytes in these tests; the valid PNGs are ~7 KB, the bomb ~80 KB
DRIP_S, DEADLINE_S = 0.3, 0.5  # a byte every 0.3 s against a 0.5 s deadline: per-read timeouts never fire


def _png_bomb(side: int = 9000) -> bytes:
    """A valid grayscale PNG of side x side (81 Mpixel > MAX_IMAGE_PIXELS) in ~80 KB: zeros compress well."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer, row = zlib.compressobj(9), b"\0" * (side + 1)  # filter byte + one row of black
    idat = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


class HostileServer:
    """A loopback HTTP server with the answers an untrusted list meets, counting requests by path:
    /img/i.png (valid), /drip/i.png (headers, then one body byte every DRIP_S), /drip-headers (one header
    line every DRIP_S), /big-length (Content-Length over the cap), /big-close (no length, body until close),
    /big-chunked (chunked, over the cap), /bomb.png, /to/<url> (302 to <url>), /loop/n (302 to /loop/n+1),
    /chain/n (n redirects, then an image). Every loop is bounded (drips end after 40 steps)."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.requests: Counter = Counter()
        self.lock = threading.Lock()
        self.bomb = _png_bomb()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def handle(self):
                try:
                    super().handle()
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up: what a deadline or a cap is for

            def _head(self, status: int, headers: dict) -> None:
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()

            def do_GET(self):
                with server.lock:
                    server.requests[self.path] += 1
                kind, _, rest = self.path.strip("/").partition("/")
                if kind == "img":
                    body = _png(int(rest.split(".")[0]))
                    self._head(200, {"Content-Type": "image/png", "Content-Length": len(body)})
                    self.wfile.write(body)
                elif kind == "drip":
                    self._head(200, {"Content-Type": "image/png", "Content-Length": 40})
                    for _ in range(40):
                        self.wfile.write(b"x")
                        self.wfile.flush()
                        time.sleep(DRIP_S)
                elif kind == "drip-headers":
                    self.wfile.write(b"HTTP/1.1 200 OK\r\n")
                    for i in range(40):
                        self.wfile.write(f"X-Drip-{i}: 1\r\n".encode())
                        self.wfile.flush()
                        time.sleep(DRIP_S)
                elif kind == "big-length":
                    self._head(200, {"Content-Length": 4 * CAP})
                    self.wfile.write(b"\0" * 4 * CAP)
                elif kind == "big-close":
                    self._head(200, {"Connection": "close"})
                    for _ in range(16):
                        self.wfile.write(b"\0" * CAP)
                elif kind == "big-chunked":
                    self._head(200, {"Transfer-Encoding": "chunked"})
                    for _ in range(16):
                        self.wfile.write(b"%x\r\n" % CAP + b"\0" * CAP + b"\r\n")
                    self.wfile.write(b"0\r\n\r\n")
                elif kind == "bomb.png":
                    self._head(200, {"Content-Type": "image/png", "Content-Length": len(server.bomb)})
                    self.wfile.write(server.bomb)
                elif kind == "to":
                    self._head(302, {"Location": urllib.parse.unquote(rest), "Content-Length": 0})
                elif kind in ("loop", "chain"):
                    n = int(rest)
                    target = f"/loop/{n + 1}" if kind == "loop" else f"/chain/{n - 1}" if n else "/img/7.png"
                    self._head(302, {"Location": target, "Content-Length": 0})
                else:
                    self._head(404, {"Content-Length": 0})

        self.httpd = ThreadingHTTPServer((host, 0), Handler)
        self.url = f"http://{host}:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def hostile():
    """The hostile server on 127.0.0.1 (allowed in these tests) and a counting one on 127.0.0.2, which
    ``allow_networks: [127.0.0.1/32]`` forbids: its count must stay 0 (refused before connecting)."""
    allowed, forbidden = HostileServer("127.0.0.1"), HostileServer("127.0.0.2")
    yield allowed, forbidden
    allowed.close()
    forbidden.close()


def hostile_cases(allowed: str, forbidden: str) -> dict[str, tuple[str, str, str]]:
    """case -> (URL, expected status, a phrase of the expected message)."""
    quote = urllib.parse.quote
    return {
        "valid image": (f"{allowed}/img/1.png", "success", ""),
        "valid after 2 redirects": (f"{allowed}/chain/2", "success", ""),
        "drip body (deadline)": (f"{allowed}/drip/1.png", "failed_to_download", "deadline"),
        "drip headers (deadline)": (f"{allowed}/drip-headers", "failed_to_download", "deadline"),
        "body over cap, Content-Length": (f"{allowed}/big-length", "failed: too large", "Content-Length"),
        "body over cap, no length": (f"{allowed}/big-close", "failed: too large", "max_bytes"),
        "body over cap, chunked": (f"{allowed}/big-chunked", "failed: too large", "max_bytes"),
        "forbidden address": (f"{forbidden}/img/2.png", "refused: address", "127.0.0.2 is loopback"),
        "redirect to forbidden": (f"{allowed}/to/{quote(forbidden + '/img/3.png', safe='')}", "refused: address",
                                  "127.0.0.2"),
        "redirect to file://": (f"{allowed}/to/{quote('file:///etc/passwd', safe='')}", "refused: scheme", "file"),
        "too many redirects": (f"{allowed}/loop/0", "failed_to_download", "max_redirects"),
        "file://": ("file:///etc/passwd", "refused: scheme", "file"),
        "ftp://": (f"ftp://{allowed.split('//')[1]}/img/4.png", "refused: scheme", "ftp"),
        "link-local metadata": ("http://169.254.169.254/latest/meta-data/", "refused: address", "link-local"),
        "IPv4-mapped loopback": ("http://[::ffff:127.0.0.2]/", "refused: address", "loopback"),
        "decompression bomb": (f"{allowed}/bomb.png", "failed_to_resize", "decompression bomb"),
    }


def _fetch_config(**extra):
    return load_config(None, {"ingest.resolution": 32, "ingest.retries": 0, "ingest.timeout_s": DEADLINE_S,
                              "ingest.max_bytes": CAP, "ingest.max_redirects": 3,
                              "ingest.allow_networks": [LOOPBACK], **extra}).ingest


def test_the_fetch_policy_refuses_each_hostile_case_and_still_fetches_images(hostile) -> None:
    """Each case alone, without Ray: its status and message; nothing reaches 127.0.0.2; the deadline is
    total (the drips end near it, not after 40 drips); the body cap holds with and without a length."""
    from sdsg_ray.ingest.download import fetch_one
    from sdsg_ray.ingest.urls import UrlItem

    allowed, forbidden = hostile
    cfg = _fetch_config()
    for case, (url, status, phrase) in hostile_cases(allowed.url, forbidden.url).items():
        started = time.monotonic()
        result = fetch_one("000", UrlItem(url), cfg)
        elapsed = time.monotonic() - started
        print(f"{case:32s} {result.status:20s} {elapsed:5.2f}s {result.error[:90]}")
        assert result.status == status and phrase in result.error, (case, result)
        assert (result.jpeg is not None) == (status == "success"), case
        if "deadline" in case:
            assert DEADLINE_S <= elapsed < DEADLINE_S + 0.6, (case, elapsed)  # not 40 x 0.3 s
        if "no length" in case or "chunked" in case:
            read = int(result.error.rsplit("cut after ", 1)[1].split()[0])
            assert CAP < read <= CAP + 64 * 1024, read  # memory bounded by the cap plus one chunk
    assert sum(forbidden.requests.values()) == 0, forbidden.requests  # refused before connecting
    assert allowed.requests["/loop/3"] == 1 and "/loop/4" not in allowed.requests  # 3 hops followed, no more

    # The defaults: every non-public address refused, loopback included, by IP and by name; nothing sent.
    default = load_config(None, {"ingest.retries": 0}).ingest
    before = sum(allowed.requests.values())
    port = allowed.url.rsplit(":", 1)[1]
    for host in ("127.0.0.1", "localhost", "0x7f000001", "127.1"):  # by IP, by name, in inet_aton's spellings
        url = f"http://{host}:{port}/img/5.png"
        result = fetch_one("000", UrlItem(url), default)
        assert result.status == "refused: address" and "is loopback" in result.error, result
    assert sum(allowed.requests.values()) == before
    with pytest.raises(Exception, match="not a CIDR"):
        _fetch_config(**{"ingest.allow_networks": ["127.0.0.1/33"]})


# ----- on the Ray test cluster -------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    import torch

    from sdsg_ray.artifacts.checkpoint import export_inference
    from sdsg_ray.models.networks import build_networks

    torch.manual_seed(0)
    model = ModelConfig()
    G, _, E = build_networks(model)
    uri = str(tmp_path_factory.mktemp("stage1") / "inference.pt")
    export_inference(G, E, model, {"stage": "random-weights-for-plumbing-tests"}, uri, get_storage())
    return uri


def _statuses(out: str) -> dict[str, str]:
    storage = get_storage()
    rows = {}
    for uri in storage.list(out, suffixes=("_stats.json",)):
        for s in json.loads(storage.read_text(uri))["samples"]:
            rows[s["url"]] = s["status"]
    return rows


def _score_select_and_read_kept(data: str, work: str, checkpoint: str) -> dict:
    from sdsg_ray.filtering.score import run_scoring
    from sdsg_ray.artifacts.scores import ScoreSet
    from sdsg_ray.filtering.select import run_selection
    from sdsg_ray.training.data import ImageDataset

    storage = get_storage()
    scores = join(work, "scores")
    summary = run_scoring(load_config(None, {
        "score.data": data, "score.checkpoint": checkpoint, "score.out": scores, "score.batch_size": 8,
        "score.actors": 1, "score.manifest_shard_size": 10}))
    keys = [k for b in ScoreSet(scores).iter_batches(storage, ["key"]) for k in b["key"].tolist()]
    assert len(keys) == len(set(keys)) == summary["images"]  # every sample once
    report = run_selection(load_config(None, {
        "select.scores": scores, "select.out": join(work, "selection"), "select.min_size": 10,
        "select.threshold_step": 0.05}))
    kept = read_manifest(join(work, "selection", "kept.parquet"), storage)
    assert len(kept) == report["size_kept"] >= 10 and all(shards.parse_address(k) for k in kept)
    for cache in (True, False):  # stage 2's data loading, cached and streamed
        ds = ImageDataset(kept, 32, storage, cache=cache)
        assert len(ds) == len(kept) and ds[0][0].shape == (32, 32, 3) and ds[0][1] == 0
    return {"summary": summary, "report": report}


@pytest.mark.slow  # ~1 min quiet, most of it selection's per-θ eigendecompositions
def test_ingest_tar_then_score_select_stage2_and_resume(ray_cluster, server, checkpoint, tmp_path) -> None:
    """URL list -> 4 tar shards with a status per URL -> scored and selected end to end -> kept samples
    load as training data; a run that died after some shards resumes without re-fetching finished ones."""
    from sdsg_ray.ingest import run_ingest

    urls = url_list(server.url)
    (tmp_path / "urls.txt").write_text("\n".join(urls))
    out = str(tmp_path / "shards")
    config = ingest_config(str(tmp_path / "urls.txt"), out)
    summary = run_ingest(config)
    assert summary["shards"] == 4 and summary["shards_resumed"] == 0
    assert summary["successes"] == N_GOOD + N_SLOW + N_FLAKY
    assert summary["failed_to_download"] == N_MISSING and summary["failed_to_resize"] == N_TRUNCATED
    status = _statuses(out)
    assert set(status) == set(urls)
    assert all(status[u] == "failed_to_download" for u in urls if "/missing/" in u)
    assert all(status[u] == "failed_to_resize" for u in urls if "/trunc/" in u)
    assert all(status[u] == "success" for u in urls if "/flaky/" in u)  # retried after the 503
    with tarfile.open(join(out, "00000.tar")) as tar:
        names = tar.getnames()
    assert "000000.jpg" in names and "000000.json" in names and "000001.jpg" not in names  # #1 is a 404

    result = _score_select_and_read_kept(out, str(tmp_path / "work"), checkpoint)
    assert result["summary"]["images"] == summary["successes"] and result["summary"]["failed"] == 0

    # A run killed after its tar of shard 1 (stats not written yet) and before shard 2: re-run.
    storage = get_storage()
    storage.delete(join(out, "00001_stats.json"))
    storage.delete(join(out, "00002.tar"))
    storage.delete(join(out, "00002_stats.json"))
    before = Counter(server.requests)
    again = run_ingest(config)
    fetched = server.requests - before
    redo = set(urls[SHARD_SIZE: 3 * SHARD_SIZE])
    assert {p for p in fetched} == {u[len(server.url):] for u in redo}
    assert again["shards_resumed"] == 2 and again["downloaded_this_run"] == 2 * SHARD_SIZE
    assert _statuses(out) == status


@pytest.mark.slow  # ~1 min quiet, most of it selection's per-θ eigendecompositions
def test_ingest_parquet_on_s3_then_score_and_select(ray_cluster, server, checkpoint, s3_bucket, tmp_path) -> None:
    """The paper's JSON list (boxes) -> image-bytes parquet shards in S3 -> score -> select -> stage-2 data;
    img2dataset's failed rows are error rows in the scores."""
    from sdsg_ray.ingest import run_ingest

    urls = url_list(server.url)
    entries = [{"image_name": u, "bounding_box": [4, 44, 2, 42] if i % 2 else None} for i, u in enumerate(urls)]
    storage = get_storage()
    storage.write_text(join(s3_bucket, "urls.json"), json.dumps(entries))
    out = join(s3_bucket, "shards")
    summary = run_ingest(ingest_config(join(s3_bucket, "urls.json"), out, "parquet"))
    assert summary["successes"] == N_GOOD + N_SLOW + N_FLAKY and summary["shards"] == 4
    fs, path = storage.arrow_filesystem(join(out, "00000.parquet"))
    table = pq.read_table(path, filesystem=fs)
    assert table.column_names[:3] == ["key", "url", "status"] and table.num_rows == SHARD_SIZE
    result = _score_select_and_read_kept(out, join(s3_bucket, "work"), checkpoint)
    assert result["summary"]["images"] == len(urls)
    assert result["summary"]["failed"] == N_MISSING + N_TRUNCATED


@pytest.mark.slow
def test_ingest_killed_mid_run_resumes_without_refetching(ray_cluster, server, tmp_path) -> None:
    """`sdsg ingest` in a subprocess (joined to the test cluster) is SIGKILLed once its first shard is
    finished and while the next is downloading; the re-run fetches no URL of the finished shard again and
    ends with the same statuses as a clean run would have."""
    import os
    import signal
    import subprocess
    import sys

    from conftest import REPO

    urls = [f"{server.url}/img/{300 + i}.png" for i in range(SHARD_SIZE)]
    urls += [f"{server.url}/slower/{400 + i}.png" for i in range(2 * SHARD_SIZE)]
    (tmp_path / "urls.txt").write_text("\n".join(urls))
    out = tmp_path / "shards"
    cmd = [sys.executable, "-m", "jobs.cli", "ingest", "--urls", str(tmp_path / "urls.txt"), "--out", str(out),
           "--resolution", "32", "--shard-size", str(SHARD_SIZE), "--tasks", "1", "--threads", "2",
           "--set", f"ingest.allow_networks=[{LOOPBACK}]"]
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.address, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while not (out / "00000_stats.json").exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "first shard never finished"
            time.sleep(0.2)
        while not any("/slower/" in p for p in server.requests):  # the next shard is downloading
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (out / "00002_stats.json").exists(), "killed too late: every shard finished"
    first_shard = {u[len(server.url):] for u in urls[:SHARD_SIZE]}
    before = Counter(server.requests)
    server.slower_s = 0.0
    from sdsg_ray.ingest import run_ingest

    summary = run_ingest(ingest_config(str(tmp_path / "urls.txt"), str(out), **{"ingest.threads": 2, "ingest.tasks": 1}))
    fetched = server.requests - before
    assert not (set(fetched) & first_shard), "a finished shard was downloaded again"
    assert summary["shards_resumed"] >= 1 and summary["successes"] == len(urls)
    assert set(_statuses(str(out))) == set(urls)


@pytest.mark.slow  # ~20 s: one Ray Data run over 4 shards
def test_ingest_of_a_hostile_url_list_runs_to_the_end_with_only_the_valid_images(ray_cluster, hostile,
                                                                                  tmp_path) -> None:
    """`sdsg ingest`'s stage over every hostile case interleaved with valid images: the run ends, every URL
    has its status in a <shard>_stats.json, the shards hold the valid images and nothing else, and no
    request reached the forbidden address."""
    from sdsg_ray.ingest import run_ingest

    allowed, forbidden = hostile
    cases = hostile_cases(allowed.url, forbidden.url)
    valid = [f"{allowed.url}/img/{20 + i}.png" for i in range(6)]
    urls = [url for url, _, _ in cases.values()]
    for i, url in enumerate(valid):
        urls.insert(3 * i + 1, url)
    expected = {**{url: status for url, status, _ in cases.values()}, **{url: "success" for url in valid}}
    (tmp_path / "urls.txt").write_text("\n".join(urls))
    out = str(tmp_path / "shards")
    config = ingest_config(str(tmp_path / "urls.txt"), out, **{
        "ingest.retries": 0, "ingest.timeout_s": DEADLINE_S, "ingest.max_bytes": CAP, "ingest.max_redirects": 3})
    summary = run_ingest(config)

    status = _statuses(out)
    assert status == expected  # every URL, each with the status of its case
    successes = [url for url in urls if expected[url] == "success"]
    assert summary["successes"] == len(successes) and summary["urls"] == len(urls)
    assert summary["refused"] == sum(s.startswith("refused") for s in expected.values()) == 7
    assert summary["too_large"] == 3 and summary["failed_to_resize"] == 1
    in_shards = {}
    for i in range(summary["shards"]):
        with tarfile.open(join(out, f"{i:05d}.tar")) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(member).read())
                    image = Image.open(io.BytesIO(tar.extractfile(member.name[:-5] + ".jpg").read()))
                    in_shards[meta["url"]] = image.size
    assert sorted(in_shards) == sorted(successes) and set(in_shards.values()) == {(32, 32)}
    assert sum(forbidden.requests.values()) == 0, forbidden.requests
    for case, (url, _, _) in cases.items():
        print(f"hostile list: {case:32s} -> {status[url]}")
