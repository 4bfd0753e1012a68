"""Evaluation: the distances are clean-fid's and behave like distances, the outlier metrics count what
they claim, the report shows the numbers it was given, and run_evaluation works end to end on a real
(small, randomly initialised: this checks plumbing, not quality) generator with offline features."""

from __future__ import annotations

import json
import re

import numpy as np
import pyarrow as pa
import pytest

from sdsg_ray.artifacts.scores import SCORE_COLUMN
from sdsg_ray.diagnostics import outlier_detection
from sdsg_ray.distances import distances
from sdsg_ray.pretrained import distance_labels
from sdsg_ray.evaluation.report import write_report
from sdsg_ray.storage import get_storage, join


def gaussian(n: int, dim: int, shift: float, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(shift, 1.0, size=(n, dim))


def test_frechet_distance_matches_the_closed_form_for_shifted_gaussians():
    dim, n = 8, 20000
    a, b = gaussian(n, dim, 0.0, 0), gaussian(n, dim, 0.5, 1)
    got = distances(a, b)
    # Equal (identity) covariances: FD = |mu_a - mu_b|^2 = dim * 0.25, up to sampling noise.
    assert got.fd == pytest.approx(dim * 0.25, rel=0.05)
    same = distances(a, gaussian(n, dim, 0.0, 2))
    assert same.fd < 0.02 and abs(same.kd) < 0.01
    assert got.kd > 10 * abs(same.kd)


def test_distances_grow_with_the_shift_and_kid_is_reproducible():
    ref = gaussian(500, 16, 0.0, 0)
    near, far = distances(gaussian(500, 16, 0.2, 1), ref), distances(gaussian(500, 16, 1.0, 2), ref)
    assert near.fd < far.fd and near.kd < far.kd
    assert distances(gaussian(500, 16, 0.2, 1), ref) == near  # KID's subsets are seeded


def test_bad_feature_sets_are_refused():
    with pytest.raises(ValueError, match="at least 2"):
        distances(np.zeros((1, 4)), np.zeros((5, 4)))
    with pytest.raises(AssertionError):
        distances(np.zeros((5, 4)), np.zeros((5, 3)))


def test_only_inception_features_are_called_fid():
    assert distance_labels("inception", True) == ("FID", "KID")
    assert distance_labels("stlpips-alex-pool", False) == ("FD (stlpips-alex-pool)", "KD (stlpips-alex-pool)")


def write_scores(storage, out: str, rows: list[tuple[str, str, float]]) -> None:
    from sdsg_ray.artifacts.scores import SCORE_SCHEMA, ScoreSet
    from sdsg_ray.manifest import write_parquet_stream

    n = len(rows)
    batch = pa.record_batch({
        "key": [r[0] for r in rows], "status": [r[1] for r in rows], "error": ["" for _ in rows],
        SCORE_COLUMN: pa.array([r[2] for r in rows], pa.float32()), "d_l1": pa.array([0.0] * n, pa.float32()),
        "feat_real": pa.array([[0.0]] * n, pa.list_(pa.float32())),
        "feat_recon": pa.array([[0.0]] * n, pa.list_(pa.float32())),
    }, schema=SCORE_SCHEMA)
    write_parquet_stream([batch], SCORE_SCHEMA, ScoreSet(out).shard(0), storage)


def test_outlier_detection_counts_removed_images_against_planted_labels(tmp_path):
    from sdsg_ray.manifest import write_manifest

    storage = get_storage()
    data, scores = str(tmp_path / "data"), str(tmp_path / "scores")
    # 6 inliers, 3 outliers, one unreadable file; the selection keeps d < 0.5.
    d = {"in0": 0.1, "in1": 0.2, "in2": 0.3, "in3": 0.4, "in4": 0.6, "in5": 0.7, "out0": 0.8, "out1": 0.9, "out2": 0.45}
    rows = [(join(data, f"{name}.png"), "ok", v) for name, v in d.items()] + [(join(data, "bad.png"), "error", np.nan)]
    write_scores(storage, scores, rows)
    kept = str(tmp_path / "sel" / "kept.parquet")
    write_manifest([join(data, f"{k}.png") for k, v in d.items() if v < 0.5], kept, storage)
    labels = tmp_path / "labels.csv"
    kind = {"out0": "text", "out1": "text", "out2": "noise"}
    labels.write_text("key,is_outlier,kind,mode\n" + "".join(
        f"{join(data, k + '.png')},{int(k.startswith('out'))},{kind.get(k, 'inlier')},\n" for k in list(d) + ["bad"]))
    got = outlier_detection(scores, kept, str(labels), storage)
    # removed: in4, in5, out0, out1 -> 2 true positives of 4 removed; 2 of 3 outliers found.
    assert (got["images"], got["outliers"], got["removed"], got["true_positives"]) == (9, 3, 4, 2)
    assert got["precision"] == pytest.approx(0.5) and got["recall"] == pytest.approx(2 / 3)
    # AUROC of d: outliers 0.8, 0.9, 0.45 vs the 6 inliers; pairs won: 6 + 6 + 4 of 18.
    assert got["auroc"] == pytest.approx(16 / 18)
    # Per kind, against all six inliers: text (0.8, 0.9) wins 12 of 12 pairs, noise (0.45) 4 of 6.
    assert got["auroc_by_kind"] == {"noise": pytest.approx(4 / 6), "text": pytest.approx(1.0)}
    assert got["outlier_fraction_kept"] == pytest.approx(1 / 5)
    # Hand-made labels with only key and is_outlier: the same figures, no per-kind table.
    labels.write_text("key,is_outlier\n" + "".join(f"{join(data, k + '.png')},{int(k.startswith('out'))}\n" for k in d))
    plain = outlier_detection(scores, kept, str(labels), storage)
    assert plain["auroc_by_kind"] == {} and plain["auroc"] == pytest.approx(16 / 18)


def test_report_shows_the_numbers_and_names_the_features(tmp_path):
    storage = get_storage()
    root = str(tmp_path / "run")
    from sdsg_ray.imaging import encode_png

    png_bytes = encode_png(np.zeros((4, 4, 3), np.uint8))
    for name in ("fid_vs_psi.png", "truncation_grid.png"):
        storage.write_bytes(join(root, "eval", name), png_bytes)
    results = {
        "features": {"name": "stlpips-alex-pool", "dim": 10, "is_inception": False},
        "labels": {"fd": "FD (stlpips-alex-pool)", "kd": "KD (stlpips-alex-pool)"},
        "models": [{"model": "filtered", "train_size": 70, "kimg": 2, "fd_vs_train": 12.345, "fd_vs_raw": 23.456,
                    "kd_vs_train": 0.01, "kd_vs_raw": 0.02}],
        "truncation": {"psis": [0.5, 1.0], "mean": {"fd": [40.5, 30.5]}, "multimodal": {"fd": [35.25, 30.5]},
                       "reference": "kept.parquet"},
        "figures": {"fid_vs_psi": "fid_vs_psi.png", "truncation_grid": "truncation_grid.png"},
        "outliers": {"images": 9, "outliers": 3, "removed": 4, "true_positives": 2, "precision": 0.5,
                     "recall": 0.6667, "auroc": 0.9444, "auroc_by_kind": {"collage": 0.9876},
                     "outlier_fraction_raw": 0.33, "outlier_fraction_kept": 0.2},
    }
    storage.write_text(join(root, "eval", "results.json"), json.dumps(results))
    storage.write_text(join(root, "pipeline.json"), json.dumps({
        "stages": [{"name": "stage1", "status": "ran", "seconds": 61.5, "outputs": []}],
        "layout": {"eval": join(root, "eval")}}))
    page = (tmp_path / "run" / "report" / "index.html")
    assert write_report(root, storage=storage) == str(page)
    html = page.read_text()
    for expected in ("12.35", "23.46", "35.25", "0.9444", "collage", "0.9876", "61.5", "FD (stlpips-alex-pool)",
                     "not FID", "data:image/png;base64,"):
        assert expected in html, expected
    assert ">FID<" not in html


def test_fig7_adds_the_learned_assignment_beside_the_lpips_one(monkeypatch):
    """With a sampler offering the learned rule, Fig. 7 gets a third curve drawn with the centers that rule
    picks (pinned per seed), and says how often it agrees with the paper's LPIPS rule."""
    import torch

    from sdsg_ray.distances import Distances
    from sdsg_ray.evaluation import truncation_curves

    learned = "multimodal_learned"  # results.json's key of the learned-assignment curve

    class Rule:
        def __init__(self, shift: int) -> None:
            self.shift = shift

        def assign(self, w):
            return (w[:, 0].long() + self.shift) % 3

    class FakeSampler:
        batch_size, assign_by = 4, "lpips"
        assigners = {"lpips": Rule(0), "learned": Rule(0), "w": Rule(2)}
        assigner, assignments = assigners["lpips"], ("lpips", "learned", "w")

        def latents(self, seeds):
            return torch.tensor([[float(s)] for s in seeds])

        def render_specs(self, specs):  # the image holds its target: the pinned center, or 9 for the mean
            return np.stack([np.full((2, 2, 3), 9 if s.mode == "mean" else s.cluster, np.uint8) for s in specs])

    class Bank:
        def images(self, images):
            return images.reshape(len(images), -1)[:, :1].astype(np.float64)

    monkeypatch.setattr(truncation_curves, "distances", lambda feats, ref: Distances(float(feats.mean()), 0.0))
    seeds = list(range(9))
    sampler = FakeSampler()
    curve = truncation_curves.truncation_curve(sampler, Bank(), np.zeros((2, 1)), seeds, [0.5])
    lpips_mean = np.mean([s % 3 for s in seeds])
    assert curve["multimodal"]["fd"] == [lpips_mean] and curve["mean"]["fd"] == [9.0]
    assert curve[learned]["fd"] == [lpips_mean]
    assert curve[learned]["same_center_as_lpips"] == 1.0
    sampler.assigners = {**FakeSampler.assigners, "learned": Rule(1)}  # a learned rule that always disagrees
    curve = truncation_curves.truncation_curve(sampler, Bank(), np.zeros((2, 1)), seeds, [0.5])
    assert curve[learned]["fd"] == [np.mean([(s + 1) % 3 for s in seeds])]
    assert curve[learned]["same_center_as_lpips"] == 0.0
    sampler.assignments = ("lpips", "w")  # no classifier: no third curve
    assert learned not in truncation_curves.truncation_curve(sampler, Bank(), np.zeros((2, 1)), seeds, [0.5])


def test_report_puts_controls_beside_claims(tmp_path):
    """Table 3 holds only with an interval below zero (a lower FD alone is not enough); the outlier AUROC
    is shown beside the untrained network and the trivial detectors, and judged against them."""
    storage = get_storage()
    root = str(tmp_path / "run")
    row = {"train_size": 70, "kimg": 2, "fd_vs_raw": 1.0, "kd_vs_train": 0.01, "kd_vs_raw": 0.02}
    trivial = {"png_size": {"auroc": 0.31, "separation": 0.69, "auroc_by_kind": {"poster": 0.0412}}}
    results = {
        "features": {"name": "net", "dim": 10, "is_inception": False},
        "labels": {"fd": "FD (net)", "kd": "KD (net)"},
        "models": [{"model": "filtered", "fd_vs_train": 5.0, **row}, {"model": "random", "fd_vs_train": 6.0, **row}],
        "table_claims": {"random": {"mean": -0.002, "low": -0.009, "high": 0.005, "n": 5, "holds": False,
                                    "interval": "t-interval over 5 disjoint sample blocks"}},
        "truncation": {"psis": [1.0], "mean": {"fd": [5.0]}, "reference": "kept.parquet"},
        "figures": {"fid_vs_psi": "fid_vs_psi.png", "truncation_grid": "truncation_grid.png"},
        "outliers": {"images": 9, "outliers": 3, "removed": 4, "true_positives": 2, "precision": 0.5,
                     "recall": 0.6667, "auroc": 0.93, "auroc_by_kind": {"poster": 0.95},
                     "outlier_fraction_raw": 0.33, "outlier_fraction_kept": 0.2,
                     "precision_random": 0.33, "recall_random": 0.44,
                     "controls": {"untrained": {"auroc": 0.7777, "auroc_by_kind": {"poster": 0.6543}},
                                  "trivial": trivial, "images": 9}},
    }
    storage.write_text(join(root, "eval", "results.json"), json.dumps(results))
    storage.write_text(join(root, "pipeline.json"), json.dumps({"stages": [], "layout": {"eval": join(root, "eval")}}))
    html = open(write_report(root, storage=storage)).read()
    claims = {cells[0]: cells[-1] for cells in
              (re.findall(r"<td>(.*?)</td>", r) for r in re.findall(r"<tr>(.*?)</tr>", html)) if cells}
    assert claims["Table 3: ... and beats a random subset of the same size"] == "no"  # FD lower, interval spans 0
    assert "[-0.009, 0.005]" in html
    untrained = next(v for k, v in claims.items() if k.startswith("... because training taught it"))
    assert untrained == "no"  # 0.93 < 0.7777 + 0.25
    statistics = next(v for k, v in claims.items() if k.startswith("... and not because of image statistics"))
    assert statistics == "yes"  # best trivial 0.69 <= 0.70 and below d(x)
    for expected in ("untrained network (control)", "0.6543", "trivial: png_size (control)", "0.0412"):
        assert expected in html, expected
