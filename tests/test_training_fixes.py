"""Issue 15's three training fixes: EMA ramp-up, E_ema (and the scoring pair), unbiased w_avg."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from sdsg_ray.artifacts.scores import SCORE_COLUMN
from sdsg_ray.config import load_config
from sdsg_ray.storage import get_storage
from sdsg_ray.training.losses import ema_beta

TINY = {"train.metric": "stlpips-alex", "model.resolution": 16, "model.channel_max": 32, "model.z_dim": 32,
        "model.w_dim": 32, "train.batch_size": 4}


def _batch(seed: int, n: int = 4, res: int = 16) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, res, res, 3), dtype=np.uint8))


def init_share(batch: int, kimg: float, ema_kimg: float, ema_rampup: float | None) -> float:
    """Weight G_ema still gives to G's state after its first step: prod of the later steps' betas."""
    steps = int(np.ceil(kimg * 1000 / batch))
    share = 1.0
    for k in range(1, steps):
        share *= ema_beta(batch, ema_kimg, cur_nimg=k * batch, ema_rampup=ema_rampup)
    return share


# --- 1. EMA ramp-up ---------------------------------------------------------------------------------------


def test_ema_rampup_follows_nvidia_and_leaves_little_of_the_start_at_demo_lengths():
    # NVIDIA: ema_nimg = min(ema_kimg * 1000, cur_nimg * ema_rampup); beta = 0.5 ** (batch / ema_nimg)
    assert ema_beta(16, 0.5, cur_nimg=1600, ema_rampup=0.05) == pytest.approx(0.5 ** (16 / 80))
    assert ema_beta(16, 0.5, cur_nimg=10**6, ema_rampup=0.05) == pytest.approx(0.5 ** (16 / 500))  # capped
    assert ema_beta(16, 0.5, cur_nimg=1600, ema_rampup=None) == pytest.approx(0.5 ** (16 / 500))
    assert ema_beta(16, 0.5, cur_nimg=0, ema_rampup=0.05) == 0.0  # the first step copies G
    # The demo's stage 1 (batch 16, 2 kimg) and stage 2 (1 kimg), half-life 0.5 kimg
    for kimg, old in ((2.0, 0.0625), (1.0, 0.25)):
        assert init_share(16, kimg, 0.5, None) == pytest.approx(old, rel=0.05)
        assert init_share(16, kimg, 0.5, 0.05) < 1e-6


@pytest.mark.slow  # a few training steps: ~1-2 min on the loaded 2-core box
def test_training_with_rampup_copies_G_into_G_ema_at_the_first_step_then_lags():
    from sdsg_ray.training.loop import TrainingRun

    config = load_config(None, {**TINY, "train.stage": "generator"})
    assert config.train.ema_rampup == 0.05  # the default, as NVIDIA's auto config
    run = TrainingRun(config)
    run.step(_batch(0))
    for p_ema, p in zip(run.G_ema.parameters(), run.G.parameters()):
        assert torch.equal(p_ema, p)
    ema_before = [p.detach().clone() for p in run.G_ema.parameters()]
    run.step(_batch(1))
    beta = ema_beta(4, config.train.ema_kimg, cur_nimg=4, ema_rampup=0.05)
    assert 0 < beta < 1
    for p_ema, p, prev in zip(run.G_ema.parameters(), run.G.parameters(), ema_before):
        torch.testing.assert_close(p_ema, p.lerp(prev, beta))


# --- 2. E_ema and the scoring pair --------------------------------------------------------------------------


@pytest.mark.slow  # a few training steps: ~1-2 min on the loaded 2-core box
def test_E_ema_follows_E_with_G_emas_beta_and_the_bundle_hands_out_the_configured_pair(tmp_path):
    from sdsg_ray.artifacts.checkpoint import load_inference, scoring_pair
    from sdsg_ray.pretrained import build_metric
    from sdsg_ray.training.loop import TrainingRun

    config = load_config(None, TINY)
    assert config.score.pair == "ema"
    run = TrainingRun(config, metric=build_metric(config.train.metric))
    for k in range(2):
        run.step(_batch(k))
    ema_before = [p.detach().clone() for p in run.E_ema.parameters()]
    run.step(_batch(2))
    beta = ema_beta(4, config.train.ema_kimg, cur_nimg=8, ema_rampup=config.train.ema_rampup)
    for p_ema, p, prev in zip(run.E_ema.parameters(), run.E.parameters(), ema_before):
        torch.testing.assert_close(p_ema, p.lerp(prev, beta))
    assert any(not torch.equal(a, b) for a, b in zip(run.E_ema.parameters(), run.E.parameters()))

    # training state round trip keeps E_ema
    state = run.state_dict()
    other = TrainingRun(config, metric=run.metric)
    other.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(other.E_ema.parameters(), run.E_ema.parameters()))

    uri = str(tmp_path / "stage1")
    run.export_inference({"stage": "joint"}, uri, get_storage())
    bundle = load_inference(uri)
    for pair, (G_ref, E_ref) in {"ema": (run.G_ema, run.E_ema), "live": (run.G, run.E)}.items():
        G, E = scoring_pair(bundle, pair)
        assert all(torch.equal(a, b.cpu()) for a, b in zip(G.parameters(), G_ref.parameters())), pair
        assert all(torch.equal(a, b.cpu()) for a, b in zip(E.parameters(), E_ref.parameters())), pair


def test_old_bundle_without_E_ema_loads_with_a_warning_and_refuses_the_live_pair(tmp_path, caplog):
    from sdsg_ray.artifacts.checkpoint import CheckpointError, export_inference, load_inference, scoring_pair
    from sdsg_ray.config import ModelConfig
    from sdsg_ray.models.networks import build_networks

    model = ModelConfig(resolution=16, channel_max=32, z_dim=32, w_dim=32)
    G, _, E = build_networks(model)
    uri = str(tmp_path / "old.pt")
    export_inference(G, E, model, {}, uri, get_storage())  # what today's trainer wrote: no E_ema, no live G
    with caplog.at_level(logging.WARNING):
        bundle = load_inference(uri)
        G_s, E_s = scoring_pair(bundle, "ema")
    assert "E_ema" in caplog.text
    assert E_s is bundle.E and G_s is bundle.G_ema
    with pytest.raises(CheckpointError, match="live"):
        scoring_pair(bundle, "live")


def test_scorer_uses_the_configured_pair(tmp_path):
    from sdsg_ray.artifacts.checkpoint import export_inference, load_inference
    from sdsg_ray.config import ModelConfig
    from sdsg_ray.filtering.scorer import ReconstructionScorer
    from sdsg_ray.models.networks import build_networks

    model = ModelConfig(resolution=16, channel_max=32, z_dim=32, w_dim=32)
    torch.manual_seed(0)
    G, _, E = build_networks(model)
    G_live, _, E_live = build_networks(model)
    uri = str(tmp_path / "b.pt")
    export_inference(G, E, model, {}, uri, get_storage(), G_live=G_live, E_ema=E)
    bundle = load_inference(uri)
    features = lambda x: np.zeros((x.shape[0], 2), np.float32)  # noqa: E731
    metric = lambda a, b: (a - b).abs().flatten(1).mean(1)  # noqa: E731
    images = np.asarray(_batch(3), np.uint8)
    d = {pair: ReconstructionScorer(bundle, metric, features, torch.device("cpu"), pair=pair)(images)[SCORE_COLUMN]
         for pair in ("ema", "live")}
    scorer = ReconstructionScorer(bundle, metric, features, torch.device("cpu"), pair="live")
    assert scorer.G is bundle.G and scorer.E is bundle.E
    assert not np.allclose(d["ema"], d["live"])


# --- 3. unbiased w_avg --------------------------------------------------------------------------------------


@pytest.mark.slow  # a few training steps: ~1-2 min on the loaded 2-core box
def test_w_avg_tracks_the_mean_of_mapped_latents_after_a_few_steps():
    from sdsg_ray.training.loop import TrainingRun

    config = load_config(None, {**TINY, "train.stage": "generator", "train.batch_size": 8})
    run = TrainingRun(config)
    for k in range(8):
        run.step(_batch(k, n=8))
    with torch.no_grad():
        w_mean = run.G.mapping(torch.randn(4096, run.G.z_dim, generator=torch.Generator().manual_seed(1))).mean(0)
    w_avg = run.G_ema.mapping.w_avg
    cosine = float(torch.nn.functional.cosine_similarity(w_avg, w_mean, dim=0))
    ratio = float(w_avg.norm() / w_mean.norm())
    assert cosine > 0.95 and 0.9 < ratio < 1.1, (cosine, ratio)
    assert torch.equal(run.G.mapping.w_avg, run.G_ema.mapping.w_avg)


def test_mapping_w_avg_is_a_debiased_ema_and_old_state_dicts_still_load():
    from sdsg_ray.models.networks import MappingNetwork

    torch.manual_seed(0)
    mapping = MappingNetwork(8, 8, 2)
    z1, z2 = torch.randn(16, 8), torch.randn(16, 8)
    m1 = mapping(z1, update_w_avg=True).mean(0)
    torch.testing.assert_close(mapping.w_avg, m1)  # first update: the batch mean, not 0.005 of it
    m2 = mapping(z2, update_w_avg=True).mean(0)
    torch.testing.assert_close(mapping.w_avg, (m1 + m2) / 2)  # a running mean until 1/n < 1 - beta
    mapping(z1)  # inference never moves it
    torch.testing.assert_close(mapping.w_avg, (m1 + m2) / 2)
    old = {k: v for k, v in mapping.state_dict().items() if k != "w_avg_count"}
    fresh = MappingNetwork(8, 8, 2)
    fresh.load_state_dict(old)
    torch.testing.assert_close(fresh.w_avg, mapping.w_avg)


def test_mean_truncation_uses_the_clusters_w_mean_when_present(tmp_path):
    from sdsg_ray.artifacts.checkpoint import export_inference, load_inference
    from sdsg_ray.config import ModelConfig
    from sdsg_ray.models.networks import build_generator
    from sdsg_ray.artifacts.clusters import ClusterFile, ClusterSet
    from sdsg_ray.truncation.clusters import fit_centers, map_latents
    from sdsg_ray.truncation.sampler import Sampler

    model = ModelConfig(resolution=16, channel_max=32, z_dim=32, w_dim=32)
    G = build_generator(model)
    uri = str(tmp_path / "g.pt")
    export_inference(G, None, model, {}, uri, get_storage())
    bundle = load_inference(uri)
    w = map_latents(bundle.G_ema.mapping, 32, 256, seed=0)
    centers, sizes = fit_centers(w, 4, seed=0)
    cs = ClusterSet(centers=centers, sizes=sizes, seed=0, metric="lpips-alex", checkpoint=bundle.identity,
                    w_mean=w.mean(0))
    ClusterFile(str(tmp_path / "c")).write(cs, get_storage())
    loaded = ClusterFile(str(tmp_path / "c")).read(get_storage())
    torch.testing.assert_close(loaded.w_mean, w.mean(0))
    assert bundle.w_avg.abs().sum() == 0  # an untrained G never updated its w_avg
    sampler = Sampler(bundle, clusters=loaded, assign_by="w")
    torch.testing.assert_close(sampler.w_avg, w.mean(0))
