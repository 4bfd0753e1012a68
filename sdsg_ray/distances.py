"""Distances between feature sets: the Fréchet distance, KID (MMD²) and their intervals. Pure maths, no I/O.

The Fréchet distance is clean-fid's :func:`frechet_distance`, the one formula the project reports (FID with
Inception features, "FD (<network>)" with any other); :class:`DistanceToReference` is the same number, faster,
for the selection's θ grid. KID is clean-fid's :func:`kernel_distance`; :func:`block_kids` gives independent
per-block estimates for the intervals behind Tables 1/3's claims.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import scipy.linalg
from cleanfid.fid import frechet_distance, kernel_distance
from scipy import stats

KID_SUBSETS = 100
KID_BLOCKS = 5


@dataclass(frozen=True)
class Distances:
    fd: float  # Frechet distance (FID with Inception features)
    kd: float  # kernel distance (KID), unbiased MMD^2 with the cubic polynomial kernel


def mean_cov_of(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance of features [N, D], as clean-fid computes them."""
    return np.mean(feats, axis=0), np.cov(feats, rowvar=False)


def distances(feats_a: np.ndarray, feats_b: np.ndarray) -> Distances:
    """FD and KD between two feature sets [N, D]."""
    assert feats_a.ndim == 2 and feats_b.ndim == 2 and feats_a.shape[1] == feats_b.shape[1], (
        feats_a.shape, feats_b.shape)
    if min(len(feats_a), len(feats_b)) < 2:
        raise ValueError(f"need at least 2 samples per set, got {len(feats_a)} and {len(feats_b)}")
    fd = float(frechet_distance(*mean_cov_of(feats_a.astype(np.float64)), *mean_cov_of(feats_b.astype(np.float64))))
    # kernel_distance draws its subsets from numpy's global RNG: seed it so a rerun gives the same KID.
    np.random.seed(0)
    subset = min(len(feats_a), len(feats_b), 1000)
    kd = float(kernel_distance(feats_a, feats_b, num_subsets=KID_SUBSETS, max_subset_size=subset))
    return Distances(fd, kd)


class DistanceToReference:
    """FD(Y, X) for many Y against one fixed X: the same number as :func:`frechet_distance`, cheaper.

    FD = |μ_Y − μ_X|² + Tr Σ_Y + Tr Σ_X − 2 Tr (Σ_Y Σ_X)^{1/2}, and (Σ_Y Σ_X)^{1/2} has the eigenvalues of
    the symmetric PSD matrix R Σ_Y R with R = Σ_X^{1/2}. One eigendecomposition of Σ_X up front leaves a
    symmetric eigenvalue problem per θ instead of clean-fid's general sqrtm, which is most of selection's
    time on a long θ grid (docs/benchmarks.md). The reported bound and chosen point still use clean-fid.
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


def unbiased_mmd2(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """KID's estimator on two whole feature sets: unbiased MMD^2 with the cubic polynomial kernel
    k(x, y) = (x.y / d + 1)^3 (diagonals left out of the within-set means), as clean-fid's
    ``kernel_distance`` computes it per subset."""
    a, b = feats_a.astype(np.float64), feats_b.astype(np.float64)
    d, m, n = a.shape[1], len(a), len(b)
    k_aa, k_bb, k_ab = ((x @ y.T / d + 1) ** 3 for x, y in ((a, a), (b, b), (a, b)))
    return float((k_aa.sum() - np.trace(k_aa)) / (m * (m - 1)) + (k_bb.sum() - np.trace(k_bb)) / (n * (n - 1))
                 - 2 * k_ab.mean())


def t_interval(values: Sequence[float], confidence: float = 0.95) -> dict:
    """Mean and Student-t interval over independent estimates (one per disjoint sample block)."""
    v = np.asarray(values, np.float64)
    mean = float(v.mean())
    if len(v) < 2:
        return {"mean": mean, "low": None, "high": None, "n": len(v), "confidence": confidence}
    half = float(stats.t.ppf(0.5 + confidence / 2, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v)))
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": len(v), "confidence": confidence}


def block_kids(fake: np.ndarray, real: np.ndarray, blocks: int = KID_BLOCKS) -> list[float]:
    """Unbiased KID of each of ``blocks`` disjoint blocks of the samples against the whole real set: the
    per-block values are independent estimates (the same seeds' block k in every model, so two models'
    values pair up block by block)."""
    return [unbiased_mmd2(part, real) for part in np.array_split(fake, blocks) if len(part) >= 2]


def compare_blocks(a: Sequence[float], b: Sequence[float]) -> dict:
    """Paired difference a - b over blocks with its 95 % t-interval; ``holds`` (a lower than b) only when
    the whole interval lies below zero."""
    diff = t_interval([x - y for x, y in zip(a, b)])
    diff["holds"] = diff["high"] is not None and diff["high"] < 0
    diff["interval"] = f"t-interval over {diff['n']} disjoint sample blocks (paired by seed block)"
    return diff
