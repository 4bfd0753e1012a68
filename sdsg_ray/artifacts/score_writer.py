"""Writing score shards: each in one atomic put, only when all of its rows have arrived.

Score shard i holds the scores of manifest shard i, every key exactly once (layout and reading:
:mod:`sdsg_ray.artifacts.scores`). Because a shard appears only complete, a crashed run resumes by
skipping the shards already on storage.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sdsg_ray.artifacts.scores import SCORE_COLUMN, SCORE_COLUMNS, SCORE_SCHEMA, score_shard_uri
from sdsg_ray.storage import Storage


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


class ShardAssembler:
    """Buffers scored rows per manifest shard and writes a shard the moment its last row arrives.

    Rows are keyed by image URI, so a row delivered twice (a retried task) is stored once: a second copy
    that arrives while its shard is still pending replaces the first (the same scores), and one that
    arrives after its shard was written is dropped. Both are counted in ``duplicates``. A row of a shard
    this run was never asked to score is a bug upstream and raises a ValueError naming it.
    """

    def __init__(self, out: str, storage: Storage, expected_rows: dict[int, int]) -> None:
        self.out = out
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
        table = pa.table(columns, schema=SCORE_SCHEMA)
        self.storage.write_bytes(score_shard_uri(self.out, shard_id), _parquet_bytes(table))

    @property
    def incomplete(self) -> dict[int, int]:
        """shard id -> rows received, for shards still waiting (non-empty only if the stream lost rows)."""
        return {s: len(rows) for s, rows in self.pending.items()}
