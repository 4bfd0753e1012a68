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
        return torch.cdist(w.float(), self.centers.to(w.device).float()).argmin(dim=1)


class PerceptualAssigner:
    """Nearest center by the perceptual metric between G(w) and G(c), center features cached."""

    by: AssignBy = "lpips"

    def __init__(self, synthesis: torch.nn.Module, centers: torch.Tensor, metric, batch_size: int = 16) -> None:
        assert centers.ndim == 2, f"centers must be [K, w_dim], got {tuple(centers.shape)}"
        self.synthesis = synthesis
        self.metric = metric
        self.centers = centers
        self.center_images = render(synthesis, centers, batch_size)  # [K, 3, R, R] in [-1, 1]
        with torch.no_grad():
            # Per-layer features of each chunk, concatenated along the batch: [K, C_l, H_l, W_l] per layer.
            chunks = [metric.features(x) for x in self.center_images.split(batch_size)]
            self.center_features = [torch.cat(layer) for layer in zip(*chunks)]

    @torch.no_grad()
    def distances(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, R, R] in [-1, 1] -> perceptual distance to every center, [B, K]."""
        fx = self.metric.features(images)
        d = self.metric.pairwise_distance_from_features(fx, self.center_features)
        assert d.shape == (images.shape[0], self.centers.shape[0]), d.shape
        return d

    @torch.no_grad()
    def assign(self, w: torch.Tensor, images: torch.Tensor | None = None) -> torch.Tensor:
        """w [B, w_dim] -> center index [B]; pass ``images`` = G(w) if already rendered (saves a pass)."""
        if images is None:
            images = render(self.synthesis, w)
        return self.distances(images).argmin(dim=1)


@torch.no_grad()
def render(synthesis: torch.nn.Module, w: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
    """G(w) with constant noise, float [B, 3, R, R] in [-1, 1] (optionally in chunks to bound memory)."""
    device = next(synthesis.parameters()).device
    chunks = w.split(batch_size) if batch_size else (w,)
    return torch.cat([synthesis(c.to(device), noise_mode=NOISE_MODE).float() for c in chunks])


def build_assigner(by: AssignBy, synthesis: torch.nn.Module, centers: torch.Tensor, metric=None):
    """The assigner for ``by``; the perceptual one needs the metric the centers were fitted with."""
    if by == "w":
        return LatentAssigner(centers)
    if by == "lpips":
        if metric is None:
            raise ValueError("assign_by='lpips' needs a perceptual metric (pretrained.build_metric)")
        return PerceptualAssigner(synthesis, centers, metric)
    raise ValueError(f"assign_by must be 'lpips' or 'w', got {by!r}")
