"""Listing once into manifest shards, so a 100M-object prefix is never held in memory nor handed to Ray Data
as a list of paths (resolving paths alone takes hours at that size).

`<out>/manifest/manifest-00000.parquet, ...` hold `manifest_shard_size` keys each; `<out>/manifest/_SHARDS.json`
is written last and records the source and the row count of every shard, so a re-run reuses the listing
instead of repeating it (and a listing interrupted half-way is simply redone: it is deterministic).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Iterator

import pyarrow.parquet as pq
from tqdm import tqdm

from sdsg_ray.imaging import IMAGE_SUFFIXES
from sdsg_ray.manifest import is_manifest, list_images, manifest_files, shard_name, write_manifest_shards
from sdsg_ray.storage import Storage, is_s3, join, normalize

log = logging.getLogger(__name__)

MANIFEST_DIR = "manifest"
INDEX_FILE = "_SHARDS.json"


@dataclass(frozen=True)
class ManifestShard:
    shard_id: int
    uri: str
    rows: int


def manifest_shard_uri(out: str, shard_id: int) -> str:
    return join(out, MANIFEST_DIR, shard_name(shard_id))


def iter_keys(data: str, storage: Storage) -> Iterator[str]:
    """Image URIs of a prefix (streamed from Storage.list) or of a manifest (streamed row group by row group)."""
    if not is_manifest(data, storage):
        yield from list_images(data, storage)
        return
    for uri in manifest_files(data, storage):
        with storage.open_read(uri) as f:
            for batch in pq.ParquetFile(f).iter_batches(columns=["key"]):
                yield from batch.column("key").to_pylist()


def ensure_manifest(data: str, out: str, storage: Storage, shard_size: int) -> list[ManifestShard]:
    """The manifest shards of `data` under `<out>/manifest/`, listing only if no complete listing exists."""
    source = data if is_s3(data) else normalize(data)
    index_uri = join(out, MANIFEST_DIR, INDEX_FILE)
    if storage.exists(index_uri):
        index = json.loads(storage.read_text(index_uri))
        if index["source"] != source:
            raise ValueError(f"{out} already holds scores of {index['source']}, not {source}: use another --out")
        return [ManifestShard(s["shard_id"], manifest_shard_uri(out, s["shard_id"]), s["rows"]) for s in index["shards"]]

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
        raise FileNotFoundError(f"{data}: no images found (suffixes {', '.join(IMAGE_SUFFIXES)}) and not a manifest")
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
