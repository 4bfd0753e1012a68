"""Threshold selection: sufficient-statistics FD is exact, the paper's rule stops at the right bound, and
run_selection writes a usable kept manifest, the report and the figures. Pure maths over parquet: no Ray."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from sdsg_ray.config import load_config
from sdsg_ray.distances import DistanceToReference, frechet_distance
from sdsg_ray.filtering.selection import BinnedMoments, CurvePoint, apply_rule, mean_cov, threshold_grid
from sdsg_ray.artifacts.scores import SCORE_COLUMN, ScoreSet, ShardAssembler
from sdsg_ray.artifacts.selection import EXAMPLE_SCORE_KEY
from sdsg_ray.filtering.select import run_selection
from sdsg_ray.storage import get_storage, join


def direct_fd(kept: np.ndarray, raw: np.ndarray) -> float:
    """clean-fid's own recipe on the rows themselves."""
    return frechet_distance(kept.mean(0), np.cov(kept, rowvar=False), raw.mean(0), np.cov(raw, rowvar=False))


def test_threshold_grid_ends_on_target() -> None:
    grid = threshold_grid(0.5, 0.36, 0.05)
    np.testing.assert_allclose(grid, [0.5, 0.45, 0.40, 0.36])
    assert threshold_grid(0.36, 0.36, 0.01).tolist() == [0.36]
    with pytest.raises(ValueError, match="below the target"):
        threshold_grid(0.3, 0.36, 0.01)


def test_sufficient_statistics_fd_equals_direct_fd() -> None:
    rng = np.random.default_rng(0)
    n, dim = 3000, 24
    scores = rng.uniform(0.2, 0.7, n)
    # Inception-like magnitudes (non-negative, mean ~0.4), correlated with the score so FD changes with θ.
    feats = np.abs(rng.normal(0.4, 0.3, (n, dim)) + np.outer(scores, rng.normal(0, 1, dim))).astype(np.float32)
    grid = threshold_grid(float(scores.max()), 0.3, 0.02)
    binned = BinnedMoments(grid, dim)
    for start in range(0, n, 512):  # streamed in batches, as over parquet row groups
        binned.add(scores[start : start + 512], feats[start : start + 512])
    raw = feats.astype(np.float64)
    mu_x, sigma_x = raw.mean(0), np.cov(raw, rowvar=False)
    checked = 0
    for theta, size, total, outer in binned.cumulative():
        kept = raw[scores <= theta]
        assert size == len(kept)
        mu, sigma = mean_cov(size, total, outer)
        np.testing.assert_allclose(mu, kept.mean(0), rtol=1e-9)
        np.testing.assert_allclose(sigma, np.cov(kept, rowvar=False), rtol=1e-7, atol=1e-10)
        fd = frechet_distance(mu, sigma, mu_x, sigma_x)
        assert fd == pytest.approx(direct_fd(kept, raw), rel=1e-6, abs=1e-9)
        checked += 1
    assert checked == len(grid) > 10


@pytest.mark.parametrize("n_kept", [40, 400])  # fewer kept rows than dimensions: a singular Σ_Y
def test_distance_to_reference_equals_clean_fid(n_kept: int) -> None:
    rng = np.random.default_rng(1)
    dim = 64
    mixing = rng.normal(0, 1, (dim, dim)) / np.sqrt(dim)
    raw = np.abs(rng.normal(0.4, 0.3, (600, dim)) @ mixing)
    kept = raw[np.argsort(raw[:, 0])[:n_kept]]  # a biased subset, so the distance is far from 0
    mu_x, sigma_x = raw.mean(0), np.cov(raw, rowvar=False)
    fast = DistanceToReference(mu_x, sigma_x)(kept.mean(0), np.cov(kept, rowvar=False))
    assert fast == pytest.approx(direct_fd(kept, raw), rel=1e-6)
    assert fast > 0.05  # far from 0, so the relative comparison means something


def _curve(sizes, distances, thetas=None) -> list[CurvePoint]:
    thetas = thetas or [0.6 - 0.05 * i for i in range(len(sizes))]
    return [CurvePoint(t, s, d) for t, s, d in zip(thetas, sizes, distances)]


@pytest.mark.parametrize(
    "sizes, distances, min_size, expected_index, expected_bound",
    [
        ([100, 90, 80, 70], [0.0, 1.0, 2.0, 3.0], 10, 3, "target"),  # both bounds hold to the end
        ([100, 90, 80, 70], [0.0, 1.0, 6.0, 3.0], 10, 1, "diversity"),  # FD crosses 5 at the third θ
        ([100, 90, 80, 70], [0.0, 1.0, 2.0, 3.0], 85, 1, "size"),  # |Y| drops below 85 at the third θ
        ([100, 90, 80, 70], [0.0, 1.0, 2.0, 3.0], 200, 0, "size"),  # the raw set is already too small
    ],
)
def test_rule_stops_at_the_first_violated_bound(sizes, distances, min_size, expected_index, expected_bound) -> None:
    curve = _curve(sizes, distances)
    sel = apply_rule(curve, upper_bound=5.0, min_size=min_size)
    assert sel.bound == expected_bound
    assert sel.theta == curve[expected_index].theta and sel.size == sizes[expected_index]


def write_fake_scores(out: str, n_in: int, n_out: int, dim: int, recon_shrink: float, seed: int = 0) -> dict:
    """Score shards as run_scoring writes them: inliers score low and share one feature distribution,
    outliers score high and sit elsewhere in feature space, plus two unreadable images. The
    reconstructions' features are the real ones shrunk toward 0 by `recon_shrink` (mode collapse), which
    sets the diversity bound FD(G(E(X)), X)."""
    storage = get_storage()
    rng = np.random.default_rng(seed)
    n = n_in + n_out
    d = np.concatenate([rng.uniform(0.2, 0.4, n_in), rng.uniform(0.5, 0.8, n_out)]).astype(np.float32)
    feat = np.concatenate([rng.normal(0, 1, (n_in, dim)), rng.normal(3, 1, (n_out, dim))]).astype(np.float32)
    recon = (feat * (1 - recon_shrink) + rng.normal(0, 0.05, feat.shape)).astype(np.float32)
    keys = np.array([f"s3://b/img/{i:05d}.png" for i in range(n)] + ["s3://b/img/bad-0.jpg", "s3://b/img/bad-1.jpg"], object)
    status = np.array(["ok"] * n + ["error"] * 2, object)
    nan = np.full((2, dim), np.nan, np.float32)
    batch = {
        "key": keys,
        "shard": np.arange(len(keys)) % 3,
        "status": status,
        "error": np.array([""] * n + ["corrupt"] * 2, object),
        SCORE_COLUMN: np.concatenate([d, [np.nan, np.nan]]).astype(np.float32),
        "d_l1": np.concatenate([d / 2, [np.nan, np.nan]]).astype(np.float32),
        "feat_real": np.concatenate([feat, nan]),
        "feat_recon": np.concatenate([recon, nan]),
    }
    expected = {s: int((batch["shard"] == s).sum()) for s in range(3)}
    assert ShardAssembler(ScoreSet(out), storage, expected).add(batch) == [0, 1, 2]
    summary = {"metric": "stlpips-alex", "features": "stlpips-alex-pool", "features_is_inception": False, "checkpoint": join(out, "missing.pt")}
    storage.write_text(ScoreSet(out).summary, json.dumps(summary))
    return {"d": d, "feat": feat, "keys": keys[:n]}


def select(tmp_path, recon_shrink: float, min_size: int, target: float = 0.3) -> tuple[dict, dict]:
    scores, out = str(tmp_path / "scores"), str(tmp_path / "selection")
    fake = write_fake_scores(scores, n_in=300, n_out=60, dim=8, recon_shrink=recon_shrink)
    overrides = {
        "select.scores": scores, "select.out": out, "select.target_threshold": target,
        "select.threshold_step": 0.01, "select.min_size": min_size,
    }
    return run_selection(load_config(None, overrides)), fake


def test_run_selection_reaches_target_and_writes_outputs(tmp_path) -> None:
    # Collapsed reconstructions (features shrunk 10x) make the diversity bound loose: θ reaches the target.
    report, fake = select(tmp_path, recon_shrink=0.9, min_size=50)
    assert report["bound"] == "target" and report["theta"] == pytest.approx(0.3)
    assert report["size_raw"] == 360 and report["failed"] == 2
    assert report["distance_name"] == "FD (stlpips-alex-pool)"  # never called FID on non-Inception features
    assert report["distance_kept_vs_raw"] <= report["distance_recon_vs_raw"]
    out = str(tmp_path / "selection")
    kept = pq.read_table(join(out, "kept.parquet")).to_pydict()
    expected = sorted(k for k, d in zip(fake["keys"], fake["d"]) if d <= report["theta"])
    assert sorted(kept["key"]) == expected and len(expected) == report["size_kept"]
    assert not any(k.endswith((".jpg",)) for k in kept["key"])  # unreadable images are never kept
    # The reported distance is the FD of exactly the kept rows' features.
    kept_mask = fake["d"] <= report["theta"]
    raw = fake["feat"].astype(np.float64)
    assert report["distance_kept_vs_raw"] == pytest.approx(direct_fd(raw[kept_mask], raw), rel=1e-6)
    curve = report["curve"]
    assert curve[0]["size"] == 360 and curve[0]["distance"] == pytest.approx(0.0, abs=1e-6)
    assert curve[-1]["theta"] == pytest.approx(0.3)
    assert [p["size"] for p in curve] == sorted((p["size"] for p in curve), reverse=True)
    for name in ("histogram.png", "fid_vs_threshold.png"):
        assert (tmp_path / "selection" / name).read_bytes()[:4] == b"\x89PNG"
    assert report["best_worst"].startswith("skipped")  # the fake summary names a missing checkpoint
    assert report["best"][0][EXAMPLE_SCORE_KEY] == pytest.approx(float(fake["d"].min()))
    assert report["worst"][0][EXAMPLE_SCORE_KEY] == pytest.approx(float(fake["d"].max()))


def test_scores_that_name_no_checkpoint_still_select(tmp_path) -> None:
    # Score shards written by hand or by bench/bench_scale.py carry "checkpoint": null; the figure that needs
    # G and E is skipped with a reason, and the selection itself does not need them.
    scores = tmp_path / "scores"
    write_fake_scores(str(scores), n_in=300, n_out=60, dim=8, recon_shrink=0.9)
    summary = json.loads((scores / ScoreSet.summary.name).read_text())
    (scores / ScoreSet.summary.name).write_text(json.dumps({**summary, "checkpoint": None}))
    report = run_selection(load_config(None, {"select.scores": str(scores), "select.out": str(tmp_path / "sel"),
                                              "select.target_threshold": 0.3, "select.min_size": 50}))
    assert report["size_kept"] > 0 and report["best_worst"] == "skipped: checkpoint None unavailable"


def test_diversity_bound_stops_selection(tmp_path) -> None:
    # Faithful reconstructions give a tight bound: removing the outlier mode moves Y too far from X.
    report, _ = select(tmp_path, recon_shrink=0.02, min_size=50)
    assert report["bound"] == "diversity"
    assert report["distance_kept_vs_raw"] <= report["distance_recon_vs_raw"]
    nxt = [p for p in report["curve"] if p["theta"] < report["theta"]][0]
    assert nxt["distance"] > report["distance_recon_vs_raw"]  # the next θ would have broken the bound


def test_size_bound_stops_selection(tmp_path) -> None:
    report, _ = select(tmp_path, recon_shrink=0.9, min_size=330)
    assert report["bound"] == "size"
    assert report["size_kept"] >= 330
    nxt = [p for p in report["curve"] if p["theta"] < report["theta"]][0]
    assert nxt["size"] < 330  # the very next θ on the grid would have broken the floor


def test_selection_report_gives_outlier_precision_recall_beside_random(tmp_path) -> None:
    """With planted labels, report.json says how many outliers the selection removed, beside chance."""
    scores, out = str(tmp_path / "scores"), str(tmp_path / "selection")
    fake = write_fake_scores(scores, n_in=300, n_out=60, dim=8, recon_shrink=0.9)
    labels = tmp_path / "labels.csv"
    labels.write_text("key,is_outlier,kind,mode\n" + "".join(
        f"{k},{int(i >= 300)},{'poster' if i >= 300 else 'inlier'},\n" for i, k in enumerate(fake["keys"])))
    report = run_selection(load_config(None, {
        "select.scores": scores, "select.out": out, "select.target_threshold": 0.3, "select.threshold_step": 0.01,
        "select.min_size": 50, "select.labels": str(labels)}))
    outliers = report["outliers"]
    removed = fake["d"] > report["theta"]
    is_out = np.arange(360) >= 300
    assert outliers["removed"] == int(removed.sum()) and outliers["outliers"] == 60
    assert outliers["recall"] == pytest.approx((removed & is_out).sum() / 60) and outliers["recall"] == 1.0
    assert outliers["precision"] == pytest.approx((removed & is_out).sum() / removed.sum())
    assert outliers["precision_random"] == pytest.approx(60 / 360) and 60 / 360 < outliers["precision"]
    assert json.loads((tmp_path / "selection" / "report.json").read_text())["outliers"]["auroc"] == 1.0
