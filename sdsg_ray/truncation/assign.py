"""Which center a new w truncates toward.

The paper picks the center whose image is perceptually nearest: argmin_k LPIPS(G(w), G(c_k)); a user
study preferred it to the Euclidean nearest center in W (Table 5), which is kept as an ablation.
The K center images never change, so their perceptual features are computed once; a batch of B
samples then costs one feature pass plus a [B, K] distance, never B*K LPIPS calls.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from sdsg_ray.truncation.modes import ASSIGNMENTS, AssignBy

NOISE_MODE = "const"  # the same w must always give the same image, for samples and for centers alike


class LatentAssigner:
    """Nearest center by Euclidean distance in W (the ablation)."""

    def __init__(self, centers: torch.Tensor) -> None:
        self.centers = centers

    @torch.no_grad()
    def assign(self, w: torch.Tensor) -> torch.Tensor:
        """w [B, w_dim] -> center index [B] (int64)."""
        # Exact per-pair distances (the matmul shortcut rounds differently with the batch size).
        d = torch.cdist(w.float(), self.centers.to(w.device).float(), compute_mode="donot_use_mm_for_euclid_dist")
        return d.argmin(dim=1)


class PassRows:
    """The row counts forward passes run at, so that an image never depends on what shared its batch.

    Conv and matmul kernels pick their reduction order by tensor shape, so the same w can give other
    bits in a 1-row pass than in a 16-row one (docs/benchmarks.md has what was seen on a CPU).
    Every pass is therefore padded, by repeating its last row, up to one of ``sizes``: row counts whose
    outputs were checked bit-identical on this device. Padding every pass to B is safe anywhere and
    free on a GPU, but makes a lone request on a CPU pay for a whole batch; ``powers_of_two(B)``
    proposes 1, 2, 4, ... and B instead, to be narrowed by :meth:`verified`.
    """

    def __init__(self, sizes: Sequence[int]) -> None:
        self.sizes = tuple(sorted(set(int(n) for n in sizes)))
        assert self.sizes and self.sizes[0] > 0, sizes

    @classmethod
    def powers_of_two(cls, max_rows: int) -> "PassRows":
        return cls([2**k for k in range(max_rows.bit_length()) if 2**k < max_rows] + [max_rows])

    @property
    def max_rows(self) -> int:
        return self.sizes[-1]

    def rows_for(self, n: int) -> int:
        """The smallest allowed pass size holding n rows (n <= max_rows)."""
        return next(size for size in self.sizes if size >= n)

    def run(self, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """fn over x in chunks of at most max_rows, each padded to an allowed size; padding rows dropped."""
        return torch.cat([fn(pad_rows(c, self.rows_for(len(c))))[:len(c)] for c in x.split(self.max_rows)])

    @torch.no_grad()
    def verified(self, fn: Callable[[torch.Tensor], torch.Tensor], probe: torch.Tensor) -> "PassRows":
        """The sizes at which fn gives every row the bits a full pass gives it, at any row position.

        ``probe`` has max_rows distinct rows; the full size itself is always kept (it is the reference).
        Kernel choice depends on shapes, not values, so one probe speaks for every input of that shape.
        """
        assert len(probe) == self.max_rows, (len(probe), self.max_rows)
        full, flipped = fn(probe), fn(probe.flip(0))
        keep = [n for n in self.sizes[:-1]
                if torch.equal(fn(probe[:n]), full[:n]) and torch.equal(fn(probe.flip(0)[:n]), flipped[:n])]
        return PassRows(keep + [self.max_rows])


class PerceptualAssigner:
    """Nearest center by the perceptual metric between G(w) and G(c), center features cached.

    ``resolution``: compare the generator's coarse skip images at that resolution instead of the full
    images (None, the paper's choice); G(w) is then drawn only up to that block, which is most of the
    saving on a large generator. Samples and centers are always compared at the same resolution.
    """

    def __init__(self, synthesis: torch.nn.Module, centers: torch.Tensor, metric, rows: PassRows,
                 resolution: int | None = None) -> None:
        self.synthesis = synthesis
        self.metric = metric
        self.centers = centers
        self.resolution = resolution
        self.center_images = render(synthesis, centers, rows)  # [K, 3, R, R] in [-1, 1], for grids
        compared = self.center_images if resolution is None else render(synthesis, centers, rows, resolution)
        with torch.no_grad():
            # Per-layer features of each chunk, concatenated along the batch: [K, C_l, H_l, W_l] per layer.
            chunks = [metric.features(x) for x in compared.split(rows.max_rows)]
            self.center_features = [torch.cat(layer) for layer in zip(*chunks)]
        # The metric's kernels are not the generator's: check the whole assignment pass on its own.
        probe = centers.repeat(math.ceil(rows.max_rows / len(centers)), 1)[:rows.max_rows]
        self.rows = rows.verified(self._assign_pass, probe)

    def _distance_pass(self, images: torch.Tensor) -> torch.Tensor:
        return self.metric.pairwise_distance_from_features(self.metric.features(images), self.center_features)

    def _assign_pass(self, w: torch.Tensor) -> torch.Tensor:
        return self._distance_pass(render(self.synthesis, w, resolution=self.resolution))

    @torch.no_grad()
    def distances(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, r, r] in [-1, 1] (r: the compared resolution) -> distance to every center, [B, K]."""
        d = self.rows.run(self._distance_pass, images)
        assert d.shape == (images.shape[0], self.centers.shape[0]), d.shape
        return d

    @torch.no_grad()
    def latent_distances(self, w: torch.Tensor) -> torch.Tensor:
        """w [B, w_dim] -> distance of G(w) to every center, [B, K] (what :meth:`assign` takes the argmin of)."""
        return self.rows.run(self._assign_pass, w)

    @torch.no_grad()
    def assign(self, w: torch.Tensor) -> torch.Tensor:
        """w [B, w_dim] -> index [B] of the perceptually nearest center: one render and one feature pass."""
        return self.latent_distances(w).argmin(dim=1)


class LearnedAssigner:
    """The LPIPS choice predicted from w alone by the classifier `sdsg cluster` fitted (truncation/learned.py):
    no render, no feature pass. Passes are padded like the generator's, so a choice never depends on the batch."""

    def __init__(self, classifier, centers: torch.Tensor, rows: PassRows) -> None:
        self.classifier = classifier.to(centers.device)
        self.centers = centers
        probe = centers.repeat(math.ceil(rows.max_rows / len(centers)), 1)[:rows.max_rows]
        self.rows = rows.verified(self.classifier.logits, probe)

    @torch.no_grad()
    def assign(self, w: torch.Tensor) -> torch.Tensor:
        """w [B, w_dim] -> predicted center index [B]."""
        return self.rows.run(self.classifier.logits, w.float()).argmax(dim=1)


@torch.no_grad()
def render(synthesis: torch.nn.Module, w: torch.Tensor, rows: PassRows | None = None,
           resolution: int | None = None) -> torch.Tensor:
    """G(w) with constant noise, float [B, 3, r, r] in [-1, 1]; passes padded as ``rows`` allows.

    Without ``rows``: one pass of exactly B rows (bits may then depend on B, see PassRows).
    ``resolution``: the coarse skip image at that resolution (default: the full image).
    """
    device = next(synthesis.parameters()).device

    def one_pass(chunk: torch.Tensor) -> torch.Tensor:
        return synthesis(chunk.to(device), noise_mode=NOISE_MODE, max_resolution=resolution).float()

    return one_pass(w) if rows is None else rows.run(one_pass, w)


def pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """x [n, ...] -> [rows, ...] by repeating the last row (n <= rows)."""
    assert 0 < len(x) <= rows, (len(x), rows)
    return torch.cat([x, x[-1:].expand(rows - len(x), *x.shape[1:])]) if len(x) < rows else x


def build_assigner(by: AssignBy, synthesis: torch.nn.Module, centers: torch.Tensor, rows: PassRows,
                   metric=None, resolution: int | None = None, classifier=None):
    """The assigner for ``by``; the perceptual one needs the metric the centers were fitted with, the
    learned one the classifier saved with them."""
    if by == "w":
        return LatentAssigner(centers)
    if by == "learned":
        if classifier is None:
            raise ValueError("assign_by='learned' needs a clusters file with a classifier (rerun `sdsg cluster`)")
        return LearnedAssigner(classifier, centers, rows)
    if by == "lpips":
        if metric is None:
            raise ValueError("assign_by='lpips' needs a perceptual metric (pretrained.build_metric)")
        return PerceptualAssigner(synthesis, centers, metric, rows, resolution)
    raise ValueError(f"assign_by must be one of {ASSIGNMENTS}, got {by!r}")
