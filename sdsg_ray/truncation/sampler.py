"""The one way to sample: seed -> z -> w -> truncated w -> image, used by Serve, evaluation and the demo.

Truncation (w_t = psi * w + (1 - psi) * target):
  none        target = w (psi is ignored)
  mean        target = the global mean: the clusters file's w_mean when present, else w_avg (StyleGAN's trick)
  multimodal  target = the center nearest to w, or a forced one; "nearest" by the assignment rule:
              lpips (the paper: LPIPS between G(w) and G(c)), learned (a w -> center classifier fitted
              to the lpips rule by `sdsg cluster`, no extra synthesis pass) or w (Euclidean in W)

Reproducibility: each sample's z comes from its own torch.Generator seeded with its seed, the noise
is constant, and every forward pass (mapping, assignment, synthesis) is padded to a row count checked
on this device to give the full batch's bits (PassRows), so an image depends only on (seed, psi, mode,
cluster), the weights, the batch size and (on a CPU) torch's thread count, which picks kernels that
round differently; never on which other samples shared its batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Literal, Sequence, get_args

import numpy as np
import torch

from sdsg_ray.errors import InvalidRequest
from sdsg_ray.imaging import encode_png, square_grid, to_uint8
from sdsg_ray.models import truncate
from sdsg_ray.truncation.assign import ASSIGNMENTS, AssignBy, PassRows, build_assigner, render
from sdsg_ray.truncation.clusters import ClusterSet

Mode = Literal["none", "mean", "multimodal"]
MODES: tuple[str, ...] = get_args(Mode)
SEED_MAX = 2**32 - 1


class InvalidSample(InvalidRequest):
    """A sample outside the model's limits; ``field`` names the offending SampleSpec field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


@dataclass(frozen=True)
class SampleSpec:
    """One image to draw; a batch may mix settings freely."""

    seed: int
    psi: float = 1.0
    mode: Mode = "none"
    cluster: int | None = None  # force this center (multimodal only); None = nearest
    assignment: str | None = None  # rule picking the nearest center (multimodal); None = the model's default

    def check(self, num_clusters: int, assignments: Sequence[str] | None = None) -> None:
        """The one validation of a sample (the Sampler and the HTTP service both call it): raises
        InvalidSample naming the field. ``num_clusters``: centers loaded (0 = no multi-modal);
        ``assignments``: the assignment rules the model offers (None: not checked beyond the names)."""
        if not 0 <= self.seed <= SEED_MAX:
            raise InvalidSample("seed", f"must be in [0, {SEED_MAX}], got {self.seed}")
        if not 0.0 <= self.psi <= 1.0:
            raise InvalidSample("psi", f"must be in [0, 1], got {self.psi}")
        if self.mode not in MODES:
            raise InvalidSample("truncation", f"must be one of {MODES}, got {self.mode!r}")
        if self.mode == "multimodal" and num_clusters == 0:
            raise InvalidSample("truncation", "'multimodal' needs clusters (run `sdsg cluster`); use 'mean' or 'none'")
        if self.cluster is not None:
            if self.mode != "multimodal":
                raise InvalidSample("cluster", "a cluster can only be forced with truncation 'multimodal'")
            if not 0 <= self.cluster < num_clusters:
                raise InvalidSample("cluster", f"must be in [0, {num_clusters - 1}], got {self.cluster}")
        if self.assignment is not None:
            if self.assignment not in ASSIGNMENTS:
                raise InvalidSample("assignment", f"must be one of {ASSIGNMENTS}, got {self.assignment!r}")
            if self.mode != "multimodal" or self.cluster is not None:
                raise InvalidSample("assignment", "only applies to truncation 'multimodal' without a forced cluster")
            if assignments is not None and self.assignment not in assignments:
                raise InvalidSample("assignment", f"{self.assignment!r} is not available here; "
                                    f"available: {tuple(assignments)}")


NO_CENTER = -1  # the center index of a sample truncated toward none (modes 'none' and 'mean')


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
            classifier = None
            if clusters.classifier is not None:
                from sdsg_ray.truncation.learned import CenterClassifier

                classifier = CenterClassifier.from_state(clusters.classifier)
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
        sample was truncated toward, int64 [B] (NO_CENTER for modes 'none' and 'mean'), so a client can
        say which cluster 'nearest' chose."""
        targets = w.clone()
        center = torch.full((len(specs),), NO_CENTER, dtype=torch.long)
        is_mean = torch.tensor([s.mode == "mean" for s in specs], device=self.device)
        targets[is_mean] = self.w_avg
        forced = [i for i, s in enumerate(specs) if s.mode == "multimodal" and s.cluster is not None]
        if forced:
            center[forced] = torch.tensor([specs[i].cluster for i in forced])
        for by, assigner in self.assigners.items():
            nearest = [i for i, s in enumerate(specs)
                       if s.mode == "multimodal" and s.cluster is None and (s.assignment or self.assign_by) == by]
            if nearest:  # each assigner pads its own passes: a center never depends on the rest of the chunk
                center[nearest] = assigner.assign(w[nearest]).cpu()
        chosen = (center != NO_CENTER).nonzero().flatten().tolist()
        if chosen:
            targets[chosen] = self.centers[center[chosen].to(self.device)]
        psi = torch.tensor([s.psi if s.mode != "none" else 1.0 for s in specs], device=self.device)
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

    def sample(self, seeds: Sequence[int], psi: float = 1.0, mode: Mode = "none",
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
    from sdsg_ray.artifacts.checkpoint import load_inference
    from sdsg_ray.truncation.clusters import load_clusters

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    bundle = load_inference(checkpoint, storage, device=device)
    cluster_set = load_clusters(clusters, storage) if clusters else None
    metric = None
    if cluster_set is not None:
        from sdsg_ray.pretrained import build_metric

        metric = build_metric(cluster_set.metric, device=device, judge_resolution=cluster_set.judge_resolution)
    return Sampler(bundle, cluster_set, metric, assign_by=assign_by, batch_size=batch_size,
                   assign_resolution=assign_resolution)
