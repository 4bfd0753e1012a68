"""Self-filtering step 2, the maths: choose the threshold θ with the paper's two bounds.

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
(bins + 2)·D² float64, independent of the number of images. The passes over the score shards and the
``sdsg select`` command are in :mod:`sdsg_ray.filtering.select`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

log = logging.getLogger(__name__)


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
        """Mean and unbiased covariance, exactly what clean-fid's np.mean / np.cov(rowvar=False) give
        (:func:`sdsg_ray.distances.mean_cov_of`), from the sums alone."""
        return mean_cov(self.count, self.total, self.outer)


def mean_cov(count: int, total: np.ndarray, outer: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if count < 2:
        raise ValueError(f"a covariance needs at least 2 feature vectors, got {count}")
    mu = total / count
    return mu, (outer - count * np.outer(mu, mu)) / (count - 1)


def threshold_grid(start: float, target: float, step: float) -> np.ndarray:
    """start, start-step, ... down to target (always the last point), strictly decreasing."""
    if start < target:
        raise ValueError(f"start threshold {start} is below the target {target}")
    n_steps = math.ceil((start - target) / step - 1e-9)
    grid = start - step * np.arange(n_steps + 1, dtype=np.float64)
    grid[-1] = target
    return grid


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
        n_below = np.searchsorted(self.grid[::-1], scores, side="left")  # grid points < score
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


@dataclass
class CurvePoint:
    theta: float
    size: int
    distance: float | None  # FD(Y_θ, X); None when |Y_θ| < 2


@dataclass
class Selection:
    theta: float
    bound: str  # which bound stopped the lowering: "target", "diversity" or "size"
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
        for k, point in enumerate(curve[1:], start=1):
            if point.size < max(min_size, 2):
                bound = "size"
                break
            if point.distance is None or point.distance > upper_bound:
                bound = "diversity"
                break
            chosen = k
    c = curve[chosen]
    return Selection(theta=c.theta, bound=bound, size=c.size, distance=c.distance, curve=curve)
