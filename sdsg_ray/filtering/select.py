"""`sdsg select`: three streaming passes over the score shards (:func:`overview`, :func:`feature_pass`,
:func:`kept_batches`), the rule (maths: selection.py), and the selection's outputs, a
:class:`~sdsg_ray.artifacts.selection.FilteredSet` with the curation page (curation_page.py).

Memory is one batch of rows plus the per-bin statistics, whatever the number of images.
"""

from __future__ import annotations

import heapq
import logging
import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from sdsg_ray import figures
from sdsg_ray.artifacts.checkpoint import CheckpointError, InferenceBundle, load_inference
from sdsg_ray.artifacts.scores import SCORE_COLUMN, ScoreSet
from sdsg_ray.artifacts.selection import EXAMPLE_SCORE_KEY, FilteredSet
from sdsg_ray.config import SDSGConfig, SelectConfig
from sdsg_ray.diagnostics import outlier_detection
from sdsg_ray.distances import DistanceToReference, frechet_distance
from sdsg_ray.errors import InvalidRequest
from sdsg_ray.filtering.curation_page import write_curation_page
from sdsg_ray.filtering.scorer import reconstruct_keys
from sdsg_ray.filtering.selection import (BinnedMoments, CurvePoint, Moments, Selection, apply_rule, mean_cov,
                                          threshold_grid)
from sdsg_ray.manifest import write_parquet_stream
from sdsg_ray.pretrained import distance_labels
from sdsg_ray.storage import Storage, get_storage

log = logging.getLogger(__name__)


@dataclass
class ScoreOverview:
    """Pass 1 (scores only, no features): range, counts, and the best/worst keys for the figure."""

    ok: int
    failed: int
    lo: float
    hi: float
    best: list[tuple[float, str]]  # ascending d
    worst: list[tuple[float, str]]  # descending d


def overview(scores: ScoreSet, storage: Storage, examples: int) -> ScoreOverview:
    ok = failed = 0
    lo, hi = math.inf, -math.inf
    best: list[tuple[float, str]] = []  # max-heap of (-d, key): the `examples` smallest
    worst: list[tuple[float, str]] = []  # min-heap of (d, key): the `examples` largest
    for batch in scores.iter_batches(storage, ["key", "status", SCORE_COLUMN]):
        good = batch["status"] == "ok"
        failed += int((~good).sum())
        d = batch[SCORE_COLUMN][good].astype(np.float64)
        keys = batch["key"][good]
        ok += len(d)
        if not len(d):
            continue
        lo, hi = min(lo, float(d.min())), max(hi, float(d.max()))
        for heap, sign in ((best, -1), (worst, 1)):
            for i in np.argsort(-sign * d)[:examples]:
                heapq.heappush(heap, (sign * d[i], keys[i]))
                if len(heap) > examples:
                    heapq.heappop(heap)
    if ok < 2:
        raise InvalidRequest(f"{scores.uri}: only {ok} images were scored successfully; selection needs at least 2")
    return ScoreOverview(ok=ok, failed=failed, lo=lo, hi=hi, best=sorted((-nd, k) for nd, k in best),
                         worst=sorted(worst, reverse=True))


@dataclass
class FeaturePass:
    """Pass 2: moments of X, of G(E(X)), per-θ-bin moments of X, and the score histogram."""

    real: Moments
    recon: Moments
    binned: BinnedMoments
    hist_counts: np.ndarray
    hist_edges: np.ndarray


def feature_pass(scores: ScoreSet, storage: Storage, grid: np.ndarray, lo: float, hi: float) -> FeaturePass:
    hist_edges = np.linspace(lo, hi if hi > lo else lo + 1e-6, 101)
    hist_counts = np.zeros(100, np.int64)
    state: FeaturePass | None = None
    for batch in scores.iter_batches(storage, ["status", SCORE_COLUMN, "feat_real", "feat_recon"]):
        good = batch["status"] == "ok"
        if not good.any():
            continue
        d = batch[SCORE_COLUMN][good].astype(np.float64)
        real = np.stack(batch["feat_real"][good])
        recon = np.stack(batch["feat_recon"][good])
        if state is None:
            dim = real.shape[1]
            state = FeaturePass(Moments(dim), Moments(dim), BinnedMoments(grid, dim), hist_counts, hist_edges)
            log.info("sufficient statistics: %d θ bins x %d-d features = %.2f GB of float64",
                     len(grid), dim, (len(grid) + 3) * dim * dim * 8 / 1e9)
        state.real.add(real)
        state.recon.add(recon)
        state.binned.add(d, real)
        state.hist_counts += np.histogram(d, bins=hist_edges)[0]
    assert state is not None  # overview() already required >= 2 ok rows
    return state


KEPT_SCHEMA = pa.schema([("key", pa.string()), (SCORE_COLUMN, pa.float32())])


def kept_batches(scores: ScoreSet, storage: Storage, theta: float) -> Iterator[pa.RecordBatch]:
    """Pass 3: the kept rows as a manifest (key, d(x)), batch by batch."""
    for batch in scores.iter_batches(storage, ["key", "status", SCORE_COLUMN]):
        keep = (batch["status"] == "ok") & (batch[SCORE_COLUMN] <= theta)
        yield pa.record_batch({"key": pa.array(batch["key"][keep], pa.string()),
                               SCORE_COLUMN: pa.array(batch[SCORE_COLUMN][keep], pa.float32())})


@dataclass
class Threshold:
    """The rule's outcome over the grid, with the two distances the report gives exactly (clean-fid)."""

    start: float
    target: float
    selection: Selection
    upper_bound: float  # FD(G(E(X)), X): the diversity bound
    distance: float | None  # FD(Y_θ, X) at the chosen θ


def choose_threshold(cfg: SelectConfig, scores: ScoreSet, storage: Storage, ov: ScoreOverview,
                     label: str) -> tuple[Threshold, FeaturePass]:
    """Pass 2 and the rule: FD(Y_θ, X) on the grid, walked down while both bounds hold."""
    start = cfg.start_threshold if cfg.start_threshold is not None else ov.hi
    target = min(cfg.target_threshold, start)
    grid = threshold_grid(start, target, cfg.threshold_step)
    log.info("θ grid: %d points from %.4f to %.4f over %d scored images", len(grid), start, target, ov.ok)
    fp = feature_pass(scores, storage, grid, ov.lo, ov.hi)
    mu_x, sigma_x = fp.real.mean_cov()
    upper_bound = float(frechet_distance(*fp.recon.mean_cov(), mu_x, sigma_x))
    distance_to_x = DistanceToReference(mu_x, sigma_x)
    curve = [CurvePoint(theta, size, distance_to_x(*mean_cov(size, total, outer)) if size >= 2 else None)
             for theta, size, total, outer in tqdm(fp.binned.cumulative(), total=len(grid), desc=f"{label}(Y_θ, X)")]
    curve.reverse()  # cumulative() runs from the lowest θ up
    sel = apply_rule(curve, upper_bound, cfg.min_size)
    chosen_distance = sel.distance  # reported with clean-fid itself; the grid's fast form must agree
    if sel.size >= 2:
        kept = next(mean_cov(n, total, outer)
                    for theta, n, total, outer in fp.binned.cumulative() if theta == sel.theta)
        chosen_distance = float(frechet_distance(*kept, mu_x, sigma_x))
        if not math.isclose(chosen_distance, sel.distance, rel_tol=1e-4):
            log.warning("clean-fid gives %.6g at θ=%.4f, the grid %.6g", chosen_distance, sel.theta, sel.distance)
    log.info("chosen θ=%.4f (stopped by %s): |Y|=%d of |X|=%d", sel.theta, sel.bound, sel.size, ov.ok)
    return Threshold(start, target, sel, upper_bound, chosen_distance), fp


def draw_examples(out: FilteredSet, storage: Storage, ov: ScoreOverview, summary: dict, checkpoint: str | None,
                  pair: str) -> tuple[InferenceBundle | None, str]:
    """The best and worst reconstructions, when the checkpoint that computed the scores can be loaded
    (the figure is optional; selection needs no G or E). Returns the bundle (None: unavailable) and the
    report's note on the figure."""
    name = FilteredSet.examples_figure.name
    try:
        if checkpoint is None:
            raise FileNotFoundError("the scores name no checkpoint and select.checkpoint is not set")
        bundle = load_inference(checkpoint, storage)
    except (FileNotFoundError, CheckpointError) as err:
        log.warning("%s skipped: checkpoint %s unavailable (%s)", name, checkpoint, err)
        return None, f"skipped: checkpoint {checkpoint} unavailable"
    if bundle.identity != summary.get("checkpoint_identity", bundle.identity):
        log.warning("%s is not the checkpoint that computed the scores (%s): %s uses it anyway",
                    checkpoint, summary.get("checkpoint_identity"), name)
    rows = []  # (row name, scores, originals, G(E(x))) of the readable images
    for row, items in (("best", ov.best), ("worst", ov.worst)):
        good, originals, recon = reconstruct_keys([key for _, key in items], bundle, storage, pair)
        rows.append((row, [d for (d, _), ok in zip(items, good) if ok], originals, recon))
    storage.write_bytes(out.examples_figure, figures.originals_over_reconstructions(rows))
    return bundle, name


def selection_report(cfg: SelectConfig, summary: dict, ov: ScoreOverview, th: Threshold, label: str,
                     examples_note: str) -> dict:
    """report.json's fields (before the outliers and the curation page)."""
    sel = th.selection
    return {
        "theta": sel.theta,
        "bound": sel.bound,
        "target_threshold": cfg.target_threshold,
        "start_threshold": th.start,
        "threshold_step": cfg.threshold_step,
        "min_size": cfg.min_size,
        "size_raw": ov.ok,
        "size_kept": sel.size,
        "failed": ov.failed,
        "distance_name": label,
        "features": summary["features"],
        "distance_kept_vs_raw": th.distance,
        "distance_recon_vs_raw": th.upper_bound,
        "metric": summary["metric"],
        "judge": summary.get("judge", summary["metric"]),  # metric and size (older scores: metric only)
        "checkpoint": summary.get("checkpoint"),
        "checkpoint_identity": summary.get("checkpoint_identity"),
        "best": [{"key": k, EXAMPLE_SCORE_KEY: d} for d, k in ov.best],
        "worst": [{"key": k, EXAMPLE_SCORE_KEY: d} for d, k in ov.worst],
        "best_worst": examples_note,
        "curve": [{"theta": p.theta, "size": p.size, "distance": p.distance} for p in sel.curve],
    }


def run_selection(config: SDSGConfig) -> dict:
    """Choose θ; write the kept manifest, the report, the figures and the curation page under select.out."""
    cfg = config.select
    storage = get_storage(config.storage)
    scores, out = ScoreSet(cfg.scores), FilteredSet(cfg.out)
    summary = scores.read_summary(storage)
    label = distance_labels(summary["features"], summary.get("features_is_inception", False))[0]

    ov = overview(scores, storage, cfg.examples)
    th, fp = choose_threshold(cfg, scores, storage, ov, label)
    sel = th.selection
    n_kept = write_parquet_stream(kept_batches(scores, storage, sel.theta), KEPT_SCHEMA, out.kept, storage)
    assert n_kept == sel.size, (n_kept, sel.size)

    # the d(x) histogram with θ, and Fig. 8 (distance of Y_θ to X against θ, with both bounds)
    storage.write_bytes(out.histogram, figures.score_histogram(
        fp.hist_edges, fp.hist_counts, sel.theta, th.target, summary["metric"]))
    storage.write_bytes(out.bounds_figure, figures.distance_vs_threshold(
        np.array([p.theta for p in sel.curve]),
        np.array([np.nan if p.distance is None else p.distance for p in sel.curve]),
        np.array([p.size for p in sel.curve]), sel.theta, sel.bound, th.upper_bound, cfg.min_size, label))
    pair = summary.get("pair", "ema")  # scores written before score.pair existed used G_ema (+ E)
    bundle, examples_note = draw_examples(out, storage, ov, summary, cfg.checkpoint or summary["checkpoint"], pair)
    report = selection_report(cfg, summary, ov, th, label, examples_note)
    if cfg.labels and storage.exists(cfg.labels):  # planted outliers: what the selection removed, beside chance
        report["outliers"] = outlier_detection(scores.uri, out.kept, cfg.labels, storage)
    # the page to look at: thumbnails by d(x), a θ slider over this curve, precision/recall per kind
    report["curation_page"] = write_curation_page(
        report, scores, out, storage, edges=fp.hist_edges, counts=fp.hist_counts, cap=cfg.page_images,
        thumb_size=cfg.page_thumb_size, bundle=bundle, pair=pair, labels=cfg.labels,
        bundle_note=examples_note.removeprefix("skipped: "))
    out.write_report(report, storage)
    log.info("selected θ=%.4f (stopped by %s): kept %d/%d; %s(Y,X)=%.4g <= %s(G(E(X)),X)=%.4g; failed=%d",
             sel.theta, sel.bound, sel.size, ov.ok, label, th.distance, label, th.upper_bound, ov.failed)
    return report
