"""Every figure the project writes, each a function from numbers or images to PNG bytes: one renderer
(matplotlib's Agg backend), one resolution policy, one :func:`to_png`. Callers compute; these functions only
draw. Image grids without axes are plain pixels and live in :mod:`sdsg_ray.imaging`.
"""

from __future__ import annotations

import io
from typing import Sequence

import numpy as np

from sdsg_ray.truncation.modes import fig7_curves

DPI = 120


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on servers, Ray workers or CI
    import matplotlib.pyplot as plt

    return plt


def to_png(fig) -> bytes:
    """The figure as PNG bytes; the figure is closed (pyplot keeps every open figure alive)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    _pyplot().close(fig)
    return buf.getvalue()


def score_histogram(edges: np.ndarray, counts: np.ndarray, theta: float, target: float, metric: str) -> bytes:
    """Histogram of d(x) with the chosen and the target θ."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color="0.6")
    ax.axvline(theta, color="C3", label=f"chosen θ = {theta:.3f}")
    ax.axvline(target, color="C0", ls="--", label=f"target θ = {target:.3f}")
    ax.set_xlabel(f"d(x) = {metric}(x, G(E(x)))")
    ax.set_ylabel("images")
    ax.legend()
    return to_png(fig)


def distance_vs_threshold(thetas: np.ndarray, distances: np.ndarray, sizes: np.ndarray, chosen: float,
                          stopped_by: str, upper_bound: float, min_size: int, label: str) -> bytes:
    """The paper's Fig. 8: FD(Y_θ, X) against θ, with the diversity bound and the size floor.

    ``distances`` holds NaN where |Y_θ| < 2; ``label`` is "FID" or "FD (<network>)".
    """
    plt = _pyplot()
    symbol, _, network = label.partition(" ")
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot(thetas, distances, "o-", ms=3, color="C0", label=f"{symbol}(Y_θ, X)")
    ax.axhline(upper_bound, color="C3", ls="--", label=f"diversity bound {symbol}(G(E(X)), X) = {upper_bound:.3g}")
    ax.axvline(chosen, color="k", lw=0.8, label=f"chosen θ = {chosen:.3f} (stopped by {stopped_by})")
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
    return to_png(fig)


def originals_over_reconstructions(rows: Sequence[tuple[str, Sequence[float], np.ndarray, np.ndarray]]) -> bytes:
    """For each (name, scores, originals uint8 [N,R,R,3], reconstructions [N,R,R,3]): the originals in
    one row, titled with their scores, and their reconstructions G(E(x)) below."""
    plt = _pyplot()
    cols = max([len(scores) for _, scores, _, _ in rows] + [1])
    fig, axes = plt.subplots(2 * len(rows), cols, figsize=(1.3 * cols, 1.4 * 2 * len(rows)), squeeze=False,
                             layout="constrained")  # the title sits on the grid, not above a blank band
    for ax in axes.flat:
        ax.axis("off")
    for r, (name, scores, originals, recons) in enumerate(rows):
        for c, (d, img, rec) in enumerate(zip(scores, originals, recons)):
            axes[2 * r, c].imshow(img)
            axes[2 * r, c].set_title(f"{name} d={d:.3f}", fontsize=7)
            axes[2 * r + 1, c].imshow(rec)
    fig.suptitle("originals (odd rows) over G(E(x)) (even rows)", fontsize=9)
    return to_png(fig)


def distance_vs_psi(curve: dict, label: str) -> bytes:
    """The paper's Fig. 7: distance to the training set against ψ for each truncation curve in ``curve``
    (``{"psis": [...], "<curve>": {"fd": [...]}}``, as evaluation.truncation_curves writes it)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for line in fig7_curves():  # every registered truncation mode's lines, each drawn as its mode says
        if line.name in curve:
            ax.plot(curve["psis"], curve[line.name]["fd"], line.style, label=line.legend)
    ax.set_xlabel("ψ")
    ax.set_ylabel(f"{label} (vs training set)")
    ax.set_title("Distance against ψ (paper Fig. 7)")
    ax.grid(alpha=0.3)
    ax.legend()
    return to_png(fig)


def labelled_grid(grid: np.ndarray, row_labels: Sequence[str], title: str) -> bytes:
    """An image grid (uint8 [H, W, 3], rows of equal height) with a label per row."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, max(2.0, grid.shape[0] / grid.shape[1] * 8)))
    ax.imshow(grid, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([(i + 0.5) * grid.shape[0] / len(row_labels) for i in range(len(row_labels))])
    ax.set_yticklabels(row_labels)
    ax.set_title(title)
    return to_png(fig)


def curves(series: dict[str, tuple[Sequence[float], Sequence[float]]], xlabel: str, ylabel: str,
           title: str) -> bytes:
    """One line per labelled (x, y) series: benchmark sweeps and resource traces."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for label, (x, y) in series.items():
        ax.plot(x, y, "o-" if len(x) <= 30 else "-", ms=3, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=8)
    return to_png(fig)
