"""The shard-format axis: a ``.jsonl`` layout (one JSON object per line, the image base64-encoded) defined
and registered in this file alone is listed, read and scored by `sdsg score` on the test cluster.

Scoring decodes in Ray workers, so the format is registered there too, by the job's
``runtime_env={"worker_process_setup_hook": ...}``: this test reconnects the driver to the session's
cluster as a job of its own with that hook, and connects back without it afterwards."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch
from conftest import driver_with_setup_hook
from PIL import Image

from sdsg_ray.artifacts.checkpoint import export_inference
from sdsg_ray.artifacts.scores import ScoreSet
from sdsg_ray.config import ModelConfig, load_config
from sdsg_ray.filtering.score import run_scoring
from sdsg_ray.models.networks import build_networks
from sdsg_ray.shards import SHARD_FORMATS, SampleAddress, SampleReadError, ShardFormat, Sample, parse_address
from sdsg_ray.storage import Storage, get_storage, join

PER_SHARD = 5


def index_jsonl(uri: str, storage: Storage) -> list[str]:
    lines = storage.read_text(uri).splitlines()
    return [str(SampleAddress(uri, json.loads(line)["key"], row=i, column="png")) for i, line in enumerate(lines)]


def read_jsonl(shard: str, items: list[tuple[int, SampleAddress]], storage: Storage, out: dict) -> None:
    lines = storage.read_text(shard).splitlines()  # one read per shard and batch
    for i, address in items:
        if address.row >= len(lines):
            out[i] = SampleReadError(f"{address.key}: no line {address.row} in the shard")
        else:
            out[i] = base64.b64decode(json.loads(lines[address.row])[address.column])


def write_jsonl(samples: list[Sample]) -> bytes:
    return "".join(json.dumps({"key": s.key, "png": base64.b64encode(s.image).decode()}) + "\n"
                   for s in samples if s.image is not None).encode()


JSONL = ShardFormat(".jsonl", index_jsonl, read_jsonl, write_jsonl)


def register_jsonl() -> None:
    """Runs in the driver and, as the worker_process_setup_hook, once in every worker of the job."""
    if "jsonl" not in SHARD_FORMATS:
        SHARD_FORMATS.register("jsonl", JSONL)


def _png(rng: np.random.Generator) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def jsonl_on_the_cluster(ray_cluster):
    register_jsonl()
    try:
        with driver_with_setup_hook(ray_cluster, register_jsonl):
            yield
    finally:
        SHARD_FORMATS.unregister("jsonl")


def test_a_shard_format_registered_in_a_test_is_scored(jsonl_on_the_cluster, tmp_path):
    storage = get_storage()
    rng = np.random.default_rng(0)
    data = str(tmp_path / "raw")
    for shard in range(2):
        samples = [Sample(f"{shard}{i:03d}", _png(rng), {}) for i in range(PER_SHARD)]
        storage.write_bytes(join(data, f"{shard:05d}.jsonl"), SHARD_FORMATS["jsonl"].write(samples))
    expected = [address for shard in range(2) for address in index_jsonl(join(data, f"{shard:05d}.jsonl"), storage)]
    assert len(expected) == 2 * PER_SHARD

    torch.manual_seed(0)
    model = ModelConfig()
    G, _, E = build_networks(model)
    checkpoint = str(tmp_path / "stage1" / "inference.pt")
    export_inference(G, E, model, {"stage": "random-weights-for-plumbing-tests"}, checkpoint, storage)
    out = str(tmp_path / "scores")
    summary = run_scoring(load_config(None, {"score.data": data, "score.checkpoint": checkpoint, "score.out": out,
                                             "score.batch_size": 4, "score.manifest_shard_size": 6}))

    rows = {}
    for batch in ScoreSet(out).iter_batches(storage, ["key", "status", "error"]):
        rows.update({key: (status, error) for key, status, error in zip(batch["key"], batch["status"], batch["error"])})
    assert sorted(rows) == sorted(expected) and summary["scored"] == len(expected)
    assert {key: status for key, (status, _) in rows.items()} == {key: "ok" for key in expected}, rows
    assert sorted(parse_address(key).key for key in rows) == [f"{s}{i:03d}" for s in range(2) for i in range(PER_SHARD)]
