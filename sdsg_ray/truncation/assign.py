"""Which center a new w truncates toward.

The paper picks the center whose image is perceptually nearest: argmin_k LPIPS(G(w), G(c_k)); a user
study preferred it to the Euclidean nearest center in W (Table 5), which is kept as an ablation.
The K center images never change, so their perceptual features are computed once; a batch of B
samples then costs one feature pass plus a [B, K] distance, never B*K LPIPS calls.
"""

from __future__ import annotations

from typing import Literal

import torch

AssignBy = Literal["lpips", "w"]
NOISE_MODE = "const"  # the same w must always give the same image, for samples and for centers alike


class LatentAssigner:
    """Nearest center by Euclidean distance in W (the ablation)."""

    by: AssignBy = "w"

    def __init__(self, centers: torch.Tensor) -> None:
        assert centers.ndim == 2, f"centers must be [K, w_dim], got {tuple(centers.shape)}"
        self.centers = centers

    @torch.no_grad()
    def assign(self, w: torch.Tensor, images: torch.Tensor | None = None) -> torch.Tensor:
        """w [B, w_dim] -> center index [B] (int64). ``images`` is unused here."""
        # Exact per-pair distances (the matmul shortcut rounds differently with the batch size).
        d = torch.cdist(w.float(), self.centers.to(w.device).float(), compute_mode="donot_use_mm_for_euclid_dist")
        return d.argmin(dim=1)


class PerceptualAssigner:
    """Nearest center by the perceptual metric between G(w) and G(c), center features cached."""

    by: AssignBy = "lpips"

    def __init__(self, synthesis: torch.nn.Module, centers: torch.Tensor, metric, batch_size: int = 16) -> None:
        assert centers.ndim == 2, f"centers must be [K, w_dim], got {tuple(centers.shape)}"
        self.synthesis = synthesis
        self.metric = metric
        self.centers = centers
        self.batch_size = batch_size
        self.center_images = render(synthesis, centers, batch_size)  # [K, 3, R, R] in [-1, 1]
        with torch.no_grad():
            # Per-layer features of each chunk, concatenated along the batch: [K, C_l, H_l, W_l] per layer.
            chunks = [metric.features(x) for x in self.center_images.split(batch_size)]
            self.center_features = [torch.cat(layer) for layer in zip(*chunks)]

    @torch.no_grad()
    def distances(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, R, R] in [-1, 1] -> perceptual distance to every center, [B, K]."""
        parts = []
        for chunk in images.split(self.batch_size):  # fixed-shape passes, like render()
            fx = self.metric.features(pad_rows(chunk, self.batch_size))
            parts.append(self.metric.pairwise_distance_from_features(fx, self.center_features)[:len(chunk)])
        d = torch.cat(parts)
        assert d.shape == (images.shape[0], self.centers.shape[0]), d.shape
        return d

    @torch.no_grad()
    def assign(self, w: torch.Tensor, images: torch.Tensor | None = None) -> torch.Tensor:
        """w [B, w_dim] -> center index [B]; pass ``images`` = G(w) if already rendered (saves a pass)."""
        if images is None:
            images = render(self.synthesis, w, self.batch_size)
        return self.distances(images).argmin(dim=1)


@torch.no_grad()
def render(synthesis: torch.nn.Module, w: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
    """G(w) with constant noise, float [B, 3, R, R] in [-1, 1].

    With ``batch_size`` every forward pass has exactly that many rows (the last chunk is padded by
    repeating its last w): BLAS/conv kernels pick different reduction orders for different batch
    sizes, so a fixed shape is what makes an image independent of how many others shared its batch.
    """
    device = next(synthesis.parameters()).device
    if not batch_size:
        return synthesis(w.to(device), noise_mode=NOISE_MODE).float()
    out = []
    for chunk in w.split(batch_size):
        out.append(synthesis(pad_rows(chunk, batch_size).to(device), noise_mode=NOISE_MODE).float()[:len(chunk)])
    return torch.cat(out)


def pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """x [n, ...] -> [rows, ...] by repeating the last row (n <= rows)."""
    assert 0 < len(x) <= rows, (len(x), rows)
    return torch.cat([x, x[-1:].expand(rows - len(x), *x.shape[1:])]) if len(x) < rows else x


def build_assigner(by: AssignBy, synthesis: torch.nn.Module, centers: torch.Tensor, metric=None,
                   batch_size: int = 16):
    """The assigner for ``by``; the perceptual one needs the metric the centers were fitted with."""
    if by == "w":
        return LatentAssigner(centers)
    if by == "lpips":
        if metric is None:
            raise ValueError("assign_by='lpips' needs a perceptual metric (pretrained.build_metric)")
        return PerceptualAssigner(synthesis, centers, metric, batch_size)
    raise ValueError(f"assign_by must be 'lpips' or 'w', got {by!r}")
