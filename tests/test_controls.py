"""Controls for the outlier claim: trivial detectors must not separate the demo's outliers, and the
check that says so must be able to fail."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdsg_ray.dataset.synthetic import OUTLIER_KINDS, plan, render
from sdsg_ray.diagnostics import (
    TRIVIAL_DETECTORS, auroc_report, trivial_report, untrained_networks, untrained_scores,
)

TRIVIAL_MAX_SEPARATION = 0.70  # issue 15: every trivial detector <= 0.70 overall on the demo dataset


def _demo_images(n: int = 400, seed: int = 0):
    items = plan(n, 0.15, seed)
    images = np.stack([render(item, 32, seed) for item in items])
    return images, np.array([i.is_outlier for i in items]), np.array([i.kind for i in items])


def _separating(report: dict) -> dict:
    return {name: r["separation"] for name, r in report.items() if r["separation"] > TRIVIAL_MAX_SEPARATION}


@pytest.fixture(scope="module")
def demo_images():
    return _demo_images()


def test_trivial_detectors_do_not_separate_demo_outliers(demo_images):
    images, y, kinds = demo_images
    report = trivial_report(images, y, kinds)
    assert set(report) == set(TRIVIAL_DETECTORS)
    assert all(set(r["auroc_by_kind"]) == set(OUTLIER_KINDS) for r in report.values())
    assert _separating(report) == {}, report


def test_trivial_detector_check_fails_on_noise_outliers(demo_images):
    """The same check on the same inliers with pixel-noise outliers: it must flag them."""
    images, y, kinds = demo_images
    noisy = images.copy()
    noisy[y] = np.random.default_rng(0).integers(0, 256, size=noisy[y].shape, dtype=np.uint8)
    flagged = _separating(trivial_report(noisy, y, kinds))
    assert {"png_size", "gradient_energy"} <= set(flagged), flagged


def test_auroc_report_overall_and_per_kind():
    y = np.array([0, 0, 0, 1, 1, 1], bool)
    kinds = np.array(["inlier"] * 3 + ["a", "a", "b"])
    score = np.array([0.1, 0.5, 0.3, 0.9, 0.2, 0.4])
    got = auroc_report(y, score, kinds)
    # brute force: share of (outlier, inlier) pairs ranked the right way
    pairs = lambda pos: np.mean([float(p > n) for p in pos for n in score[:3]])  # noqa: E731
    assert got["auroc"] == pytest.approx(pairs(score[3:]))
    assert got["auroc_by_kind"] == {"a": pytest.approx(pairs(score[3:5])), "b": pytest.approx(pairs(score[5:]))}


def test_untrained_control_is_stage1_initialisation():
    """The control uses the weights stage 1 starts from (same seed -> same (G, E)), and scores with them."""
    from sdsg_ray.config import build_config

    config = build_config(("set", {"model.resolution": 16, "model.channel_base": 256, "model.channel_max": 16,
                                   "model.z_dim": 16, "model.w_dim": 16, "model.mapping_layers": 1}))
    G1, E1 = untrained_networks(config.model, seed=3)
    G2, E2 = untrained_networks(config.model, seed=3)
    G3, _ = untrained_networks(config.model, seed=4)
    p1, p2, p3 = (torch.cat([p.flatten() for p in g.parameters()]) for g in (G1, G2, G3))
    assert torch.equal(p1, p2) and not torch.equal(p1, p3)
    images = np.random.default_rng(0).integers(0, 256, size=(5, 16, 16, 3), dtype=np.uint8)
    l1 = lambda x, y: (x - y).abs().mean(dim=(1, 2, 3))  # noqa: E731
    d = untrained_scores(config.model, 3, images, l1, batch_size=2)
    assert d.shape == (5,) and np.all(d > 0) and np.all(np.isfinite(d))


def test_unbiased_kid_matches_brute_force_and_clean_fid():
    from cleanfid.fid import kernel_distance

    from sdsg_ray.distances import unbiased_mmd2

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(12, 5)), rng.normal(0.5, 1.0, size=(10, 5))
    k = lambda x, y: (x @ y / 5 + 1) ** 3  # noqa: E731
    within = lambda s: sum(k(s[i], s[j]) for i in range(len(s)) for j in range(len(s)) if i != j) / (len(s) * (len(s) - 1))  # noqa: E731
    brute = within(a) + within(b) - 2 * np.mean([k(x, y) for x in a for y in b])
    assert unbiased_mmd2(a, b) == pytest.approx(brute, rel=1e-9)
    # clean-fid on one subset of all images (same sizes: the subset is a permutation) gives the same value
    c = rng.normal(0.5, 1.0, size=(12, 5))
    np.random.seed(0)
    assert unbiased_mmd2(a, c) == pytest.approx(kernel_distance(a, c, num_subsets=1, max_subset_size=12), rel=1e-9)
    # unbiased: two samples of one distribution average ~0 (a biased estimator stays > 0)
    same = [unbiased_mmd2(rng.normal(size=(20, 5)), rng.normal(size=(20, 5))) for _ in range(40)]
    assert abs(np.mean(same)) < 3 * np.std(same) / np.sqrt(len(same))


def test_claim_holds_only_when_the_interval_excludes_zero():
    from sdsg_ray.distances import compare_blocks

    clear = compare_blocks([1.0, 1.1, 0.9, 1.0, 1.05], [2.0, 2.1, 1.9, 2.05, 2.0])
    assert clear["holds"] and clear["high"] < 0 and clear["mean"] == pytest.approx(-1.0)
    noisy = compare_blocks([1.0, 3.0, 0.5, 2.5, 1.0], [2.0, 1.0, 2.0, 1.0, 2.5])  # mean lower, interval spans 0
    assert noisy["mean"] < 0 and noisy["low"] < 0 < noisy["high"] and not noisy["holds"]
    assert not compare_blocks([1.0], [2.0])["holds"]  # one block: no interval, no claim


def test_outlier_controls_rebuild_the_scoring_checkpoints_initialisation(tmp_path):
    """evaluate's controls read the scores' checkpoint and metric, rebuild stage 1's seeded initialisation
    and score the same images with it (not the trained weights)."""
    import json

    from sdsg_ray.artifacts.checkpoint import export_inference
    from sdsg_ray.config import build_config
    from sdsg_ray.diagnostics import outlier_controls
    from sdsg_ray.imaging import encode_png
    from sdsg_ray.pretrained import build_metric
    from sdsg_ray.storage import get_storage, join

    storage = get_storage()
    config = build_config(("set", {"model.resolution": 32, "model.channel_base": 256, "model.channel_max": 16,
                                   "model.z_dim": 16, "model.w_dim": 16, "model.mapping_layers": 1}))
    torch.manual_seed(123)  # "trained" weights: anything but the seed-7 initialisation
    G, E = untrained_networks(config.model, seed=123)
    ckpt = str(tmp_path / "stage1" / "inference.pt")
    export_inference(G, E, config.model, {"stage": "joint", "seed": 7}, ckpt, storage)
    scores = str(tmp_path / "scores")
    storage.write_text(join(scores, "summary.json"), json.dumps({"checkpoint": ckpt, "metric": "stlpips-alex"}))
    images, y, kinds = _demo_images(40)
    keys = [str(tmp_path / "img" / f"{i}.png") for i in range(len(images))]
    for key, img in zip(keys, images):
        storage.write_bytes(key, encode_png(img))
    got = outlier_controls(keys, y, kinds, scores, storage, "cpu", 16)
    metric = build_metric("stlpips-alex")
    expected = auroc_report(y, untrained_scores(config.model, 7, images, metric, batch_size=16), kinds)
    assert got["untrained"]["seed"] == 7 and got["images"] == 40
    assert got["untrained"]["auroc"] == pytest.approx(expected["auroc"])
    trained = auroc_report(y, untrained_scores(config.model, 123, images, metric, batch_size=16), kinds)["auroc"]
    assert trained != pytest.approx(expected["auroc"])  # the control is not the checkpoint's own weights
    assert set(got["trivial"]) == set(TRIVIAL_DETECTORS)
