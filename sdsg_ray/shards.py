"""Images inside shards: img2dataset's webdataset ``.tar`` and image-bytes ``.parquet`` layouts.

At millions of images nobody keeps one object per photo: img2dataset writes shards ``00000.tar`` (members
``<key>.jpg`` + ``<key>.json``, one sample per key, only the successes) or ``00000.parquet`` (one row per
URL: ``key``, ``url``, ``status``, ``error_message``, ..., and the image bytes in a column named after
the encode format, ``jpg``/``png``/``webp``; failed rows have null bytes), each with ``00000_stats.json``.

Every sample gets a **sample address**, a string used wherever the project uses an image URI (manifest
``key`` column, score shards, ``kept.parquet``, training)::

    <shard uri>#key=<sample key>&offset=<byte offset>&size=<bytes>      a tar member (the image file)
    <shard uri>#key=<sample key>&row=<row>&column=<image column>         a parquet row

It is self-contained: reading a sample needs no index, only one ranged read (tar) or one row group
(parquet), so stage 2 and the selection figures read kept samples without re-reading whole shards.

Why not Ray Data's ``read_webdataset``/``read_parquet`` for the image bytes: ``read_webdataset`` reads a
tar as one unit (a truncated shard fails its whole read task), decodes with webdataset's decoder unless
told not to, and yields no byte offsets, so a sample could not be read again later without its whole
shard. Scoring keeps its plan (``read_parquet`` over the listing, own read+decode UDF with a status per
row, exactly-once score shards); only listing (:func:`expand_shards`) and reading learn about shards.
Each layout is one :class:`ShardFormat` in :data:`SHARD_FORMATS`; a new layout is one registered entry.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence
from urllib.parse import parse_qsl, urlencode

import pyarrow as pa
import pyarrow.parquet as pq

from sdsg_ray.registry import Registry
from sdsg_ray.storage import Storage

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # tar member extensions / parquet column names holding images
MAX_GAP_BYTES = 1024 * 1024  # tar members closer than this are read in one ranged request


class SampleReadError(ValueError):
    """A sample that has no image bytes (an img2dataset row that failed to download) or a bad address."""


@dataclass(frozen=True)
class SampleAddress:
    shard: str
    key: str
    offset: int | None = None  # tar: the image member's data
    size: int | None = None
    row: int | None = None  # parquet: row index in the file, and the image column
    column: str | None = None

    def __str__(self) -> str:
        if self.row is not None:
            fields = {"key": self.key, "row": self.row, "column": self.column}
        else:
            fields = {"key": self.key, "offset": self.offset, "size": self.size}
        return f"{self.shard}#{urlencode(fields)}"


@dataclass(frozen=True)
class Sample:
    """One sample as ingest hands it to a format's writer: ``image`` is None for a URL that failed."""

    key: str
    image: bytes | None
    meta: dict[str, Any]


@dataclass(frozen=True)
class ShardFormat:
    """One shard layout, with everything listing, reading and ingest need to know about it."""

    suffix: str  # lower case, with the dot: the listing recognises a shard by it
    index: Callable[[str, Storage], list[str]]  # shard URI -> its samples' addresses, in shard order
    # (shard URI, [(i, address)] of one shard, storage, out): sets out[i] to the bytes or the exception
    read: Callable[[str, list[tuple[int, SampleAddress]], Storage, dict], None]
    write: Callable[[list[Sample]], bytes]  # ingest's samples -> the shard's bytes


SHARD_FORMATS: Registry[ShardFormat] = Registry("shard format")


def shard_format(uri: str) -> ShardFormat | None:
    """The format whose suffix ``uri`` ends with (case-insensitive), or None for a plain object."""
    lower = uri.lower()
    return next((fmt for _, fmt in SHARD_FORMATS.items() if lower.endswith(fmt.suffix)), None)


def shard_suffixes() -> tuple[str, ...]:
    return tuple(fmt.suffix for _, fmt in SHARD_FORMATS.items())


def parse_address(text: str) -> SampleAddress | None:
    """The address in ``text``, or None when ``text`` is a plain object URI (even one holding a '#')."""
    shard, sep, fragment = text.rpartition("#")
    if not sep or shard_format(shard) is None or not fragment.startswith("key="):
        return None
    fields = dict(parse_qsl(fragment, keep_blank_values=True))
    try:
        if "row" in fields:
            return SampleAddress(shard, fields["key"], row=int(fields["row"]), column=fields["column"])
        return SampleAddress(shard, fields["key"], offset=int(fields["offset"]), size=int(fields["size"]))
    except (KeyError, ValueError):
        return None


def image_column(schema: pa.Schema) -> str | None:
    """The image-bytes column of an img2dataset parquet (None: a metadata/manifest parquet)."""
    for name in IMAGE_EXTENSIONS + ("image",):
        kind = schema.field(name).type if name in schema.names else None
        if kind is not None and (pa.types.is_binary(kind) or pa.types.is_large_binary(kind)):
            return name
    return None


def is_image_parquet(uri: str, storage: Storage) -> bool:
    with storage.open_read(uri) as f:
        return image_column(pq.ParquetFile(f).schema_arrow) is not None


# ----- listing: shard -> sample addresses ----------------------------------------------------------


def index_tar(uri: str, storage: Storage) -> list[str]:
    """Addresses of the image members of a webdataset tar, in file order. Headers are read, data skipped
    (seeks within the storage layer's read buffer). A damaged tail ends the listing with a warning: the
    members before it stay readable."""
    out: list[str] = []
    seen: set[str] = set()
    with storage.open_read(uri) as f:
        try:
            with tarfile.open(fileobj=f, mode="r:") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    stem, _, ext = os.path.basename(member.name).partition(".")
                    if ext.lower() not in IMAGE_EXTENSIONS:
                        continue
                    key = os.path.join(os.path.dirname(member.name), stem)  # webdataset: dir/stem is the sample
                    if key in seen:
                        continue  # one image per sample (e.g. both .jpg and .png): the first
                    seen.add(key)
                    out.append(str(SampleAddress(uri, key, offset=member.offset_data, size=member.size)))
        except tarfile.TarError as err:
            log.warning("%s: tar unreadable after %d samples (%s); listing those", uri, len(out), err)
    return out


def index_parquet(uri: str, storage: Storage) -> list[str]:
    """Addresses of every row of an img2dataset parquet shard (failed rows too: they score as errors).
    Our own manifests and score shards and hidden files are skipped by name, without reading their footers;
    any other parquet without an image-bytes column yields no samples."""
    if os.path.basename(uri).startswith(("manifest-", "scores-", ".", "_")):
        return []
    with storage.open_read(uri) as f:
        pf = pq.ParquetFile(f)
        column = image_column(pf.schema_arrow)
        if column is None:
            return []
        has_keys = "key" in pf.schema_arrow.names
        keys = pf.read(columns=["key"]).column("key").to_pylist() if has_keys else range(pf.metadata.num_rows)
    return [str(SampleAddress(uri, str(key), row=i, column=column)) for i, key in enumerate(keys)]


def expand_shards(uris: Iterator[str], storage: Storage, threads: int = 8) -> Iterator[str]:
    """Image URIs as they are, shard URIs replaced by their samples' addresses (shards indexed in parallel,
    yielded in listing order)."""
    pending: list = []
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for uri in uris:
            fmt = shard_format(uri)
            pending.append(uri if fmt is None else pool.submit(fmt.index, uri, storage))
            while len(pending) > 2 * threads or (pending and isinstance(pending[0], str)):
                head = pending.pop(0)
                yield from ([head] if isinstance(head, str) else head.result())
        for head in pending:
            yield from ([head] if isinstance(head, str) else head.result())


# ----- reading samples ---------------------------------------------------------------------------


def _read_tar_run(shard: str, run: list[tuple[int, SampleAddress]], storage: Storage, out: dict) -> None:
    start = run[0][1].offset
    end = max(a.offset + a.size for _, a in run)
    with storage.open_read(shard) as f:
        f.seek(start)
        data = f.read(end - start)
    for i, a in run:
        blob = data[a.offset - start : a.offset - start + a.size]
        out[i] = blob if len(blob) == a.size else SampleReadError(f"{a.key}: shard ends inside the sample")


def _read_tar(shard: str, items: list[tuple[int, SampleAddress]], storage: Storage, out: dict) -> None:
    items = sorted(items, key=lambda t: t[1].offset)
    run = [items[0]]
    for item in items[1:]:
        prev = run[-1][1]
        if item[1].offset - (prev.offset + prev.size) <= MAX_GAP_BYTES:
            run.append(item)
        else:
            _read_tar_run(shard, run, storage, out)
            run = [item]
    _read_tar_run(shard, run, storage, out)


def _read_parquet(shard: str, items: list[tuple[int, SampleAddress]], storage: Storage, out: dict) -> None:
    with storage.open_read(shard) as f:
        pf = pq.ParquetFile(f)
        extra = [c for c in ("status", "error_message") if c in pf.schema_arrow.names]
        starts, total = [], 0
        for g in range(pf.metadata.num_row_groups):
            starts.append(total)
            total += pf.metadata.row_group(g).num_rows
        by_group: dict[int, list[tuple[int, SampleAddress]]] = defaultdict(list)
        for i, a in items:
            if not 0 <= a.row < total:
                out[i] = SampleReadError(f"{a.key}: row {a.row} outside the shard's {total} rows")
                continue
            group = max(g for g, s in enumerate(starts) if s <= a.row)
            by_group[group].append((i, a))
        for group, members in by_group.items():
            columns = sorted({a.column for _, a in members}) + extra
            table = pf.read_row_group(group, columns=columns)
            for i, a in members:
                r = a.row - starts[group]
                blob = table.column(a.column)[r].as_py()
                if blob is None:
                    why = ", ".join(f"{c}={table.column(c)[r].as_py()}" for c in extra)
                    out[i] = SampleReadError(f"no image bytes in the shard's row ({why or 'null'})")
                else:
                    out[i] = blob


def read_samples(keys: Sequence[str], storage: Storage) -> dict[int, bytes | Exception]:
    """index -> bytes (or the exception) for every key of ``keys`` that is a sample address; plain URIs
    are left out (the caller reads them). One ranged read per contiguous run of tar members (the listing
    keeps samples in shard order, so a scoring batch is one or two reads), one read per parquet row group;
    a failing shard is an error on each of its samples, never a raise."""
    groups: dict[str, list[tuple[int, SampleAddress]]] = defaultdict(list)
    for i, key in enumerate(keys):
        a = parse_address(key)
        if a is not None:
            groups[a.shard].append((i, a))
    out: dict[int, bytes | Exception] = {}
    for shard, items in groups.items():
        try:
            shard_format(shard).read(shard, items, storage, out)
        except Exception as err:  # missing shard, damaged parquet: one error per sample
            for i, _ in items:
                out.setdefault(i, err)
    return out


def read_bytes(key: str, storage: Storage) -> bytes:
    """The bytes of one image: a plain object, or a sample inside a shard."""
    if parse_address(key) is None:
        return storage.read_bytes(key)
    result = read_samples([key], storage)[0]
    if isinstance(result, Exception):
        raise result
    return result


# ----- writing (ingest) ----------------------------------------------------------------------------

# img2dataset's parquet columns besides the image bytes (``jpg``), with their types.
PARQUET_META_COLUMNS = {
    "key": pa.string(), "url": pa.string(), "status": pa.string(), "error_message": pa.string(),
    "width": pa.int32(), "height": pa.int32(), "original_width": pa.int32(), "original_height": pa.int32(),
}


def write_tar(samples: list[Sample]) -> bytes:
    """``<key>.jpg`` + ``<key>.json`` (the sample's meta) for the samples that have an image."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in samples:
            if sample.image is None:
                continue
            for name, blob in ((f"{sample.key}.jpg", sample.image), (f"{sample.key}.json", json.dumps(sample.meta).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(blob)
                info.mtime = 0
                tar.addfile(info, io.BytesIO(blob))
    return buf.getvalue()


def write_parquet(samples: list[Sample]) -> bytes:
    """One row per sample: the metadata columns, and the JPEG bytes in ``jpg`` (null for a failed URL)."""
    columns = {name: pa.array([s.meta.get(name) for s in samples], kind) for name, kind in PARQUET_META_COLUMNS.items()}
    table = pa.table({**columns, "jpg": pa.array([s.image for s in samples], pa.binary())})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


SHARD_FORMATS.register("tar", ShardFormat(".tar", index_tar, _read_tar, write_tar))
SHARD_FORMATS.register("parquet", ShardFormat(".parquet", index_parquet, _read_parquet, write_parquet))
