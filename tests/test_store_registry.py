"""The object-store axis: a ``mem://`` store defined and registered in this file alone holds a run.

The store is a dict of this process, so only stages that run in the driver use it: the synthetic dataset,
listing it into a manifest, reading and decoding its images, and artifact handles written and read back.
Nothing reaches the local disk: every object the run writes is a ``mem://`` key of the dict."""

from __future__ import annotations

import contextlib
import csv
import io
from typing import IO, Iterator

import pytest
import torch

from sdsg_ray.artifacts.checkpoint import export_inference, load_inference
from sdsg_ray.artifacts.dataset import SyntheticDataset
from sdsg_ray.artifacts.checkpoint import ModelDir
from sdsg_ray.artifacts.selection import FilteredSet
from sdsg_ray.config import ModelConfig, load_config
from sdsg_ray.dataset.synthetic import run_make_dataset
from sdsg_ray.imaging import load_batch
from sdsg_ray.manifest import read_manifest, resolve_images, write_manifest
from sdsg_ray.models.networks import build_networks
from sdsg_ray.storage import STORES, ObjectInfo, ObjectNotFound, ObjectStore, StorageError, get_storage, join

N = 24
ROOT = "mem://toy-run"


class MemObjects(ObjectStore):
    """Objects as bytes in one dict shared by every instance of this process."""

    objects: dict[str, bytes] = {}

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        under = prefix.rstrip("/") + "/"
        for uri in sorted(u for u in self.objects if u.startswith(under)):
            yield ObjectInfo(uri, len(self.objects[uri]))

    def info(self, uri: str) -> ObjectInfo | None:
        return ObjectInfo(uri, len(self.objects[uri])) if uri in self.objects else None

    def open_read(self, uri: str) -> IO[bytes]:
        if uri not in self.objects:
            raise ObjectNotFound(f"{uri}: no such object")
        return io.BytesIO(self.objects[uri])

    @contextlib.contextmanager
    def open_write(self, uri: str) -> Iterator[IO[bytes]]:
        buffer = io.BytesIO()
        yield buffer
        self.objects[uri] = buffer.getvalue()  # only after the block succeeded: atomic for readers

    def delete(self, uri: str) -> None:
        self.objects.pop(uri, None)


@pytest.fixture
def mem_store():
    STORES.register("mem", MemObjects)
    try:
        yield MemObjects.objects
    finally:
        STORES.unregister("mem")
        MemObjects.objects.clear()


def test_a_mem_store_registered_in_a_test_holds_a_run(mem_store, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a stray local write would land here
    data = join(ROOT, "data")
    config = load_config(None, {"dataset.out": data, "dataset.n": N, "dataset.resolution": 32, "dataset.seed": 3})
    summary = run_make_dataset(config)
    assert summary["out"] == data and summary["n"] == N
    storage = get_storage(config.storage)

    # Listed through the manifest module and decoded through imaging, as scoring would.
    dataset = SyntheticDataset(data)
    keys = resolve_images(dataset.images, storage)
    with_labels = [row["key"] for row in csv.DictReader(io.StringIO(storage.read_text(dataset.labels)))]
    assert len(keys) == N and sorted(with_labels) == keys
    assert all(k.startswith(f"{data}/images/") for k in keys)
    batch = load_batch(keys, storage, resolution=32)
    assert list(batch["key"]) == keys and set(batch["status"]) == {"ok"}
    assert batch["image"].shape == (N, 32, 32, 3) and batch["image"].std() > 0

    manifest = join(ROOT, "listing.parquet")
    write_manifest(keys, manifest, storage)
    assert resolve_images(manifest, storage) == read_manifest(manifest, storage) == keys

    # Artifact handles: a selection report and a stage-1 inference bundle.
    selection = FilteredSet(join(ROOT, "selection"))
    selection.write_report({"theta": 0.25, "size_kept": N - 2}, storage)
    assert selection.read_report(storage) == {"theta": 0.25, "size_kept": N - 2}
    torch.manual_seed(0)
    model = ModelConfig()
    G, _, E = build_networks(model)
    bundle_uri = ModelDir(join(ROOT, "stage1")).inference
    export_inference(G, E, model, {"stage": "toy-store"}, bundle_uri, storage)
    bundle = load_inference(bundle_uri, storage)
    for name, value in G.state_dict().items():
        assert torch.equal(bundle.G_ema.state_dict()[name], value), name

    written = set(mem_store)
    assert {dataset.labels, dataset.preview, manifest, selection.report, bundle_uri} <= written
    assert all(uri.startswith(ROOT + "/") for uri in written)
    assert list(tmp_path.iterdir()) == []


def test_an_unregistered_scheme_is_refused_with_the_choices():
    with pytest.raises(StorageError, match=r"mem://x: unsupported URI scheme .*file://, s3://"):
        get_storage().read_bytes("mem://x")
