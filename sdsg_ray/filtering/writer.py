"""Score shards: their layout, their atomic writing, and streaming them back.

Score shard i holds the scores of manifest shard i, every key exactly once. It is written in one
atomic put (Storage.open_write) only when all of its rows have arrived, so a shard file that exists is
complete and a crashed run resumes by skipping the shards already on storage.
"""

from __future__ import annotations

import json
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sdsg_ray.storage import ObjectNotFound, Storage, join


SCORES_DIR = "scores"
SUMMARY_FILE = "summary.json"
SCORE_COLUMNS = ("key", "status", "error", "d_lpips", "d_l1", "feat_real", "feat_recon")
SCORE_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("d_lpips", pa.float32()),
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


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


class ShardAssembler:
    """Buffers scored rows per manifest shard and writes a shard the moment its last row arrives.

    Rows are keyed by image URI, so a row delivered twice (a retried task) is stored once.
    """

    def __init__(self, out: str, storage: Storage, expected_rows: dict[int, int]) -> None:
        self.out = out
        self.storage = storage
        self.expected_rows = dict(expected_rows)
        self.pending: dict[int, dict[str, dict]] = {i: {} for i in expected_rows}

    def add(self, batch: dict[str, np.ndarray]) -> list[int]:
        """Take one batch of scored rows (with a `shard` column); return the shard ids written."""
        shards = batch["shard"]
        for i in range(len(shards)):
            row = {name: batch[name][i] for name in SCORE_COLUMNS}
            if row["status"] != "ok":  # scores of an unreadable image are null, not NaN or zeros
                row.update(d_lpips=None, d_l1=None, feat_real=None, feat_recon=None)
            else:
                row["error"] = None
            self.pending[int(shards[i])][row["key"]] = row
        finished = [s for s in np.unique(shards).tolist() if len(self.pending[s]) >= self.expected_rows[s]]
        for shard_id in finished:
            self._write(shard_id)
        return finished

    def _write(self, shard_id: int) -> None:
        rows = self.pending.pop(shard_id)
        assert len(rows) == self.expected_rows[shard_id], (shard_id, len(rows), self.expected_rows[shard_id])
        ordered = [rows[k] for k in sorted(rows)]
        columns = {}
        for name in SCORE_COLUMNS:
            values = [r[name] for r in ordered]
            if name.startswith("feat_"):
                values = [None if v is None else np.asarray(v, np.float32) for v in values]
            columns[name] = pa.array(values, SCORE_SCHEMA.field(name).type, from_pandas=True)
        table = pa.table(columns, schema=SCORE_SCHEMA)
        self.storage.write_bytes(score_shard_uri(self.out, shard_id), _parquet_bytes(table))

    @property
    def incomplete(self) -> dict[int, int]:
        """shard id -> rows received, for shards still waiting (non-empty only if the stream lost rows)."""
        return {s: len(rows) for s, rows in self.pending.items()}


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
            for record_batch in pq.ParquetFile(f).iter_batches(batch_size=batch_rows, columns=columns):
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


def write_parquet_stream(batches: Iterable[pa.RecordBatch], schema: pa.Schema, uri: str, storage: Storage) -> int:
    """Write record batches into one parquet file, streamed; the file appears only when complete."""
    rows = 0
    with storage.open_write(uri) as f:
        with pq.ParquetWriter(f, schema) as writer:
            for batch in batches:
                if batch.num_rows:
                    writer.write_batch(batch.cast(schema) if batch.schema != schema else batch)
                    rows += batch.num_rows
    return rows


def read_summary(out: str, storage: Storage) -> dict:
    uri = join(out, SUMMARY_FILE)
    try:
        return json.loads(storage.read_text(uri))
    except ObjectNotFound:
        raise ObjectNotFound(f"{uri}: no scoring summary; is {out} the --out of `sdsg score`?") from None
