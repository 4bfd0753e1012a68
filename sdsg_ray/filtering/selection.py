"""Self-filtering step 2: choose the threshold θ with the paper's two bounds.

θ is lowered on a grid from the start value (default: the largest score, i.e. keep everything) toward
the target (0.36 in the paper) while

    FD(Y_θ, X) <= FD(G(E(X)), X)     (diversity: the kept set may not drift further from the raw set
                                      than the reconstructions do)
    |Y_θ|      >= min_size           (size: FFHQ's 70,000 in the paper)

with Y_θ = {x : d(x) <= θ}. (The paper writes d(x) < θ; "<=" makes the default start, the largest score,
keep every image, and is otherwise the same for continuous scores.)

FD(Y_θ, X) for EVERY θ on the grid comes from one streaming pass over the scores: each image falls in the
bin of the lowest grid θ that still keeps it, and each bin accumulates count, Σf and Σffᵀ in float64.
Y_θk is the union of bins j >= k, so suffix sums give its exact mean and covariance; memory is
(bins + 2)·D² float64, independent of the number of images.
"""

from __future__ import annotations

import heapq
import io
import json
import logging
import math
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import pyarrow as pa
import scipy.linalg
from tqdm import tqdm

from sdsg_ray.config import SDSGConfig
from sdsg_ray.storage import Storage, get_storage, join

from .writer import iter_score_batches, read_summary, write_parquet_stream

log = logging.getLogger(__name__)

BOUNDS = ("target", "diversity", "size")


# ----------------------------------------------------------------------------------------------------------
# Sufficient statistics


@dataclass
class Moments:
    """count, Σf and Σffᵀ of a set of feature vectors, in float64 so differences of large sums stay exact."""

    dim: int
    count: int = 0
    total: np.ndarray = field(init=False)
    outer: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.total = np.zeros(self.dim, np.float64)
        self.outer = np.zeros((self.dim, self.dim), np.float64)

    def add(self, feats: np.ndarray) -> None:
        f = np.asarray(feats, np.float64)
        assert f.ndim == 2 and f.shape[1] == self.dim, f.shape
        self.count += f.shape[0]
        self.total += f.sum(axis=0)
        self.outer += f.T @ f

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean and unbiased covariance, exactly what clean-fid's np.mean / np.cov(rowvar=False) give."""
        return mean_cov(self.count, self.total, self.outer)


def mean_cov(count: int, total: np.ndarray, outer: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if count < 2:
        raise ValueError(f"a covariance needs at least 2 feature vectors, got {count}")
    mu = total / count
    sigma = (outer - count * np.outer(mu, mu)) / (count - 1)
    return mu, sigma


def threshold_grid(start: float, target: float, step: float) -> np.ndarray:
    """start, start-step, ... down to target (always the last point), strictly decreasing."""
    if start < target:
        raise ValueError(f"start threshold {start} is below the target {target}")
    n_steps = math.ceil((start - target) / step - 1e-9)
    grid = start - step * np.arange(n_steps + 1, dtype=np.float64)
    grid[-1] = target
    return grid


class DistanceToReference:
    """FD(Y, X) for many Y against one fixed X: the same number as clean-fid's frechet_distance, cheaper.

    FD = |μ_Y − μ_X|² + Tr Σ_Y + Tr Σ_X − 2 Tr (Σ_Y Σ_X)^{1/2}, and (Σ_Y Σ_X)^{1/2} has the eigenvalues of
    the symmetric PSD matrix R Σ_Y R with R = Σ_X^{1/2}. One eigendecomposition of Σ_X up front leaves a
    symmetric eigenvalue problem per θ instead of clean-fid's general sqrtm: ~6x faster at 1152-d, which
    is most of selection's time on a long θ grid. The reported bound and chosen point still use clean-fid.
    """

    def __init__(self, mu_x: np.ndarray, sigma_x: np.ndarray) -> None:
        eigvals, eigvecs = scipy.linalg.eigh(sigma_x, driver="evr")
        self.sqrt_sigma_x = (eigvecs * np.sqrt(np.clip(eigvals, 0.0, None))) @ eigvecs.T
        self.mu_x, self.trace_x = mu_x, float(np.trace(sigma_x))

    def __call__(self, mu: np.ndarray, sigma: np.ndarray) -> float:
        product = self.sqrt_sigma_x @ sigma @ self.sqrt_sigma_x
        eigvals = scipy.linalg.eigvalsh((product + product.T) / 2, driver="evr")
        trace_sqrt = float(np.sqrt(np.clip(eigvals, 0.0, None)).sum())
        return float(np.sum((mu - self.mu_x) ** 2) + np.trace(sigma) + self.trace_x - 2 * trace_sqrt)


class BinnedMoments:
    """Per-θ-bin moments: bin k holds the images kept at grid[k] but not at grid[k+1]."""

    def __init__(self, grid: np.ndarray, dim: int) -> None:
        assert np.all(np.diff(grid) < 0), "grid must be strictly decreasing"
        self.grid = grid
        self.dim = dim
        k = len(grid)
        self.counts = np.zeros(k, np.int64)
        self.totals = np.zeros((k, dim), np.float64)
        self.outers = np.zeros((k, dim, dim), np.float64)

    def bin_index(self, scores: np.ndarray) -> np.ndarray:
        """Index of the lowest grid θ with θ >= score; -1 when the score is above grid[0] (never kept)."""
        ascending = self.grid[::-1]
        n_below = np.searchsorted(ascending, scores, side="left")  # grid points < score
        return len(self.grid) - n_below - 1

    def add(self, scores: np.ndarray, feats: np.ndarray) -> None:
        f = np.asarray(feats, np.float64)
        bins = self.bin_index(np.asarray(scores, np.float64))
        for b in np.unique(bins[bins >= 0]):
            fb = f[bins == b]
            self.counts[b] += fb.shape[0]
            self.totals[b] += fb.sum(axis=0)
            self.outers[b] += fb.T @ fb

    def cumulative(self) -> Iterator[tuple[float, int, np.ndarray, np.ndarray]]:
        """(θ_k, |Y_θk|, ΣY f, ΣY ffᵀ) for k = K..0 (lowest θ first): running suffix sums over bins j >= k.

        The yielded arrays are updated in place by the next step: use them before advancing.
        """
        count = 0
        total = np.zeros(self.dim, np.float64)
        outer = np.zeros((self.dim, self.dim), np.float64)
        for k in range(len(self.grid) - 1, -1, -1):
            count += int(self.counts[k])
            total += self.totals[k]
            outer += self.outers[k]
            yield float(self.grid[k]), count, total, outer


# ----------------------------------------------------------------------------------------------------------
# The rule


@dataclass
class CurvePoint:
    theta: float
    size: int
    distance: float | None  # FD(Y_θ, X); None when |Y_θ| < 2


@dataclass
class Selection:
    theta: float
    bound: str  # which of BOUNDS stopped the lowering
    size: int
    distance: float | None
    curve: list[CurvePoint]


def apply_rule(curve: list[CurvePoint], upper_bound: float, min_size: int) -> Selection:
    """Walk down the grid while both bounds hold; the last θ that satisfied them is chosen."""
    chosen = 0
    bound = "target"
    if curve[0].size < min_size:
        log.warning("the raw set (%d images) is already below min_size=%d: nothing is filtered", curve[0].size, min_size)
        bound = "size"
    else:
        for k in range(1, len(curve)):
            point = curve[k]
            if point.size < max(min_size, 2):
                bound = "size"
                break
            if point.distance is None or point.distance > upper_bound:
                bound = "diversity"
                break
            chosen = k
    c = curve[chosen]
    return Selection(theta=c.theta, bound=bound, size=c.size, distance=c.distance, curve=curve)


# ----------------------------------------------------------------------------------------------------------
# Streaming passes over the score shards


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
        raise ValueError(f"{scores_uri}: only {ok} images were scored successfully; selection needs at least 2")
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


# ----------------------------------------------------------------------------------------------------------
# Figures


def distance_label(feature_name: str, is_inception: bool) -> str:
    """'FID' only for Inception features; any other network is named, never passed off as FID."""
    return "FID" if is_inception else f"FD ({feature_name})"


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def plot_histogram(edges: np.ndarray, counts: np.ndarray, theta: float, target: float, metric: str) -> bytes:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color="0.6")
    ax.axvline(theta, color="C3", label=f"chosen θ = {theta:.3f}")
    ax.axvline(target, color="C0", ls="--", label=f"target θ = {target:.3f}")
    ax.set_xlabel(f"d(x) = {metric}(x, G(E(x)))")
    ax.set_ylabel("images")
    ax.legend()
    return _png(fig)


def plot_distance_vs_threshold(sel: Selection, upper_bound: float, min_size: int, label: str) -> bytes:
    """The paper's Fig. 8: FD(Y_θ, X) against θ, with the diversity bound and the size floor."""
    import matplotlib.pyplot as plt

    symbol, _, network = label.partition(" ")  # "FID" or "FD", then "(network)" for non-Inception features
    thetas = np.array([p.theta for p in sel.curve])
    dist = np.array([np.nan if p.distance is None else p.distance for p in sel.curve])
    sizes = np.array([p.size for p in sel.curve])
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot(thetas, dist, "o-", ms=3, color="C0", label=f"{symbol}(Y_θ, X)")
    ax.axhline(upper_bound, color="C3", ls="--", label=f"diversity bound {symbol}(G(E(X)), X) = {upper_bound:.3g}")
    ax.axvline(sel.theta, color="k", lw=0.8, label=f"chosen θ = {sel.theta:.3f} (stopped by {sel.bound})")
    below = sizes < min_size
    if below.any():
        ax.axvspan(thetas.min(), thetas[below].max(), color="C1", alpha=0.15, label=f"|Y_θ| < {min_size} (size bound)")
    ax.set_xlabel("θ (lowered from left to right)")
    ax.set_ylabel(f"{symbol} {network}".strip())
    ax.invert_xaxis()
    ax2 = ax.twinx()
    ax2.plot(thetas, sizes, color="C2", alpha=0.6, label="|Y_θ|")
    ax2.axhline(min_size, color="C1", ls=":", label=f"size floor {min_size}")
    ax2.set_ylabel("|Y_θ|")
    handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=2, fontsize=8)
    return _png(fig)


def plot_best_worst(
    best: list[tuple[float, str]], worst: list[tuple[float, str]], bundle, storage: Storage
) -> bytes:
    """Originals over their reconstructions for the lowest and highest scores (re-reads only these images)."""
    import matplotlib.pyplot as plt
    import torch

    from sdsg_ray.imaging import load_batch, to_tensor, to_uint8

    from .scorer import reconstruct

    cols = max(len(best), len(worst))
    fig, axes = plt.subplots(4, cols, figsize=(1.3 * cols, 5.6), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for r, (name, items) in enumerate((("best", best), ("worst", worst))):
        loaded = load_batch([key for _, key in items], storage, bundle.model.resolution)
        good = loaded["status"] == "ok"
        if not good.any():
            continue
        with torch.no_grad():
            recon = to_uint8(reconstruct(bundle.G_ema, bundle.E, to_tensor(loaded["image"][good])))
        scores = [d for (d, _), ok in zip(items, good) if ok]
        for c, (d, img, rec) in enumerate(zip(scores, loaded["image"][good], recon)):
            axes[2 * r, c].imshow(img)
            axes[2 * r, c].set_title(f"{name} d={d:.3f}", fontsize=7)
            axes[2 * r + 1, c].imshow(rec)
    fig.suptitle("originals (rows 1, 3) over G(E(x)) (rows 2, 4)", fontsize=9)
    return _png(fig)


# ----------------------------------------------------------------------------------------------------------
# Entry point


def run_selection(config: SDSGConfig, args=None) -> dict:
    """Choose θ, write kept.parquet, report.json and the three figures under select.out."""
    from sdsg_ray.checkpoint import CheckpointError, load_inference
    from sdsg_ray.pretrained import frechet_distance

    cfg = config.select
    storage = get_storage(config.storage)
    summary = read_summary(cfg.scores, storage)
    label = distance_label(summary["features"], summary.get("features_is_inception", False))

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

    storage.write_bytes(
        join(out, "histogram.png"), plot_histogram(fp.hist_edges, fp.hist_counts, sel.theta, target, summary["metric"])
    )
    storage.write_bytes(
        join(out, "fid_vs_threshold.png"), plot_distance_vs_threshold(sel, upper_bound, cfg.min_size, label)
    )
    checkpoint = cfg.checkpoint or summary["checkpoint"]
    examples_note = "best_worst.png"
    try:
        bundle = load_inference(checkpoint, storage)
    except (FileNotFoundError, CheckpointError) as err:  # the figure is optional; selection needs no G or E
        log.warning("best_worst.png skipped: checkpoint %s unavailable (%s)", checkpoint, err)
        examples_note = f"skipped: checkpoint {checkpoint} unavailable"
    else:
        if bundle.identity != summary.get("checkpoint_identity", bundle.identity):
            log.warning("%s is not the checkpoint that computed the scores (%s): best_worst.png uses it anyway",
                        checkpoint, summary.get("checkpoint_identity"))
        storage.write_bytes(join(out, "best_worst.png"), plot_best_worst(ov.best, ov.worst, bundle, storage))

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
        "checkpoint": summary.get("checkpoint"),
        "checkpoint_identity": summary.get("checkpoint_identity"),
        "best": [{"key": k, "d_lpips": d} for d, k in ov.best],
        "worst": [{"key": k, "d_lpips": d} for d, k in ov.worst],
        "best_worst": examples_note,
        "curve": [{"theta": p.theta, "size": p.size, "distance": p.distance} for p in sel.curve],
    }
    storage.write_text(join(out, "report.json"), json.dumps(report, indent=2))
    print(
        f"selected θ={sel.theta:.4f} (stopped by {sel.bound}): kept {sel.size}/{ov.ok}; "
        f"{label}(Y,X)={chosen_distance:.4g} <= {label}(G(E(X)),X)={upper_bound:.4g}; failed={ov.failed}"
    )
    return report
