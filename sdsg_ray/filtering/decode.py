"""Ray Data CPU stage: image bytes -> RGB uint8 at the model resolution, one status/error per row.

Our own read+decode UDF rather than `ray.data.read_images`, which aborts the dataset on one corrupt file
(or, with max_errored_blocks, silently drops its whole block, good images included).
"""

from __future__ import annotations

import numpy as np

from sdsg_ray.imaging import load_batch
from sdsg_ray.storage import Storage


def shard_id_of(path: str) -> int:
    """`.../manifest/manifest-00012.parquet` -> 12 (the score shard the row belongs to)."""
    name = path.rsplit("/", 1)[-1]
    assert name.startswith("manifest-") and name.endswith(".parquet"), name
    return int(name[len("manifest-") : -len(".parquet")])


def read_and_decode(batch: dict[str, np.ndarray], storage: Storage, resolution: int) -> dict[str, np.ndarray]:
    """Columns in: key, path (of the manifest shard). Out: key, shard, status, error, image [N,R,R,3]."""
    out = load_batch(batch["key"].tolist(), storage, resolution)
    shard_ids = {p: shard_id_of(p) for p in np.unique(batch["path"])}
    out["shard"] = np.array([shard_ids[p] for p in batch["path"]], np.int64)
    return out
