"""The inference bundle: export -> load roundtrip, identity, weights_only loading, clear errors; local and S3."""

from __future__ import annotations

import io

import pytest
import torch

from sdsg_ray.artifacts.checkpoint import (
    ModelDir,
    INFERENCE_FORMAT,
    CheckpointError,
    export_inference,
    load_inference,
)
from sdsg_ray.config import ModelConfig
from sdsg_ray.models import build_networks
from sdsg_ray.storage import ObjectNotFound, get_storage, join

MODEL = ModelConfig(resolution=16, z_dim=16, w_dim=16, mapping_layers=2, channel_base=128, channel_max=8, encoder_w_plus=True)


@pytest.fixture(scope="module")
def trained_like():
    """Networks whose buffers are not at their init values (w_avg, E's anchor), as after training."""
    torch.manual_seed(0)
    G, _, E = build_networks(MODEL)
    G.mapping(torch.randn(32, MODEL.z_dim), update_w_avg=True)
    with torch.no_grad():
        E.w_avg.copy_(G.mapping.w_avg)
    return G.eval(), E.eval()


def roundtrip_check(G, E, uri: str, storage) -> None:
    meta = {"stage": "joint", "step": 7, "kimg": 0.5, "metric": "stlpips-alex"}
    identity = export_inference(G, E, MODEL, meta, uri, storage)
    bundle = load_inference(uri, storage)
    assert bundle.identity == identity and len(identity) == 16
    assert bundle.model == MODEL
    assert bundle.meta["step"] == 7 and "created_at" in bundle.meta
    torch.testing.assert_close(bundle.w_avg, G.mapping.w_avg)
    assert not bundle.G_ema.training and not bundle.E.training
    assert not any(p.requires_grad for p in [*bundle.G_ema.parameters(), *bundle.E.parameters()])
    z = torch.randn(3, MODEL.z_dim)
    with torch.no_grad():
        img = G(z, noise_mode="const")
        assert torch.equal(bundle.G_ema(z, noise_mode="const"), img)
        assert torch.equal(bundle.E(img), E(img))
    assert load_inference(uri, storage).identity == identity  # identity is a property of the bytes


def test_roundtrip_local_directory_and_file(tmp_path, trained_like):
    G, E = trained_like
    storage = get_storage()
    out_dir = str(tmp_path / "run")
    roundtrip_check(G, E, out_dir, storage)
    assert (tmp_path / "run" / ModelDir.inference.name).is_file()
    explicit = str(tmp_path / "other.pt")
    export_inference(G, None, MODEL, {}, explicit, storage)
    assert load_inference(explicit).E is None
    # the file is plain data: weights_only loading works without our code
    payload = torch.load(tmp_path / "run" / ModelDir.inference.name, weights_only=True)
    assert payload["format"] == INFERENCE_FORMAT and payload["model"]["resolution"] == 16


def test_roundtrip_s3(s3_bucket, trained_like):
    G, E = trained_like
    roundtrip_check(G, E, join(s3_bucket, "runs", "stage1"), get_storage())


def test_errors_name_the_uri(tmp_path, trained_like):
    G, E = trained_like
    storage = get_storage()
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_inference(str(tmp_path / "nowhere"), storage)
    uri = str(tmp_path / "run")
    export_inference(G, E, MODEL, {}, uri, storage)
    path = tmp_path / "run" / ModelDir.inference.name
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated upload
    with pytest.raises(CheckpointError, match=str(path)):
        load_inference(uri, storage)
    path.write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="not a readable torch file"):
        load_inference(uri, storage)
    buf = io.BytesIO()
    torch.save({"format": "something-else/3"}, buf)
    path.write_bytes(buf.getvalue())
    with pytest.raises(CheckpointError, match="something-else"):
        load_inference(uri, storage)
    with pytest.raises(CheckpointError, match="JSON-like"):
        export_inference(G, E, MODEL, {"bad": object()}, uri, storage)
    assert not isinstance(ObjectNotFound("x"), CheckpointError)
