"""The one way to sample: seed -> z -> w -> truncated w -> image, used by Serve, evaluation and the demo.

Truncation (w_t = psi * w + (1 - psi) * target):
  none        target = w (psi is ignored)
  mean        target = w_avg, the global mean (StyleGAN's truncation trick)
  multimodal  target = the center nearest to w (paper: by LPIPS between G(w) and G(c)), or a forced one

Reproducibility: each sample's z comes from its own torch.Generator seeded with its seed, the noise
is constant, and every forward pass (mapping, assignment, synthesis) runs at the fixed batch size,
padded, so an image depends only on (seed, psi, mode, cluster), the weights and the batch size,
never on which other samples shared its batch (kernels reduce in a different order per batch shape).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence, get_args

import numpy as np
import torch

from sdsg_ray.imaging import encode_png, image_grid, to_uint8
from sdsg_ray.truncation.assign import AssignBy, build_assigner, pad_rows, render
from sdsg_ray.truncation.clusters import ClusterSet

Mode = Literal["none", "mean", "multimodal"]
MODES: tuple[str, ...] = get_args(Mode)
SEED_MAX = 2**32 - 1


@dataclass(frozen=True)
class SampleSpec:
    """One image to draw; a batch may mix settings freely."""

    seed: int
    psi: float = 1.0
    mode: Mode = "none"
    cluster: int | None = None  # force this center (multimodal only); None = nearest


def seed_latent(seed: int, z_dim: int) -> torch.Tensor:
    """z [z_dim] for one seed, independent of every other sample."""
    if not 0 <= seed <= SEED_MAX:
        raise ValueError(f"seed must be in [0, {SEED_MAX}], got {seed}")
    return torch.randn(z_dim, generator=torch.Generator().manual_seed(seed))


class Sampler:
    """Draws truncated samples from an InferenceBundle's G_ema, with optional multi-modal centers."""

    def __init__(self, bundle, clusters: ClusterSet | None = None, metric=None, assign_by: AssignBy = "lpips",
                 batch_size: int = 32) -> None:
        self.G = bundle.G_ema.eval()
        self.device = next(self.G.parameters()).device
        self.bundle = bundle
        self.clusters = clusters
        self.batch_size = batch_size
        self.w_avg = bundle.w_avg.to(self.device).float()
        self.assigner = None
        if clusters is not None:
            if clusters.centers.shape[1] != self.G.w_dim:
                raise ValueError(
                    f"clusters have w_dim {clusters.centers.shape[1]} but the generator has {self.G.w_dim}"
                )
            if clusters.checkpoint != bundle.identity:
                raise ValueError(
                    f"clusters were fitted on checkpoint {clusters.checkpoint}, not {bundle.identity}: "
                    "run `sdsg cluster` for this checkpoint"
                )
            self.centers = clusters.centers.to(self.device).float()
            self.assigner = build_assigner(assign_by, self.G.synthesis, self.centers, metric, batch_size)

    @property
    def resolution(self) -> int:
        return int(self.G.resolution)

    @property
    def num_clusters(self) -> int:
        return self.clusters.count if self.clusters is not None else 0

    def validate(self, spec: SampleSpec) -> None:
        """Raise ValueError naming the bad field (the HTTP layer checks the same things first)."""
        if not 0 <= spec.seed <= SEED_MAX:
            raise ValueError(f"seed must be in [0, {SEED_MAX}], got {spec.seed}")
        if not 0.0 <= spec.psi <= 1.0:
            raise ValueError(f"psi must be in [0, 1], got {spec.psi}")
        if spec.mode not in MODES:
            raise ValueError(f"truncation must be one of {MODES}, got {spec.mode!r}")
        if spec.mode == "multimodal" and self.assigner is None:
            raise ValueError("truncation 'multimodal' needs clusters (run `sdsg cluster`)")
        if spec.cluster is not None:
            if spec.mode != "multimodal":
                raise ValueError("cluster can only be forced with truncation 'multimodal'")
            if not 0 <= spec.cluster < self.num_clusters:
                raise ValueError(f"cluster must be in [0, {self.num_clusters - 1}], got {spec.cluster}")

    @torch.no_grad()
    def latents(self, seeds: Sequence[int]) -> torch.Tensor:
        """Untruncated w [B, w_dim] for the seeds, mapped in fixed-size padded batches."""
        z = torch.stack([seed_latent(int(s), self.G.z_dim) for s in seeds])
        out = [self.G.mapping(pad_rows(c, self.batch_size).to(self.device)).float()[:len(c)]
               for c in z.split(self.batch_size)]
        return torch.cat(out)

    @torch.no_grad()
    def truncated_latents(self, specs: Sequence[SampleSpec], w: torch.Tensor) -> torch.Tensor:
        """w_t [B, w_dim] for each spec's own psi, mode and cluster (B <= batch_size)."""
        targets = w.clone()
        is_mean = torch.tensor([s.mode == "mean" for s in specs], device=self.device)
        targets[is_mean] = self.w_avg
        forced = [i for i, s in enumerate(specs) if s.mode == "multimodal" and s.cluster is not None]
        nearest = [i for i, s in enumerate(specs) if s.mode == "multimodal" and s.cluster is None]
        if forced:
            targets[forced] = self.centers[[specs[i].cluster for i in forced]]
        if nearest:  # assign the whole (padded) batch: same shape every time, see the module docstring
            targets[nearest] = self.centers[self.assigner.assign(w)[nearest]]
        psi = torch.tensor([s.psi if s.mode != "none" else 1.0 for s in specs], device=self.device)[:, None]
        # psi*w + (1-psi)*c rather than c + psi*(w-c): exact at both ends (psi=1 -> w, psi=0 -> c) in floats.
        return psi * w + (1 - psi) * targets

    @torch.no_grad()
    def render_specs(self, specs: Sequence[SampleSpec]) -> np.ndarray:
        """Images for mixed per-item settings, uint8 NHWC [B, R, R, 3]."""
        for spec in specs:
            self.validate(spec)
        out = []
        for start in range(0, len(specs), self.batch_size):
            chunk = specs[start:start + self.batch_size]
            w_t = self.truncated_latents(chunk, self.latents([s.seed for s in chunk]))
            out.append(to_uint8(render(self.G.synthesis, w_t, self.batch_size).cpu()))
        images = np.concatenate(out) if out else np.zeros((0, self.resolution, self.resolution, 3), np.uint8)
        assert images.shape == (len(specs), self.resolution, self.resolution, 3), images.shape
        return images

    def sample(self, seeds: Sequence[int], psi: float = 1.0, mode: Mode = "none",
               cluster: int | None = None) -> np.ndarray:
        """Images for the seeds with one setting, uint8 NHWC [B, R, R, 3]."""
        return self.render_specs([SampleSpec(int(s), float(psi), mode, cluster) for s in seeds])

    def center_images(self) -> np.ndarray:
        """G(c_k) for every center, uint8 NHWC [K, R, R, 3] (cached by the perceptual assigner)."""
        if self.assigner is None:
            raise ValueError("no clusters loaded")
        cached = getattr(self.assigner, "center_images", None)
        images = cached if cached is not None else render(self.G.synthesis, self.centers, self.batch_size)
        return to_uint8(images.cpu())

    def center_grid(self) -> bytes:
        """All center images in one PNG, row-major in cluster order."""
        images = self.center_images()
        return encode_png(image_grid(images, ncols=math.ceil(math.sqrt(len(images)))))


def load_sampler(checkpoint: str, clusters: str | None = None, storage=None, assign_by: AssignBy = "lpips",
                 device: str | None = None, batch_size: int = 32) -> Sampler:
    """A Sampler from URIs: the checkpoint's G_ema, its clusters and the metric the clusters name."""
    from sdsg_ray.checkpoint import load_inference
    from sdsg_ray.truncation.clusters import load_clusters

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    bundle = load_inference(checkpoint, storage, device=device)
    cluster_set = load_clusters(clusters, storage) if clusters else None
    metric = None
    if cluster_set is not None and assign_by == "lpips":
        from sdsg_ray.pretrained import build_metric

        metric = build_metric(cluster_set.metric, device=device)
    return Sampler(bundle, cluster_set, metric, assign_by=assign_by, batch_size=batch_size)
