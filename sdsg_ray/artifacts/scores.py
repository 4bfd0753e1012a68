"""Score shards on storage: where they live, what a row holds, and streaming them back.

Score shard i (``<out>/scores/scores-0000i.parquet``) holds the scores of manifest shard i, every key
exactly once; a shard file that exists is complete (see :mod:`sdsg_ray.artifacts.score_writer`). Everything
downstream of scoring (selection, the random-subset baseline, the evaluation's outlier table) reads
them through :func:`iter_score_batches`, one batch in memory at a time.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sdsg_ray.artifacts.base import Artifact, Member
from sdsg_ray.artifacts.json_file import write_json
from sdsg_ray.errors import InvalidRequest
from sdsg_ray.manifest import MANIFEST_DIR
from sdsg_ray.storage import ObjectNotFound, Storage, join

SCORES_DIR = "scores"
SUMMARY_FILE = "summary.json"
# d(x) = metric(x, G(E(x))) under the run's perceptual metric (the summary's "metric" and "judge" name it)
SCORE_COLUMN = "d"
SCORE_COLUMNS = ("key", "status", "error", SCORE_COLUMN, "d_l1", "feat_real", "feat_recon")
SCORE_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        (SCORE_COLUMN, pa.float32()),
        ("d_l1", pa.float32()),
        ("feat_real", pa.list_(pa.float32())),
        ("feat_recon", pa.list_(pa.float32())),
    ]
)


def score_shard_uri(out: str, shard_id: int) -> str:
    return join(out, SCORES_DIR, f"scores-{shard_id:05d}.parquet")


def written_shards(out: str, storage: Storage) -> set[int]:
    """Ids of the score shards already on storage (one listing, not one request per shard)."""
    done = set()
    for uri in storage.list(join(out, SCORES_DIR), suffixes=(".parquet",)):
        name = uri.rsplit("/", 1)[-1]
        if name.startswith("scores-"):
            done.add(int(name[len("scores-"):-len(".parquet")]))
    return done


def iter_score_batches(out: str, storage: Storage, columns: list[str], batch_rows: int = 8192) -> Iterator[dict]:
    """Stream the score shards under a scoring --out URI as dicts of numpy arrays, row group by row group.

    Memory is one batch, whatever the number of images. List columns (features) come back as object
    arrays of float32 arrays (None on error rows).
    """
    shard_uris = list(storage.list(join(out, SCORES_DIR), suffixes=(".parquet",)))
    if not shard_uris:
        raise ObjectNotFound(f"{join(out, SCORES_DIR)}: no score shards (run `sdsg score --out {out}` first)")
    for uri in shard_uris:
        with storage.open_read(uri) as f:
            shard = pq.ParquetFile(f)
            missing = sorted(set(columns) - set(shard.schema_arrow.names))
            if missing:  # e.g. the d(x) column of score sets written before it was named SCORE_COLUMN
                raise InvalidRequest(f"{uri}: a score shard without the columns {missing} (it has "
                                     f"{shard.schema_arrow.names}); score again into a new --out")
            for record_batch in shard.iter_batches(batch_size=batch_rows, columns=columns):
                yield {name: _to_numpy(record_batch.column(name)) for name in columns}


def _to_numpy(column: pa.Array) -> np.ndarray:
    if pa.types.is_list(column.type):
        # offsets index into the (unsliced) child array; slicing per row avoids a Python float per element
        offsets = column.offsets.to_numpy()
        values = column.values.to_numpy(zero_copy_only=False)
        valid = column.is_valid().to_numpy(zero_copy_only=False)
        out = np.empty(len(column), dtype=object)
        for i in range(len(column)):
            out[i] = values[offsets[i] : offsets[i + 1]] if valid[i] else None
        return out
    if pa.types.is_floating(column.type):
        return column.to_numpy(zero_copy_only=False).astype(np.float64)  # nulls -> nan
    return column.to_numpy(zero_copy_only=False)


def read_summary(out: str, storage: Storage) -> dict:
    uri = join(out, SUMMARY_FILE)
    try:
        return json.loads(storage.read_text(uri))
    except ObjectNotFound:
        raise ObjectNotFound(f"{uri}: no scoring summary; is {out} the --out of `sdsg score`?") from None



@dataclass(frozen=True)
class ScoreSet(Artifact):
    """``sdsg score --out``: manifest shards of X, one score shard per manifest shard, the run record (what
    the scores were computed with; a resume must match it) and the summary (written last: scoring finished)."""

    manifest = Member(MANIFEST_DIR, "X listed once into manifest shards (the unit of resume)")
    shards = Member(SCORES_DIR, "score shard i holds the scores of manifest shard i")
    run_record = Member("_RUN.json", "checkpoint, metric, judge size and features the scores were computed with")
    summary = Member(SUMMARY_FILE, "counts, the score distribution and the judge")

    def shard(self, shard_id: int) -> str:
        return score_shard_uri(self.uri, shard_id)

    def iter_batches(self, storage: Storage, columns: list[str], batch_rows: int = 8192) -> Iterator[dict]:
        return iter_score_batches(self.uri, storage, columns, batch_rows)

    def read_summary(self, storage: Storage) -> dict:
        return read_summary(self.uri, storage)

    def write_summary(self, summary: dict, storage: Storage) -> str:
        return write_json(self.summary, summary, storage)
