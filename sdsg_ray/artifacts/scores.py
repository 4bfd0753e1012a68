"""Score shards on storage: where they live, what a row holds, writing them once and streaming them back.

Score shard i (``<out>/scores/scores-0000i.parquet``) holds the scores of manifest shard i, every key
exactly once, written in one atomic put when its last row has arrived (:class:`ShardAssembler`): a shard
file that exists is complete, so a crashed run resumes by skipping the shards already on storage.
Everything downstream of scoring reads them through :meth:`ScoreSet.iter_batches`, one batch in memory
at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sdsg_ray.artifacts.base import Artifact, Member
from sdsg_ray.artifacts.json_file import read_json, write_json
from sdsg_ray.errors import InvalidRequest
from sdsg_ray.manifest import MANIFEST_DIR
from sdsg_ray.storage import ObjectNotFound, Storage, join

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


@dataclass(frozen=True)
class ScoreSet(Artifact):
    """``sdsg score --out``: manifest shards of X, one score shard per manifest shard, the run record (what
    the scores were computed with; a resume must match it) and the summary (written last: scoring finished)."""

    manifest = Member(MANIFEST_DIR, "X listed once into manifest shards (the unit of resume)")
    shards = Member("scores", "score shard i holds the scores of manifest shard i")
    run_record = Member("_RUN.json", "checkpoint, metric, judge size and features the scores were computed with")
    summary = Member("summary.json", "counts, the score distribution and the judge")

    def shard(self, shard_id: int) -> str:
        return join(self.shards, f"scores-{shard_id:05d}.parquet")

    def written_shards(self, storage: Storage) -> set[int]:
        """Ids of the score shards already on storage (one listing, not one request per shard)."""
        names = (uri.rsplit("/", 1)[-1] for uri in storage.list(self.shards, suffixes=(".parquet",)))
        return {int(name[len("scores-"):-len(".parquet")]) for name in names if name.startswith("scores-")}

    def iter_batches(self, storage: Storage, columns: list[str], batch_rows: int = 8192) -> Iterator[dict]:
        """Stream the score shards as dicts of numpy arrays, row group by row group: memory is one batch,
        whatever the number of images. List columns (features) come back as object arrays of float32
        arrays (None on error rows)."""
        shard_uris = list(storage.list(self.shards, suffixes=(".parquet",)))
        if not shard_uris:
            raise ObjectNotFound(f"{self.shards}: no score shards (run `sdsg score --out {self.uri}` first)")
        for uri in shard_uris:
            with storage.open_read(uri) as f:
                shard = pq.ParquetFile(f)
                missing = sorted(set(columns) - set(shard.schema_arrow.names))
                if missing:  # e.g. the d(x) column of score sets written before it was named SCORE_COLUMN
                    raise InvalidRequest(f"{uri}: a score shard without the columns {missing} (it has "
                                         f"{shard.schema_arrow.names}); score again into a new --out")
                for record_batch in shard.iter_batches(batch_size=batch_rows, columns=columns):
                    yield {name: _to_numpy(record_batch.column(name)) for name in columns}

    def read_summary(self, storage: Storage) -> dict:
        return read_json(self.summary, storage, missing=f"is {self.uri} the --out of `sdsg score`?")

    def write_summary(self, summary: dict, storage: Storage) -> str:
        return write_json(self.summary, summary, storage)


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


class ShardAssembler:
    """Buffers scored rows per manifest shard and writes a shard the moment its last row arrives.

    Rows are keyed by image URI, so a row delivered twice (a retried task) is stored once: a second copy
    that arrives while its shard is still pending replaces the first (the same scores), and one that
    arrives after its shard was written is dropped. Both are counted in ``duplicates``. A row of a shard
    this run was never asked to score is a bug upstream and raises a ValueError naming it.
    """

    def __init__(self, scores: ScoreSet, storage: Storage, expected_rows: dict[int, int]) -> None:
        self.scores = scores
        self.storage = storage
        self.expected_rows = dict(expected_rows)
        self.pending: dict[int, dict[str, dict]] = {i: {} for i in expected_rows}
        self.written: set[int] = set()
        self.duplicates = 0  # rows delivered more than once, stored once

    def add(self, batch: dict[str, np.ndarray]) -> list[int]:
        """Take one batch of scored rows (with a `shard` column); return the shard ids written."""
        shards = batch["shard"]
        for i in range(len(shards)):
            shard_id = int(shards[i])
            if shard_id in self.written:  # a late copy of a row already on storage
                self.duplicates += 1
                continue
            if shard_id not in self.pending:
                raise ValueError(f"row {batch['key'][i]!r} belongs to shard {shard_id}, which this run is not "
                                 f"scoring (shards: {sorted(self.expected_rows)})")
            row = {name: batch[name][i] for name in SCORE_COLUMNS}
            if row["status"] != "ok":  # scores of an unreadable image are null, not NaN or zeros
                row.update({SCORE_COLUMN: None, "d_l1": None, "feat_real": None, "feat_recon": None})
            else:
                row["error"] = None
            if row["key"] in self.pending[shard_id]:
                self.duplicates += 1
            self.pending[shard_id][row["key"]] = row
        finished = [s for s in np.unique(shards).tolist()
                    if s in self.pending and len(self.pending[s]) >= self.expected_rows[s]]
        for shard_id in finished:
            self._write(shard_id)
        return finished

    def _write(self, shard_id: int) -> None:
        rows = self.pending.pop(shard_id)
        self.written.add(shard_id)
        assert len(rows) == self.expected_rows[shard_id], (shard_id, len(rows), self.expected_rows[shard_id])
        ordered = [rows[k] for k in sorted(rows)]
        columns = {}
        for name in SCORE_COLUMNS:
            values = [r[name] for r in ordered]
            if name.startswith("feat_"):
                values = [None if v is None else np.asarray(v, np.float32) for v in values]
            columns[name] = pa.array(values, SCORE_SCHEMA.field(name).type, from_pandas=True)
        with self.storage.open_write(self.scores.shard(shard_id)) as f:  # atomic: a shard is whole or absent
            pq.write_table(pa.table(columns, schema=SCORE_SCHEMA), f)

    @property
    def incomplete(self) -> dict[int, int]:
        """shard id -> rows received, for shards still waiting (non-empty only if the stream lost rows)."""
        return {s: len(rows) for s, rows in self.pending.items()}
