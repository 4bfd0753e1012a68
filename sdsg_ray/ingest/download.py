"""One shard of URLs -> one img2dataset-layout shard: fetch (bounded threads, retries), crop, resize, write.

Per URL the paper's download script does: fetch, crop ``img[y0:y1, x0:x1]``, RGBA -> RGB, resize to a
square with LANCZOS. Without a box the image is centre-cropped to a square first (as
:func:`sdsg_ray.imaging.decode_image` does) rather than squashed. Every URL gets a status:
``success``; ``failed_to_download`` (HTTP error, deadline passed, connection, too many redirects);
``failed_to_resize`` (the bytes are not a readable image, a decompression bomb, or the box is outside
it), as img2dataset records them; and the refusals of an untrusted list, never retried:
``refused: scheme`` (not http/https: no ``file://``, ``ftp://``, ``data:``), ``refused: address`` (a
host, or a redirect hop, resolving to an address outside :class:`~sdsg_ray.ingest.policy.AddressPolicy`)
and ``failed: too large`` (a body over ``ingest.max_bytes``).

The fetch is safe to point at the Internet:
- The host is resolved once; every address it resolves to is checked, and the connection goes to the
  checked address itself (the Host header, TLS SNI and certificate check still use the host name), so a
  DNS answer that changes between check and connect (DNS rebinding) changes nothing.
- Redirects are followed here, at most ``ingest.max_redirects``, each hop checked before connecting.
- ``ingest.timeout_s`` is one deadline per attempt for resolving, connecting, headers and body: every
  socket operation gets the time left, and a watchdog shuts the socket at the deadline, so a server
  that drips a byte at a time cannot stretch it.
- The body is read in chunks and cut at ``ingest.max_bytes`` whatever Content-Length says: a download
  holds at most that much memory (a shard task at most threads x max_bytes).
- No proxy from the environment is used (a proxy would connect on our behalf to any address).

Client: the standard library's ``http.client``, whose ``HTTPConnection.connect`` is the documented place
to open the socket to the vetted IP; ``requests``/``urllib3`` resolve, connect, redirect and use proxies
inside their pools, so pinning the address there means overriding private methods. TLS verification uses
certifi's CA bundle (in the lock, as requests does).

``<shard>_stats.json`` holds the counts and every URL's status. The data file is written first and the
stats file last, each in one atomic put, so a shard is finished exactly when its stats file exists.
"""

from __future__ import annotations

import http.client
import io
import json
import logging
import socket
import ssl
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import certifi
from PIL import Image, ImageOps

from sdsg_ray.config import IngestConfig
from sdsg_ray.imaging import MAX_IMAGE_PIXELS
from sdsg_ray.shards import SHARD_FORMATS, Sample
from sdsg_ray.storage import Storage, join

from .policy import AddressPolicy
from .urls import UrlItem

log = logging.getLogger(__name__)

SUCCESS, FAILED_DOWNLOAD, FAILED_RESIZE = "success", "failed_to_download", "failed_to_resize"
REFUSED_SCHEME, REFUSED_ADDRESS, TOO_LARGE = "refused: scheme", "refused: address", "failed: too large"
COUNTS = ("count", "successes", "failed_to_download", "failed_to_resize", "refused", "too_large")  # per shard
STATUSES = (SUCCESS, FAILED_DOWNLOAD, FAILED_RESIZE, REFUSED_SCHEME, REFUSED_ADDRESS, TOO_LARGE)
USER_AGENT = "sdsg-ray-ingest/0.1"
SCHEMES = {"http": 80, "https": 443}
REDIRECTS = (301, 302, 303, 307, 308)
CHUNK = 64 * 1024
_TLS = ssl.create_default_context(cafile=certifi.where())  # verifies the certificate against the host name


def shard_data_name(shard: int, fmt: str) -> str:
    return f"{shard:05d}{SHARD_FORMATS[fmt].suffix}"


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


class DownloadError(Exception):
    """A URL that gave no body: ``status`` is its per-URL status; ``retry`` whether another attempt may help."""

    def __init__(self, status: str, message: str, retry: bool = False) -> None:
        super().__init__(message)
        self.status, self.retry = status, retry


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """HTTP to ``host`` (Host header) over a socket to ``address``, an IP the policy already allowed. ``live``
    keeps the socket in use (http.client forgets it once a response says it will close) for the deadline's
    watchdog and the per-read timeouts."""

    def __init__(self, host: str, port: int, address: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self.address = address
        self.live: socket.socket | None = None

    def connect(self) -> None:
        self.sock = self.live = socket.create_connection((self.address, self.port), self.timeout)


class _PinnedHTTPSConnection(_PinnedHTTPConnection):
    """HTTPS likewise; SNI and the certificate check use the host name, not the address."""

    default_port = 443

    def connect(self) -> None:
        super().connect()
        self.sock = self.live = _TLS.wrap_socket(self.sock, server_hostname=self.host)


def _left(deadline: float, url: str, timeout_s: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise DownloadError(FAILED_DOWNLOAD, f"deadline of {timeout_s:g} s passed for {url}", retry=True)
    return left


def _resolve(host: str, port: int, deadline: float, timeout_s: float) -> list[str]:
    """Every address ``host`` resolves to (an IP literal is itself), within the deadline."""
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
        return [host]
    except OSError:
        pass
    answer: list = []

    def lookup() -> None:  # getaddrinfo has no timeout of its own: wait for it at most the time left
        try:
            answer.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except (OSError, UnicodeError) as err:
            answer.append(err)

    resolver = threading.Thread(target=lookup, daemon=True)
    resolver.start()
    resolver.join(_left(deadline, host, timeout_s))
    if not answer:
        raise DownloadError(FAILED_DOWNLOAD, f"resolving {host} took longer than the {timeout_s:g} s deadline",
                            retry=True)
    if isinstance(answer[0], Exception):
        raise DownloadError(FAILED_DOWNLOAD, f"cannot resolve {host}: {answer[0]}",
                            retry=isinstance(answer[0], OSError))
    return list(dict.fromkeys(info[4][0] for info in answer[0]))


def _connection(url: str, policy: AddressPolicy, deadline: float,
                timeout_s: float) -> tuple[_PinnedHTTPConnection, str]:
    """A connection (not yet open) to a checked address of ``url``'s host, and the request target."""
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port or SCHEMES.get(parts.scheme.lower(), 0)
    except ValueError as err:
        raise DownloadError(FAILED_DOWNLOAD, f"invalid URL {url!r}: {err}") from None
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise DownloadError(REFUSED_SCHEME,
                            f"scheme {scheme or '(none)'!r} of {url!r}: only http and https are fetched")
    try:
        host = (parts.hostname or "").encode("idna").decode("ascii")  # the Host header and TLS name are ASCII
    except UnicodeError as err:
        raise DownloadError(FAILED_DOWNLOAD, f"invalid host in {url!r}: {err}") from None
    if not host:
        raise DownloadError(FAILED_DOWNLOAD, f"invalid URL {url!r}: no host")
    addresses = _resolve(host, port, deadline, timeout_s)
    for address in addresses:  # every answer, so a mixed answer cannot be used to reach a private one
        why = policy.refusal(address)
        if why:
            named = "" if host == address else f"{host} -> "
            raise DownloadError(REFUSED_ADDRESS, f"{named}{why}: not public and outside ingest.allow_networks")
    target = urllib.parse.quote(parts.path or "/", safe="/%:@!$&'()*+,;=-._~")
    if parts.query:
        target += "?" + parts.query
    kind = _PinnedHTTPSConnection if scheme == "https" else _PinnedHTTPConnection
    return kind(host, port, addresses[0], timeout=_left(deadline, url, timeout_s)), target


def _read_body(response: http.client.HTTPResponse, max_bytes: int, deadline: float, timeout_s: float, url: str,
               sock: socket.socket) -> bytes:
    """The body, in chunks, cut at ``max_bytes`` (whatever Content-Length says) and at the deadline."""
    if response.length is not None and response.length > max_bytes:
        raise DownloadError(TOO_LARGE, f"Content-Length {response.length} over ingest.max_bytes={max_bytes}")
    body = bytearray()
    while True:
        sock.settimeout(_left(deadline, url, timeout_s))
        chunk = response.read1(CHUNK)
        if not chunk:
            _left(deadline, url, timeout_s)  # an end caused by the watchdog's shutdown is no body
            return bytes(body)
        body += chunk
        if len(body) > max_bytes:
            raise DownloadError(TOO_LARGE, f"body over ingest.max_bytes={max_bytes} (cut after {len(body)} bytes)")


def _attempt(url: str, cfg: IngestConfig, policy: AddressPolicy) -> bytes:
    """One attempt: at most ``max_redirects`` hops, all within one ``timeout_s`` deadline."""
    deadline = time.monotonic() + cfg.timeout_s
    for hop in range(cfg.max_redirects + 1):
        try:
            conn, target = _connection(url, policy, deadline, cfg.timeout_s)
        except DownloadError as err:
            if hop:
                err.args = (f"redirect {hop} to {url}: {err}",)
            raise
        # At the deadline the socket is shut: that ends any blocked read, in the TLS handshake or in
        # http.client's header parsing too, where a per-read timeout would restart with every byte.
        watchdog = threading.Timer(_left(deadline, url, cfg.timeout_s), _shut, (conn,))
        watchdog.daemon = True
        watchdog.start()
        try:
            conn.connect()
            conn.request("GET", target, headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity"})
            sock = conn.live
            sock.settimeout(_left(deadline, url, cfg.timeout_s))
            response = conn.getresponse()
            _left(deadline, url, cfg.timeout_s)  # headers cut short by the watchdog are no response
            location = response.getheader("Location")
            if response.status in REDIRECTS and location:
                url = urllib.parse.urljoin(url, location.strip())
                continue
            if response.status >= 400:
                raise DownloadError(FAILED_DOWNLOAD, f"HTTP {response.status} {response.reason}",
                                    retry=response.status >= 500 or response.status == 429)
            if response.status != 200:
                raise DownloadError(FAILED_DOWNLOAD, f"HTTP {response.status} {response.reason}: not a body")
            return _read_body(response, cfg.max_bytes, deadline, cfg.timeout_s, url, sock)
        except (OSError, http.client.HTTPException) as err:  # timeouts, resets, a socket shut by the watchdog
            _left(deadline, url, cfg.timeout_s)  # past the deadline: say so, not how the socket ended
            raise DownloadError(FAILED_DOWNLOAD, f"{type(err).__name__}: {err}", retry=True) from None
        finally:
            watchdog.cancel()
            conn.close()
    raise DownloadError(FAILED_DOWNLOAD, f"more than ingest.max_redirects={cfg.max_redirects} redirects")


def _shut(conn: _PinnedHTTPConnection) -> None:
    """The watchdog: shut the connection's socket (the OS call only: no TLS state is touched from here)."""
    try:
        if conn.live is not None:
            socket.socket.shutdown(conn.live, socket.SHUT_RDWR)
    except OSError:
        pass  # already closed


def fetch(url: str, cfg: IngestConfig) -> bytes:
    """The body of ``url`` under the ingest policy; retries deadlines, connection errors, truncated bodies
    and 5xx/429 with backoff; refusals and 4xx are final. Raises :class:`DownloadError`."""
    policy = AddressPolicy(cfg.allow_networks)
    for attempt in range(cfg.retries + 1):
        try:
            return _attempt(url, cfg, policy)
        except DownloadError as err:
            if attempt == cfg.retries or not err.retry:
                raise
        time.sleep(min(0.2 * 2**attempt, 5.0))
    raise AssertionError("unreachable")


def process(data: bytes, box: tuple[int, int, int, int] | None, resolution: int, quality: int) -> tuple[bytes, int, int]:
    """Crop to the box (y0, y1, x0, x1), RGB, square LANCZOS resize; JPEG bytes and the original size. The
    size is checked against :data:`sdsg_ray.imaging.MAX_IMAGE_PIXELS` from the header, before any pixel is
    decoded, so a decompression bomb (huge dimensions, small file) costs no memory."""
    with Image.open(io.BytesIO(data)) as im:
        width, height = im.size
        if width * height > MAX_IMAGE_PIXELS:
            raise ValueError(f"decompression bomb: {width}x{height} = {width * height} pixels exceeds the limit "
                             f"{MAX_IMAGE_PIXELS} (sdsg_ray.imaging.MAX_IMAGE_PIXELS)")
        im.load()
        if im.mode in ("RGBA", "LA", "P"):
            im = im.convert("RGBA")
            im = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im)
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
        data = fetch(item.url, cfg)
    except DownloadError as err:
        result.status, result.error = err.status, str(err)
        return result
    try:
        result.jpeg, result.original_width, result.original_height = process(data, item.box, cfg.resolution, cfg.jpeg_quality)
        result.width = result.height = cfg.resolution
    except Exception as err:  # not an image, truncated, box outside it
        result.status, result.error = FAILED_RESIZE, f"{type(err).__name__}: {err}"
    return result


def ingest_shard(shard: int, items: list[UrlItem], storage: Storage, cfg: IngestConfig) -> dict:
    """Download one shard's URLs (cfg.threads at a time) and write its data file, then its stats file."""
    started = time.time()
    keys = [sample_key(shard, i, cfg.shard_size) for i in range(len(items))]
    with ThreadPoolExecutor(max_workers=max(1, min(cfg.threads, len(items)))) as pool:
        results = list(pool.map(lambda ki: fetch_one(ki[0], ki[1], cfg), zip(keys, items)))
    samples = [Sample(r.key, r.jpeg if r.status == SUCCESS else None, r.meta()) for r in results]
    storage.write_bytes(join(cfg.out, shard_data_name(shard, cfg.format)), SHARD_FORMATS[cfg.format].write(samples))
    counts = {s: sum(r.status == s for r in results) for s in STATUSES}
    stats = {
        "count": len(results),
        "successes": counts[SUCCESS],
        "failed_to_download": counts[FAILED_DOWNLOAD],
        "failed_to_resize": counts[FAILED_RESIZE],
        "refused": counts[REFUSED_SCHEME] + counts[REFUSED_ADDRESS],
        "too_large": counts[TOO_LARGE],
        "duration": round(time.time() - started, 3),
        "start_time": started,
        "end_time": time.time(),
        "status_dict": {k: v for k, v in counts.items() if v},
        "samples": [{k: r.meta()[k] for k in ("key", "url", "status", "error_message")} for r in results],
    }
    storage.write_text(join(cfg.out, shard_stats_name(shard)), json.dumps(stats))  # last: marks the shard finished
    return {k: stats[k] for k in (*COUNTS, "duration")}
