"""`sdsg select`: three streaming passes over the score shards, the rule, and the selection's outputs.

  pass 1  scores only: range, counts, the best and worst keys (for best_worst.png)
  pass 2  features: moments of X and G(E(X)), per-θ-bin moments of X, the histogram
          -> FD(Y_θ, X) for every θ of the grid and the bound FD(G(E(X)), X) (maths: selection.py)
  pass 3  the kept rows -> kept.parquet (a manifest: key, d_lpips)
  page    a stratified sample of the rows by d(x) -> curation.html and its thumbnails (curation_page.py)

Memory is one batch of rows plus the per-bin statistics, whatever the number of images.
"""

from __future__ import annotations

import heapq
import json
import logging
import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa
import torch
from tqdm import tqdm

from sdsg_ray import figures
from sdsg_ray.config import SDSGConfig
from sdsg_ray.errors import InvalidRequest
from sdsg_ray.manifest import write_parquet_stream
from sdsg_ray.storage import Storage, get_storage, join

from .curation_page import write_curation_page
from sdsg_ray.artifacts.scores import iter_score_batches, read_summary
from .selection import BinnedMoments, CurvePoint, DistanceToReference, Moments, Selection, apply_rule, mean_cov, threshold_grid

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


def overview(scores_uri: str, storage: Storage, examples: int) -> ScoreOverview:
    ok = failed = 0
    lo, hi = math.inf, -math.inf
    best: list[tuple[float, str]] = []  # max-heap via negation: the `examples` smallest
    worst: list[tuple[float, str]] = []  # min-heap: the `examples` largest
    for batch in iter_score_batches(scores_uri, storage, ["key", "status", "d_lpips"]):
        status = batch["status"]
        good = status == "ok"
        failed += int((~good).sum())
        d = batch["d_lpips"][good].astype(np.float64)
        keys = batch["key"][good]
        ok += len(d)
        if not len(d):
            continue
        lo, hi = min(lo, float(d.min())), max(hi, float(d.max()))
        for i in np.argsort(d)[:examples]:
            heapq.heappush(best, (-d[i], keys[i]))
            if len(best) > examples:
                heapq.heappop(best)
        for i in np.argsort(-d)[:examples]:
            heapq.heappush(worst, (d[i], keys[i]))
            if len(worst) > examples:
                heapq.heappop(worst)
    if ok < 2:
        raise InvalidRequest(f"{scores_uri}: only {ok} images were scored successfully; selection needs at least 2")
    return ScoreOverview(
        ok=ok,
        failed=failed,
        lo=lo,
        hi=hi,
        best=sorted((-nd, k) for nd, k in best),
        worst=sorted(worst, reverse=True),
    )


@dataclass
class FeaturePass:
    """Pass 2: moments of X, of G(E(X)), per-θ-bin moments of X, and the score histogram."""

    real: Moments
    recon: Moments
    binned: BinnedMoments
    hist_counts: np.ndarray
    hist_edges: np.ndarray


def feature_pass(scores_uri: str, storage: Storage, grid: np.ndarray, lo: float, hi: float) -> FeaturePass:
    hist_edges = np.linspace(lo, hi if hi > lo else lo + 1e-6, 101)
    hist_counts = np.zeros(100, np.int64)
    state: FeaturePass | None = None
    for batch in iter_score_batches(scores_uri, storage, ["status", "d_lpips", "feat_real", "feat_recon"]):
        good = batch["status"] == "ok"
        if not good.any():
            continue
        d = batch["d_lpips"][good].astype(np.float64)
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


def kept_batches(scores_uri: str, storage: Storage, theta: float) -> Iterator[pa.RecordBatch]:
    """Pass 3: the kept rows as a manifest (key, d_lpips), batch by batch."""
    for batch in iter_score_batches(scores_uri, storage, ["key", "status", "d_lpips"]):
        keep = (batch["status"] == "ok") & (batch["d_lpips"] <= theta)
        yield pa.record_batch(
            {"key": pa.array(batch["key"][keep], pa.string()), "d_lpips": pa.array(batch["d_lpips"][keep], pa.float32())}
        )


def reconstruct_keys(keys: list[str], bundle, storage: Storage,
                     pair: str = "ema") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(readable mask over ``keys``, originals, G(E(x))) as uint8 NHWC for the readable ones; G and E
    are the scoring ``pair`` that computed the scores."""
    from sdsg_ray.artifacts.checkpoint import scoring_pair
    from sdsg_ray.imaging import load_batch, to_tensor, to_uint8
    from sdsg_ray.models import reconstruct

    loaded = load_batch(keys, storage, bundle.model.resolution)
    good = loaded["status"] == "ok"
    originals = loaded["image"][good]
    if not good.any():
        return good, originals, originals
    with torch.no_grad():
        G, E = scoring_pair(bundle, pair)
        recon = reconstruct(G.synthesis, E, to_tensor(originals)).image
    return good, originals, to_uint8(recon)


def reconstruction_examples(items: list[tuple[float, str]], bundle, storage: Storage,
                            pair: str = "ema") -> tuple[list[float], np.ndarray, np.ndarray]:
    """(scores, originals, G(E(x))) as uint8 NHWC for the readable images among ``items`` (score, key)."""
    good, originals, recon = reconstruct_keys([key for _, key in items], bundle, storage, pair)
    return [d for (d, _), ok in zip(items, good) if ok], originals, recon


def run_selection(config: SDSGConfig) -> dict:
    """Choose θ, write kept.parquet, report.json and the three figures under select.out."""
    from sdsg_ray.artifacts.checkpoint import CheckpointError, load_inference
    from sdsg_ray.pretrained import distance_labels, frechet_distance

    cfg = config.select
    storage = get_storage(config.storage)
    summary = read_summary(cfg.scores, storage)
    label = distance_labels(summary["features"], summary.get("features_is_inception", False))[0]

    ov = overview(cfg.scores, storage, cfg.examples)
    start = cfg.start_threshold if cfg.start_threshold is not None else ov.hi
    target = min(cfg.target_threshold, start)
    grid = threshold_grid(start, target, cfg.threshold_step)
    log.info("θ grid: %d points from %.4f to %.4f over %d scored images", len(grid), start, target, ov.ok)

    fp = feature_pass(cfg.scores, storage, grid, ov.lo, ov.hi)
    mu_x, sigma_x = fp.real.mean_cov()
    upper_bound = float(frechet_distance(*fp.recon.mean_cov(), mu_x, sigma_x))
    distance_to_x = DistanceToReference(mu_x, sigma_x)
    curve = []
    for theta, size, total, outer in tqdm(fp.binned.cumulative(), total=len(grid), desc=f"{label}(Y_θ, X)"):
        dist = distance_to_x(*mean_cov(size, total, outer)) if size >= 2 else None
        curve.append(CurvePoint(theta, size, dist))
    curve.reverse()  # cumulative() runs from the lowest θ up
    sel = apply_rule(curve, upper_bound, cfg.min_size)
    chosen_distance = sel.distance  # reported with clean-fid itself; the grid's fast form must agree
    if sel.size >= 2:
        kept = next(mean_cov(n, total, outer)
                    for theta, n, total, outer in fp.binned.cumulative() if theta == sel.theta)
        chosen_distance = float(frechet_distance(*kept, mu_x, sigma_x))
        if not math.isclose(chosen_distance, sel.distance, rel_tol=1e-4):
            log.warning("clean-fid gives %.6g at θ=%.4f, the grid %.6g",
                        chosen_distance, sel.theta, sel.distance)
    log.info("chosen θ=%.4f (stopped by %s): |Y|=%d of |X|=%d", sel.theta, sel.bound, sel.size, ov.ok)

    out = cfg.out
    schema = pa.schema([("key", pa.string()), ("d_lpips", pa.float32())])
    n_kept = write_parquet_stream(kept_batches(cfg.scores, storage, sel.theta), schema, join(out, "kept.parquet"), storage)
    assert n_kept == sel.size, (n_kept, sel.size)

    storage.write_bytes(join(out, "histogram.png"), figures.score_histogram(
        fp.hist_edges, fp.hist_counts, sel.theta, target, summary["metric"]))
    storage.write_bytes(join(out, "fid_vs_threshold.png"), figures.distance_vs_threshold(
        np.array([p.theta for p in sel.curve]),
        np.array([np.nan if p.distance is None else p.distance for p in sel.curve]),
        np.array([p.size for p in sel.curve]), sel.theta, sel.bound, upper_bound, cfg.min_size, label))
    checkpoint = cfg.checkpoint or summary["checkpoint"]
    examples_note = "best_worst.png"
    bundle = None
    pair = summary.get("pair", "ema")  # scores written before score.pair existed used G_ema (+ E)
    try:
        if checkpoint is None:
            raise FileNotFoundError("the scores name no checkpoint and select.checkpoint is not set")
        bundle = load_inference(checkpoint, storage)
    except (FileNotFoundError, CheckpointError) as err:  # the figure is optional; selection needs no G or E
        log.warning("best_worst.png skipped: checkpoint %s unavailable (%s)", checkpoint, err)
        examples_note = f"skipped: checkpoint {checkpoint} unavailable"
    else:
        if bundle.identity != summary.get("checkpoint_identity", bundle.identity):
            log.warning("%s is not the checkpoint that computed the scores (%s): best_worst.png uses it anyway",
                        checkpoint, summary.get("checkpoint_identity"))
        rows = [(name, *reconstruction_examples(items, bundle, storage, pair)) for name, items in (("best", ov.best),
                                                                                               ("worst", ov.worst))]
        storage.write_bytes(join(out, "best_worst.png"), figures.originals_over_reconstructions(rows))

    report = {
        "theta": sel.theta,
        "bound": sel.bound,
        "target_threshold": cfg.target_threshold,
        "start_threshold": start,
        "threshold_step": cfg.threshold_step,
        "min_size": cfg.min_size,
        "size_raw": ov.ok,
        "size_kept": sel.size,
        "failed": ov.failed,
        "distance_name": label,
        "features": summary["features"],
        "distance_kept_vs_raw": chosen_distance,
        "distance_recon_vs_raw": upper_bound,
        "metric": summary["metric"],
        "judge": summary.get("judge", summary["metric"]),  # metric and size; scores before issue 31: metric only
        "checkpoint": summary.get("checkpoint"),
        "checkpoint_identity": summary.get("checkpoint_identity"),
        "best": [{"key": k, "d_lpips": d} for d, k in ov.best],
        "worst": [{"key": k, "d_lpips": d} for d, k in ov.worst],
        "best_worst": examples_note,
        "curve": [{"theta": p.theta, "size": p.size, "distance": p.distance} for p in sel.curve],
    }
    if cfg.labels and storage.exists(cfg.labels):  # planted outliers: what the selection removed, beside chance
        from sdsg_ray.evaluation.evaluate import outlier_detection

        report["outliers"] = outlier_detection(cfg.scores, join(out, "kept.parquet"), cfg.labels, storage)
    # the page to look at: thumbnails by d(x), a θ slider over this curve, precision/recall per kind
    report["curation_page"] = write_curation_page(
        report, cfg.scores, out, storage, edges=fp.hist_edges, counts=fp.hist_counts, cap=cfg.page_images,
        thumb_size=cfg.page_thumb_size, bundle=bundle, pair=pair, labels=cfg.labels,
        bundle_note=examples_note.removeprefix("skipped: "))
    storage.write_text(join(out, "report.json"), json.dumps(report, indent=2))
    log.info("selected θ=%.4f (stopped by %s): kept %d/%d; %s(Y,X)=%.4g <= %s(G(E(X)),X)=%.4g; failed=%d",
             sel.theta, sel.bound, sel.size, ov.ok, label, chosen_distance, label, upper_bound, ov.failed)
    return report
