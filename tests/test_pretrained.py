"""Pretrained networks: real shipped stlpips weights; missing-weight errors are ours and say what to do."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdsg_ray import pretrained
from sdsg_ray.distances import frechet_distance
from sdsg_ray.pretrained import PretrainedMissing, build_fid_features, build_metric, resolve_metric


@pytest.fixture(scope="module")
def metric():
    return build_metric("stlpips-alex")


def _images(n: int, side: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    smooth = torch.nn.functional.interpolate(torch.rand(n, 3, 8, 8, generator=g), size=(side, side), mode="bilinear")
    return smooth * 2 - 1


def test_missing_lpips_backbone_names_file_and_alternative(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for name, file in (("lpips-alex", "alexnet-owt-7be5be79.pth"), ("lpips-vgg", "vgg16-397923af.pth")):
        with pytest.raises(PretrainedMissing) as info:
            build_metric(name)
        message = str(info.value)
        assert file in message and str(tmp_path / "torch" / "hub" / "checkpoints") in message
        assert "stlpips-alex" in message


def test_auto_skips_missing_lpips(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with caplog.at_level("INFO", logger="sdsg_ray.pretrained"):
        assert resolve_metric("auto") == "stlpips-vgg"
    assert "lpips-vgg" in caplog.text and "missing" in caplog.text
    with pytest.raises(ValueError, match="unknown perceptual metric"):
        resolve_metric("lpips-squeeze")


def test_metric_is_frozen_and_matches_upstream(metric):
    assert metric.name == "stlpips-alex" and not metric.training
    assert all(not p.requires_grad for p in metric.parameters())
    from stlpips_pytorch import stlpips

    upstream = stlpips.LPIPS(net="alex", variant="shift_tolerant", verbose=False).eval()  # upstream's own loading
    x, y = _images(4), _images(4, seed=1)
    with torch.no_grad():
        ours, theirs = metric(x, y), upstream(x, y).flatten()
    assert ours.shape == (4,)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_distance_zero_for_identical_and_grows_with_noise(metric):
    x = _images(3)
    with torch.no_grad():
        assert metric(x, x).abs().max() < 1e-6
        g = torch.Generator().manual_seed(3)
        noise = torch.randn(x.shape, generator=g)
        d = [metric(x, (x + s * noise).clamp(-1, 1)) for s in (0.05, 0.2, 0.6)]
    assert (d[0] > 0).all() and (d[0] < d[1]).all() and (d[1] < d[2]).all()


def test_gradient_flows_to_inputs(metric):
    x = _images(2).requires_grad_(True)
    metric(x, _images(2, seed=5)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_features_distance_and_pairwise_consistent(metric):
    x, c = _images(5), _images(3, seed=7)
    with torch.no_grad():
        fx, fc = metric.features(x), metric.features(c)
        torch.testing.assert_close(metric.distance_from_features(fx, [f[:1] for f in fc]),
                                   metric(x, c[:1].expand_as(x)), atol=1e-5, rtol=0)  # batch-1 broadcast
        pairwise = metric.pairwise_distance_from_features(fx, fc)
        brute = torch.stack([metric(x, c[k : k + 1].expand_as(x)) for k in range(3)], dim=1)
    assert pairwise.shape == (5, 3)
    torch.testing.assert_close(pairwise, brute, atol=1e-5, rtol=0)


def test_small_inputs_are_upsampled(metric):
    x = _images(2, side=16)
    with torch.no_grad():
        assert metric(x, x.flip(-1)).shape == (2,)


def test_inception_missing_is_clear(tmp_path, monkeypatch):
    with pytest.raises(PretrainedMissing) as info:
        build_fid_features("inception", path=str(tmp_path))
    message = str(info.value)
    assert "inception-2015-12-05.pt" in message and str(tmp_path) in message and "stlpips-alex-pool" in message
    monkeypatch.setenv("SDSG_INCEPTION_PATH", str(tmp_path / "nowhere.pt"))
    with pytest.raises(PretrainedMissing, match="SDSG_INCEPTION_PATH"):
        build_fid_features("inception")


def test_auto_features_fall_back_to_pooled_stlpips(tmp_path, monkeypatch):
    monkeypatch.delenv("SDSG_INCEPTION_PATH", raising=False)
    monkeypatch.setattr(pretrained, "_cleanfid_cache_dir", lambda: str(tmp_path))  # an empty cache
    features = build_fid_features("auto")
    assert features.name == "stlpips-alex-pool" and not features.is_inception and features.dim == 1152
    assert features.distance_label == "FD (stlpips-alex-pool)"
    for side in (32, 128):  # any resolution in, the same feature out
        out = features(_images(4, side=side))
        assert out.shape == (4, 1152) and np.isfinite(out).all()
    a, b = features(_images(16, seed=1))[:, :8], features(_images(16, seed=2))[:, :8]  # sqrtm of 1152^2 is slow
    stats_a, stats_b = (a.mean(0), np.cov(a, rowvar=False)), (b.mean(0) + 1, np.cov(b, rowvar=False))
    assert abs(frechet_distance(*stats_a, *stats_a)) < 1e-3 and frechet_distance(*stats_a, *stats_b) > 1


def test_inception_plumbing_with_stand_in_torchscript(tmp_path):
    """A stand-in TorchScript file at the real file name checks OUR side: clean-fid's loader is used,
    images arrive resized to 299 and scaled as clean-fid expects ((x - 128) / 128 of 0..255)."""

    class Layers(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            stats = torch.stack([x.new_full((x.shape[0],), float(x.shape[2])), x.amin((1, 2, 3)), x.amax((1, 2, 3))], 1)
            return torch.cat([stats, x.new_zeros(x.shape[0], 2045)], 1)

    class Base(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = Layers()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.layers(x)

    torch.jit.save(torch.jit.script(Base()), str(tmp_path / "inception-2015-12-05.pt"))
    features = build_fid_features("inception", path=str(tmp_path))
    assert features.is_inception and features.dim == 2048 and features.distance_label == "FID"
    images = torch.zeros(2, 3, 32, 32)
    images[0] = 1.0  # white -> 255 -> +0.99; black -> 0 -> -1
    images[1] = -1.0
    out = features(images)
    assert out[:, 0].tolist() == [299, 299]
    np.testing.assert_allclose(out[0, 1:3], [127 / 128] * 2, atol=1e-4)
    np.testing.assert_allclose(out[1, 1:3], [-1, -1], atol=1e-4)
