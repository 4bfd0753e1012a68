"""Image listings <-> parquet manifests: the one place that lists images and reads or writes manifests.

Listing a prefix of millions of objects is slow (one request per 1000 keys) and resolving them again in
every stage is slower still, so a set of images is listed once and recorded as a manifest: a parquet
file, or a prefix of shards ``manifest-00000.parquet``, ``manifest-00001.parquet``..., with a ``key``
column of full URIs (the same strings :meth:`Storage.list` yields) and optional extra columns.

A prefix may also hold img2dataset shards (webdataset ``.tar``, image-bytes ``.parquet``): listing
then yields one sample address per image inside them (:mod:`sdsg_ray.shards`), so scores, selections and
training address samples as ``<shard>#key=...`` strings in the same ``key`` column.

Scoring lists its input once into ``<out>/manifest/`` (:func:`ensure_manifest`), so a 100M-object prefix
is never held in memory nor handed to Ray Data as a list of paths (resolving paths alone takes hours).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from sdsg_ray import shards
from sdsg_ray.errors import InvalidRequest
from sdsg_ray.imaging import IMAGE_SUFFIXES
from sdsg_ray.storage import ObjectNotFound, Storage, StorageError, get_storage, join, normalize

log = logging.getLogger(__name__)

KEY = "key"


def shard_name(index: int) -> str:
    return f"manifest-{index:05d}.parquet"


def is_manifest(uri: str, storage: Storage | None = None) -> bool:
    """A ``.parquet`` file, or a prefix holding our first shard ``manifest-00000.parquet``: one HEAD
    request, where listing an image prefix to look for parquet files could mean millions of keys."""
    storage = storage or get_storage()
    if uri.lower().endswith(".parquet"):
        try:  # an img2dataset parquet shard (image bytes inside) is data, not a manifest
            return not shards.is_image_parquet(uri, storage)
        except (StorageError, pa.ArrowException, OSError):
            return True
    return storage.exists(join(uri, shard_name(0)))


def list_images(uri: str, storage: Storage) -> Iterator[str]:
    """Image URIs under a prefix (by suffix, case-insensitive), sorted, streamed page by page; webdataset
    ``.tar`` and image-bytes ``.parquet`` shards (one shard, or a prefix holding them) are replaced by
    the sample addresses of their images (sdsg_ray.shards), in shard order."""
    if shards.shard_format(uri) is not None:
        return shards.expand_shards(iter([normalize(uri)]), storage)
    return shards.expand_shards(storage.list(uri, suffixes=IMAGE_SUFFIXES + shards.shard_suffixes()), storage)


def resolve_images(uri: str, storage: Storage) -> list[str]:
    """A prefix of images or a manifest -> the image URIs. Raises ObjectNotFound if there are none."""
    keys = read_manifest(uri, storage) if is_manifest(uri, storage) else list(list_images(uri, storage))
    if not keys:
        raise ObjectNotFound(f"{uri}: no images found (looked for {', '.join(IMAGE_SUFFIXES)} or a manifest)")
    return keys


def write_manifest(keys: Iterable[str], uri: str, storage: Storage, **columns: Sequence) -> None:
    """Write one parquet file with ``key`` (normalised full URIs) and any extra equal-length columns."""
    keys = list(keys)
    data = {KEY: pa.array([normalize(k) for k in keys], type=pa.string())}
    for name, values in columns.items():
        if len(values) != len(keys):
            raise ValueError(f"manifest column {name!r} has {len(values)} values for {len(keys)} keys")
        data[name] = pa.array(values)
    with storage.open_write(uri) as f:  # atomic: a reader never sees half a parquet file
        pq.write_table(pa.table(data), f, compression="zstd")


def write_manifest_shards(keys: Iterable[str], prefix_uri: str, storage: Storage, shard_size: int) -> list[str]:
    """Stream ``keys`` into ``<prefix>/manifest-00000.parquet``... of ``shard_size`` keys each; returns
    the shard URIs. Memory stays at one shard, so a 100M-key listing never sits in memory at once."""
    if shard_size <= 0:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    shards = []
    iterator = iter(keys)
    for index in itertools.count():
        chunk = list(itertools.islice(iterator, shard_size))
        if not chunk and index > 0:
            break
        uri = join(prefix_uri, shard_name(index))
        write_manifest(chunk, uri, storage)
        shards.append(uri)
        if len(chunk) < shard_size:
            break
    return shards


def manifest_files(uri: str, storage: Storage) -> list[str]:
    """The parquet file(s) of a manifest: the file itself, or the sorted shards under a prefix."""
    if uri.lower().endswith(".parquet"):
        return [uri]
    shards = [s for s in storage.list(uri, suffixes=(".parquet",)) if os.path.basename(s).startswith("manifest")]
    if not shards:
        raise ObjectNotFound(f"{uri}: no manifest shards (manifest-*.parquet) under this prefix")
    return shards


def read_manifest_table(uri: str, storage: Storage, columns: Sequence[str] | None = None) -> pa.Table:
    """All shards of a manifest as one table (``columns`` to read a subset; ``key`` is always checked)."""
    tables = []
    for file in manifest_files(uri, storage):
        try:
            with storage.open_read(file) as f:
                parquet = pq.ParquetFile(f)
                names = parquet.schema_arrow.names
                if KEY not in names:
                    raise StorageError(f"{file}: manifest has no {KEY!r} column (columns: {names})")
                tables.append(parquet.read(columns=list(columns) if columns else None))
        except StorageError:
            raise
        except (pa.ArrowException, OSError) as err:
            raise StorageError(f"{file}: not a readable parquet manifest: {err}") from None
    return pa.concat_tables(tables) if len(tables) > 1 else tables[0]


def read_manifest(uri: str, storage: Storage) -> list[str]:
    """The ``key`` column of a manifest file or shard prefix, in stored order."""
    return read_manifest_table(uri, storage, columns=[KEY]).column(KEY).to_pylist()


def write_parquet_stream(batches: Iterable[pa.RecordBatch], schema: pa.Schema, uri: str, storage: Storage) -> int:
    """Write record batches into one parquet file, streamed; the file appears only when complete."""
    rows = 0
    with storage.open_write(uri) as f, pq.ParquetWriter(f, schema) as writer:
        for batch in batches:
            if batch.num_rows:
                writer.write_batch(batch.cast(schema) if batch.schema != schema else batch)
                rows += batch.num_rows
    return rows


# ----- listing once into manifest shards (scoring) ---------------------------------------------

MANIFEST_DIR = "manifest"
INDEX_FILE = "_SHARDS.json"


@dataclass(frozen=True)
class ManifestShard:
    shard_id: int
    uri: str
    rows: int


def iter_keys(data: str, storage: Storage) -> Iterator[str]:
    """Image URIs of a prefix (streamed from Storage.list) or of a manifest (streamed row group by row group)."""
    if not is_manifest(data, storage):
        yield from list_images(data, storage)
        return
    for uri in manifest_files(data, storage):
        with storage.open_read(uri) as f:
            for batch in pq.ParquetFile(f).iter_batches(columns=[KEY]):
                yield from batch.column(KEY).to_pylist()


def ensure_manifest(data: str, out: str, storage: Storage, shard_size: int) -> list[ManifestShard]:
    """The manifest shards of `data` under `<out>/manifest/`, listing only if no complete listing exists.

    ``_SHARDS.json``, written last, records the source and every shard's row count; an interrupted listing
    is simply redone (it is deterministic)."""
    source = normalize(data)
    index_uri = join(out, MANIFEST_DIR, INDEX_FILE)
    if storage.exists(index_uri):
        index = json.loads(storage.read_text(index_uri))
        if index["source"] != source:
            raise InvalidRequest(f"{out} already holds scores of {index['source']}, not {source}: use another --out")
        return [ManifestShard(s["shard_id"], join(out, MANIFEST_DIR, shard_name(s["shard_id"])), s["rows"])
                for s in index["shards"]]

    listed = 0

    def counted(keys: Iterator[str]) -> Iterator[str]:
        nonlocal listed
        for key in tqdm(keys, desc=f"listing {data}", unit=" keys", mininterval=2):
            listed += 1
            yield key

    uris = write_manifest_shards(counted(iter_keys(data, storage)), join(out, MANIFEST_DIR), storage, shard_size)
    if listed == 0:
        for uri in uris:  # the one empty shard
            storage.delete(uri)
        raise ObjectNotFound(f"{data}: no images found (suffixes {', '.join(IMAGE_SUFFIXES)}) and not a manifest")
    sizes = [shard_size] * (len(uris) - 1) + [listed - shard_size * (len(uris) - 1)]
    shards = [ManifestShard(i, uri, rows) for i, (uri, rows) in enumerate(zip(uris, sizes))]
    index = {
        "source": source,
        "shard_size": shard_size,
        "total": listed,
        "shards": [{"shard_id": s.shard_id, "rows": s.rows} for s in shards],
    }
    storage.write_text(index_uri, json.dumps(index))  # written last: its presence means the listing is complete
    log.info("listed %d images of %s into %d manifest shards", listed, data, len(shards))
    return shards
