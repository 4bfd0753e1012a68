"""`sdsg ingest`: a URL list -> shards in storage, in img2dataset's layout, resumable by shard.

Download engine: Ray Data tasks, one per shard of ``ingest.shard_size`` URLs, at most ``ingest.tasks``
at once (``TaskPoolStrategy``), each fetching with ``ingest.threads`` threads: at most tasks x threads
requests in flight. Not img2dataset: it is not installed here, and it has no way to carry the paper's
per-image bounding box into its resizer (its crop options are global), which SD-Dogs/SD-Elephants need.
The output keeps img2dataset's layout (``00000.tar`` with ``<key>.jpg`` + ``<key>.json``, or
``00000.parquet`` with a ``jpg`` column, and ``00000_stats.json``) so `sdsg score`/`train` read either.

Resume: a shard is finished when both its data file and its stats file exist (each written atomically,
stats last); a re-run downloads only the other shards. The URL list's order fixes every sample's shard
and key, so a re-run writes the same shards the first run would have.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter

import numpy as np
import ray

from sdsg_ray.config import IngestConfig, SDSGConfig
from sdsg_ray.errors import InvalidRequest
from sdsg_ray.ray_utils import ensure_ray
from sdsg_ray.storage import Storage, get_storage, join, normalize

from .download import COUNTS, ingest_shard, shard_data_name, shard_stats_name
from .urls import UrlItem, read_url_list

log = logging.getLogger(__name__)

SOURCE_FILE = "_INGEST.json"  # the URL list and settings the shards under out were made from


def finished_shards(cfg: IngestConfig, storage: Storage, count: int) -> set[int]:
    """Shards whose data and stats files both exist (one listing of out, not 2 x count HEAD requests)."""
    names = {uri.rsplit("/", 1)[-1] for uri in storage.list(cfg.out)}
    return {i for i in range(count) if shard_data_name(i, cfg.format) in names and shard_stats_name(i) in names}


def _shard_batch(batch: dict[str, np.ndarray], storage: Storage, cfg: IngestConfig) -> dict[str, np.ndarray]:
    """Ray Data UDF: rows (shard, items as JSON) -> rows (shard, counts)."""
    out: dict[str, list] = {"shard": [], **{k: [] for k in COUNTS}}
    for shard, payload in zip(batch["shard"], batch["items"]):
        items = [UrlItem(u, tuple(b) if b else None) for u, b in json.loads(payload)]
        stats = ingest_shard(int(shard), items, storage, cfg)
        out["shard"].append(int(shard))
        for k in COUNTS:
            out[k].append(stats[k])
    return {k: np.array(v, np.int64) for k, v in out.items()}


def run_ingest(config: SDSGConfig) -> dict:
    storage = get_storage(config.storage)
    cfg = config.ingest.model_copy(update={"out": normalize(config.ingest.out)})  # Ray workers run in other directories
    items = read_url_list(cfg.urls, storage)
    if not items:
        raise InvalidRequest(f"{cfg.urls}: no URLs")
    source = {  # never mix shards of another URL list or other settings under one out
        "urls": normalize(cfg.urls), "count": len(items), "format": cfg.format,
        "resolution": cfg.resolution, "shard_size": cfg.shard_size,
    }
    changed = storage.pin_settings(join(cfg.out, SOURCE_FILE), source)
    if changed:
        raise InvalidRequest(f"{cfg.out} holds shards made with different settings {changed}; use another --out")
    count = (len(items) + cfg.shard_size - 1) // cfg.shard_size
    done = finished_shards(cfg, storage, count)
    pending = [i for i in range(count) if i not in done]
    log.info("%d URLs in %d shards; %d shards finished before, %d to download", len(items), count, len(done), len(pending))

    started = time.perf_counter()
    this_run: Counter = Counter()
    if pending:
        ensure_ray(config.storage)
        rows = [
            {"shard": i, "items": json.dumps([[it.url, list(it.box) if it.box else None]
                                              for it in items[i * cfg.shard_size:(i + 1) * cfg.shard_size]])}
            for i in pending
        ]
        ds = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
            _shard_batch,
            fn_kwargs={"storage": storage, "cfg": cfg},
            batch_size=1,
            batch_format="numpy",
            num_cpus=1,
            compute=ray.data.TaskPoolStrategy(size=cfg.tasks),
        )
        for row in ds.iter_rows():
            this_run.update({k: int(row[k]) for k in COUNTS})
            log.info("shard %05d: %d/%d downloaded", row["shard"], row["successes"], row["count"])
    elapsed = time.perf_counter() - started

    totals: Counter = Counter()
    for i in range(count):
        stats = json.loads(storage.read_text(join(cfg.out, shard_stats_name(i))))
        totals.update({k: stats.get(k, 0) for k in COUNTS})  # shards of an older run lack the newer counts
    assert totals["count"] == len(items), (totals, len(items))
    summary = {
        "urls": len(items),
        "out": cfg.out,
        "format": cfg.format,
        "shards": count,
        "shards_resumed": len(done),
        **{k: totals[k] for k in COUNTS[1:]},  # successes, failed_to_download, ..., too_large
        "downloaded_this_run": this_run["count"],
        "seconds_this_run": round(elapsed, 3),
        "urls_per_s": round(this_run["count"] / elapsed, 2) if this_run["count"] and elapsed > 0 else None,
    }
    log.info("ingested %d URLs into %d shards: %d ok, %d failed to download, %d not images, %d refused by the "
             "scheme/address policy, %d over ingest.max_bytes", len(items), count, summary["successes"],
             summary["failed_to_download"], summary["failed_to_resize"], summary["refused"], summary["too_large"])
    return summary
