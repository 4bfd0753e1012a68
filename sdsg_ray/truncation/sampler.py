"""The one way to sample: seed -> z -> w -> truncated w -> image, used by Serve, evaluation and the demo.

Truncation (w_t = psi * w + (1 - psi) * target): each sample's mode picks its target; the modes and
what each one does are the registry in :mod:`sdsg_ray.truncation.modes`.

Reproducibility: each sample's z comes from its own torch.Generator seeded with its seed, the noise
is constant, and every forward pass (mapping, assignment, synthesis) is padded to a row count checked
on this device to give the full batch's bits (PassRows), so an image depends only on (seed, psi, mode,
cluster), the weights, the batch size and (on a CPU) torch's thread count, which picks kernels that
round differently; never on which other samples shared its batch.
"""

from __future__ import annotations

from functools import partial
from typing import Literal, Sequence

import numpy as np
import torch

from sdsg_ray.artifacts.checkpoint import load_inference
from sdsg_ray.artifacts.clusters import ClusterFile, ClusterSet
from sdsg_ray.errors import InvalidRequest
from sdsg_ray.imaging import encode_png, square_grid, to_uint8
from sdsg_ray.models import truncate
from sdsg_ray.pretrained import build_metric
from sdsg_ray.storage import get_storage
from sdsg_ray.truncation.assign import PassRows, build_assigner, render
from sdsg_ray.truncation.learned import CenterClassifier
from sdsg_ray.truncation.modes import (
    ASSIGNMENTS,
    NO_CENTER,
    SEED_MAX,
    TRUNCATION_MODES,
    AssignBy,
    InvalidSample,
    SampleSpec,
)


def seed_latent(seed: int, z_dim: int) -> torch.Tensor:
    """z [z_dim] for one seed, independent of every other sample."""
    if not 0 <= seed <= SEED_MAX:
        raise InvalidSample("seed", f"must be in [0, {SEED_MAX}], got {seed}")
    return torch.randn(z_dim, generator=torch.Generator().manual_seed(seed))


class Sampler:
    """Draws truncated samples from an InferenceBundle's G_ema, with optional multi-modal centers."""

    def __init__(self, bundle, clusters: ClusterSet | None = None, metric=None,
                 assign_by: AssignBy | Literal["auto"] = "auto", batch_size: int = 32,
                 assign_resolution: int | None = None) -> None:
        """``batch_size``: the most rows in one forward pass. A short pass is padded only up to the
        smallest row count verified bit-exact here (PassRows), so a lone request on a CPU costs a few
        rows, not a whole batch. ``assign_resolution``: compare G(w) and the centers at that coarser
        resolution (PerceptualAssigner); None: full images. ``assign_by``: the default assignment
        ('auto': learned when the clusters carry a classifier, else lpips); every rule whose inputs are
        here (lpips needs ``metric``, learned the classifier) is offered per sample (SampleSpec.assignment)."""
        self.G = bundle.G_ema.eval()
        self.device = next(self.G.parameters()).device
        self.bundle = bundle
        self.clusters = clusters
        self.batch_size = batch_size
        # Mean truncation's centre: the mean of the clusters' mapped latents when the clusters file has it
        # (exact for this G), else the w_avg tracked in training.
        w_mean = clusters.w_mean if clusters is not None else None
        self.w_avg = (w_mean if w_mean is not None else bundle.w_avg).to(self.device).float()
        with torch.no_grad():  # a few probe passes per candidate size, once per Sampler
            z = torch.stack([seed_latent(seed, self.G.z_dim) for seed in range(batch_size)])
            rows = PassRows.powers_of_two(batch_size).verified(self._map, z)
            self.rows = rows.verified(partial(render, self.G.synthesis), self._map(z))
        self.assigner = None
        self.assigners: dict[str, object] = {}
        self.assign_by = resolve_assignment(assign_by, clusters)
        if clusters is not None:
            if clusters.centers.shape[1] != self.G.w_dim:
                raise InvalidRequest(
                    f"clusters have w_dim {clusters.centers.shape[1]} but the generator has {self.G.w_dim}"
                )
            if clusters.checkpoint != bundle.identity:
                raise InvalidRequest(
                    f"clusters were fitted on checkpoint {clusters.checkpoint}, not {bundle.identity}: "
                    "run `sdsg cluster` for this checkpoint"
                )
            if assign_resolution is not None and assign_resolution not in self.G.synthesis.block_resolutions:
                raise InvalidRequest(f"assign_resolution must be one of this generator's block resolutions "
                                 f"{self.G.synthesis.block_resolutions}, got {assign_resolution}")
            self.centers = clusters.centers.to(self.device).float()
            classifier = (CenterClassifier.from_state(clusters.classifier) if clusters.classifier is not None
                          else None)
            available = [by for by in ASSIGNMENTS if by == self.assign_by or (by == "lpips" and metric is not None)
                         or (by == "learned" and classifier is not None) or by == "w"]
            self.assigners = {by: build_assigner(by, self.G.synthesis, self.centers, self.rows, metric,
                                                 assign_resolution, classifier) for by in available}
            self.assigner = self.assigners[self.assign_by]

    @property
    def resolution(self) -> int:
        return int(self.G.resolution)

    @property
    def num_clusters(self) -> int:
        return self.clusters.count if self.clusters is not None else 0

    @property
    def assignments(self) -> tuple[str, ...]:
        """The assignment rules a sample may ask for here (empty without clusters)."""
        return tuple(self.assigners)

    def validate(self, spec: SampleSpec) -> None:
        """Raise InvalidSample naming the bad field (:meth:`SampleSpec.check` with this model's clusters)."""
        spec.check(self.num_clusters if self.assigner is not None else 0, self.assignments)

    def _map(self, z: torch.Tensor) -> torch.Tensor:
        return self.G.mapping(z.to(self.device)).float()

    @property
    def pass_sizes(self) -> tuple[int, ...]:
        """Row counts the generator's passes run at (the assigner's may be fewer)."""
        return self.rows.sizes

    @torch.no_grad()
    def latents(self, seeds: Sequence[int]) -> torch.Tensor:
        """Untruncated w [B, w_dim] for the seeds, mapped in padded passes."""
        return self.rows.run(self._map, torch.stack([seed_latent(int(s), self.G.z_dim) for s in seeds]))

    @torch.no_grad()
    def truncated_latents(self, specs: Sequence[SampleSpec], w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """w_t [B, w_dim] for each spec's own psi, mode and cluster (B <= batch_size), and the center each
        sample was truncated toward, int64 [B] (NO_CENTER where its mode has none), so a client can say
        which cluster 'nearest' chose. Each mode computes the targets of its own samples, in one batch."""
        targets = torch.empty_like(w)
        center = torch.full((len(specs),), NO_CENTER, dtype=torch.long)
        for name, mode in TRUNCATION_MODES.items():
            rows = [i for i, s in enumerate(specs) if s.mode == name]
            if rows:
                targets[rows], chosen = mode.targets(self, [specs[i] for i in rows], w[rows])
                if chosen is not None:
                    center[rows] = torch.tensor(chosen, dtype=torch.long)
        psi = torch.tensor([s.psi if TRUNCATION_MODES[s.mode].uses_psi else 1.0 for s in specs], device=self.device)
        return truncate(w, targets, psi), center

    @torch.no_grad()
    def render_with_centers(self, specs: Sequence[SampleSpec]) -> tuple[np.ndarray, np.ndarray]:
        """Images for mixed per-item settings, uint8 NHWC [B, R, R, 3], and each one's center, int64 [B]
        (NO_CENTER where the mode has none): see :meth:`truncated_latents`."""
        for spec in specs:
            self.validate(spec)
        out, centers = [], []
        for start in range(0, len(specs), self.batch_size):
            chunk = specs[start:start + self.batch_size]
            w_t, center = self.truncated_latents(chunk, self.latents([s.seed for s in chunk]))
            out.append(to_uint8(render(self.G.synthesis, w_t, self.rows).cpu()))
            centers.append(center.numpy())
        images = np.concatenate(out) if out else np.zeros((0, self.resolution, self.resolution, 3), np.uint8)
        assert images.shape == (len(specs), self.resolution, self.resolution, 3), images.shape
        return images, (np.concatenate(centers) if centers else np.zeros(0, np.int64))

    def render_specs(self, specs: Sequence[SampleSpec]) -> np.ndarray:
        """Images for mixed per-item settings, uint8 NHWC [B, R, R, 3]."""
        return self.render_with_centers(specs)[0]

    def sample(self, seeds: Sequence[int], psi: float = 1.0, mode: str = "none",
               cluster: int | None = None) -> np.ndarray:
        """Images for the seeds with one setting, uint8 NHWC [B, R, R, 3]."""
        return self.render_specs([SampleSpec(int(s), float(psi), mode, cluster) for s in seeds])

    def center_images(self) -> np.ndarray:
        """G(c_k) for every center, uint8 NHWC [K, R, R, 3] (cached by the perceptual assigner)."""
        if self.assigner is None:
            raise ValueError("no clusters loaded")
        cached = getattr(self.assigner, "center_images", None)
        images = cached if cached is not None else render(self.G.synthesis, self.centers, self.rows)
        return to_uint8(images.cpu())

    def center_grid(self) -> bytes:
        """All center images in one PNG, row-major in cluster order."""
        images = self.center_images()
        return encode_png(square_grid(images))


def resolve_assignment(assign_by: str, clusters: ClusterSet | None) -> str:
    """'auto' -> 'learned' when the clusters file carries a classifier, else 'lpips' (the paper's rule)."""
    if assign_by != "auto":
        return assign_by
    return "learned" if clusters is not None and clusters.classifier is not None else "lpips"


def load_sampler(checkpoint: str, clusters: str | None = None, storage=None,
                 assign_by: AssignBy | Literal["auto"] = "auto", device: str | None = None, batch_size: int = 32,
                 assign_resolution: int | None = None) -> Sampler:
    """A Sampler from URIs: the checkpoint's G_ema, its clusters and the metric the clusters name (loaded
    whenever there are clusters, so the paper's LPIPS rule stays available per sample)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    bundle = load_inference(checkpoint, storage, device=device)
    cluster_set = ClusterFile(clusters).read(storage or get_storage()) if clusters else None
    metric = None
    if cluster_set is not None:
        metric = build_metric(cluster_set.metric, device=device, judge_resolution=cluster_set.judge_resolution)
    return Sampler(bundle, cluster_set, metric, assign_by=assign_by, batch_size=batch_size,
                   assign_resolution=assign_resolution)
