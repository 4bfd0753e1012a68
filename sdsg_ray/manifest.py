"""Image listings <-> parquet manifests.

Listing a prefix of millions of objects is slow (one request per 1000 keys) and resolving them again in
every stage is slower still, so a set of images is listed once and recorded as a manifest: a parquet
file, or a prefix of shards ``manifest-00000.parquet``, ``manifest-00001.parquet``..., with a ``key``
column of full URIs (the same strings :meth:`Storage.list` yields) and optional extra columns.
"""

from __future__ import annotations

import io
import itertools
import os
from typing import Iterable, Iterator, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from sdsg_ray.imaging import IMAGE_SUFFIXES
from sdsg_ray.storage import ObjectNotFound, Storage, StorageError, get_storage, join, normalize

KEY = "key"
SHARD_PATTERN = "manifest-{:05d}.parquet"


def shard_name(index: int) -> str:
    return SHARD_PATTERN.format(index)


def is_manifest(uri: str, storage: Storage | None = None) -> bool:
    """A ``.parquet`` file, or a prefix holding our first shard ``manifest-00000.parquet``.

    Checking for the first shard by name is one HEAD request, where listing an image prefix to look for
    parquet files could mean millions of keys.
    """
    if uri.lower().endswith(".parquet"):
        return True
    return (storage or get_storage()).exists(join(uri, shard_name(0)))


def list_images(uri: str, storage: Storage) -> Iterator[str]:
    """Image URIs under a prefix (by suffix, case-insensitive), sorted, streamed page by page."""
    return storage.list(uri, suffixes=IMAGE_SUFFIXES)


def resolve_images(uri: str, storage: Storage) -> list[str]:
    """A prefix of images or a manifest -> the image URIs. Raises ObjectNotFound if there are none."""
    keys = read_manifest(uri, storage) if is_manifest(uri, storage) else list(list_images(uri, storage))
    if not keys:
        raise ObjectNotFound(f"{uri}: no images found (looked for {', '.join(IMAGE_SUFFIXES)} or a manifest)")
    return keys


def _table(keys: Sequence[str], columns: dict[str, Sequence]) -> pa.Table:
    data = {KEY: pa.array([normalize(k) for k in keys], type=pa.string())}
    for name, values in columns.items():
        if len(values) != len(keys):
            raise ValueError(f"manifest column {name!r} has {len(values)} values for {len(keys)} keys")
        data[name] = pa.array(values)
    return pa.table(data)


def _write_table(table: pa.Table, uri: str, storage: Storage) -> None:
    with storage.open_write(uri) as f:  # atomic: a reader never sees half a parquet file
        pq.write_table(table, f, compression="zstd")


def write_manifest(keys: Iterable[str], uri: str, storage: Storage, **columns: Sequence) -> None:
    """Write one parquet file with ``key`` (normalised full URIs) and any extra equal-length columns."""
    keys = list(keys)
    _write_table(_table(keys, columns), uri, storage)


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
        data = storage.read_bytes(file)
        try:
            parquet = pq.ParquetFile(io.BytesIO(data))
            names = parquet.schema_arrow.names
            if KEY not in names:
                raise StorageError(f"{file}: manifest has no {KEY!r} column (columns: {names})")
            tables.append(parquet.read(columns=list(columns) if columns else None))
        except (pa.ArrowException, OSError) as err:
            raise StorageError(f"{file}: not a readable parquet manifest: {err}") from None
    return pa.concat_tables(tables) if len(tables) > 1 else tables[0]


def read_manifest(uri: str, storage: Storage) -> list[str]:
    """The ``key`` column of a manifest file or shard prefix, in stored order."""
    return read_manifest_table(uri, storage, columns=[KEY]).column(KEY).to_pylist()
