"""Truncation modes: where each sample's w is pulled to, one registered entry per mode.

Truncation is w_t = psi * w + (1 - psi) * target (:func:`sdsg_ray.models.truncate`); a mode is the choice of
target, and everything about it lives in its entry here:
  none        target = w (psi is ignored)
  mean        target = the global mean: the clusters file's w_mean when present, else w_avg (StyleGAN's trick)
  multimodal  target = the center nearest to w, or a forced one; "nearest" by the assignment rule:
              lpips (the paper: LPIPS between G(w) and G(c)), learned (a w -> center classifier fitted
              to the lpips rule by `sdsg cluster`, no extra synthesis pass) or w (Euclidean in W)

The Sampler, the HTTP schema and page, ``sdsg generate``'s config, evaluation, the report and the figures
all iterate :data:`TRUNCATION_MODES`, so a new mode is one :class:`TruncationMode` subclass and one
``register`` call in this file. No torch import (config.py validates against this module): a mode's maths
works on the tensors the Sampler hands it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Sequence, get_args

from sdsg_ray.errors import InvalidRequest
from sdsg_ray.registry import Registry, UnknownEntry

AssignBy = Literal["lpips", "learned", "w"]  # multimodal's rules for "nearest" (truncation/assign.py)
ASSIGNMENTS: tuple[str, ...] = get_args(AssignBy)
SEED_MAX = 2**32 - 1
NO_CENTER = -1  # the center index of a sample whose mode truncates toward no cluster center


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
    mode: str = "none"  # a name in TRUNCATION_MODES
    cluster: int | None = None  # force this center (modes toward cluster centers); None = nearest
    assignment: str | None = None  # rule picking the nearest center; None = the model's default

    def check(self, num_clusters: int, assignments: Sequence[str] | None = None) -> None:
        """The one validation of a sample (the Sampler and the HTTP service both call it): raises
        InvalidSample naming the field. ``num_clusters``: centers loaded (0 = none); ``assignments``: the
        assignment rules the model offers (None: not checked beyond the names)."""
        if not 0 <= self.seed <= SEED_MAX:
            raise InvalidSample("seed", f"must be in [0, {SEED_MAX}], got {self.seed}")
        if not 0.0 <= self.psi <= 1.0:
            raise InvalidSample("psi", f"must be in [0, 1], got {self.psi}")
        try:
            mode = TRUNCATION_MODES[self.mode]
        except UnknownEntry as err:
            raise InvalidSample("truncation", str(err)) from None
        mode.check(self, num_clusters, assignments)


@dataclass(frozen=True)
class Curve:
    """One line of the paper's Fig. 7 (distance to the training set against psi)."""

    name: str  # its key in results.json's "truncation" and its column in the report's table
    legend: str
    style: str  # matplotlib format string
    agrees_with: str | None = None  # another curve's name: record how often both pinned the same center
    beats: str | None = None  # another curve's name: the report's claim that this one is lower at every psi < 1
    claim: str = ""  # how the report words that claim


class TruncationMode:
    """A mode with no cluster centers; subclass it, name it, and give :meth:`targets`."""

    name = ""
    label = ""  # what it truncates toward, in a few words (the sampler page and the help text show it)
    uses_psi = True  # False: psi is ignored and w is drawn as is
    uses_clusters = False  # True: truncates toward cluster centers (needs them; a sample may force one)
    curves: tuple[Curve, ...] = ()  # every Fig. 7 line it may draw, in drawing order

    def check(self, spec: SampleSpec, num_clusters: int, assignments: Sequence[str] | None) -> None:
        """Raise InvalidSample when ``spec`` asks this mode for something it does not take."""
        if spec.cluster is not None:
            raise InvalidSample("cluster", f"a cluster can only be forced with truncation toward cluster centers "
                                f"({', '.join(cluster_modes())}), not {self.name!r}")
        if spec.assignment is not None:
            raise InvalidSample("assignment", f"only applies to truncation toward cluster centers "
                                f"({', '.join(cluster_modes())}) without a forced cluster")

    def available(self, sampler: Any) -> bool:
        """Whether ``sampler`` (a truncation.sampler.Sampler) can draw this mode."""
        return True

    def targets(self, sampler: Any, specs: Sequence[SampleSpec], w: Any) -> tuple[Any, list[int] | None]:
        """The target of each of ``specs`` (all of this mode), [B, w_dim] on w's device, and the center each
        was truncated toward (None: the mode has no centers). ``w`` [B, w_dim]: their untruncated latents."""
        raise NotImplementedError

    def fig7_lines(self, sampler: Any) -> list[tuple[Curve, str | None]]:
        """The Fig. 7 curves ``sampler`` draws for this mode, each with the assignment rule that pins every
        seed's center once for all psi (None: no centers)."""
        return [(curve, None) for curve in self.curves] if self.available(sampler) else []

    def grid_label(self, psi: float) -> str:
        """Its row label in Fig. 4."""
        return f"{self.name}, ψ={psi}" if self.uses_psi else self.name


class NoTruncation(TruncationMode):
    name, label, uses_psi = "none", "no truncation", False

    def targets(self, sampler, specs, w):
        return w, None


class MeanTruncation(TruncationMode):
    name, label = "mean", "StyleGAN's global mean"
    curves = (Curve("mean", "mean truncation", "o--"),)

    def targets(self, sampler, specs, w):
        return sampler.w_avg.expand_as(w), None


class MultimodalTruncation(TruncationMode):
    """Mokady et al. 2022, Sec. 4: toward the nearest KMeans center of W (or a forced one)."""

    name, label, uses_clusters = "multimodal", "nearest cluster center", True
    curves = (Curve("multimodal", "multimodal truncation", "s-", beats="mean",
                    claim="Fig. 7: multi-modal truncation beats mean truncation at every ψ < 1"),
              Curve("multimodal_learned", "multimodal, learned assignment", "^:", agrees_with="multimodal"))

    def check(self, spec, num_clusters, assignments):
        if num_clusters == 0:
            raise InvalidSample("truncation", f"{self.name!r} needs clusters (run `sdsg cluster`); "
                                f"use one of {[n for n in TRUNCATION_MODES if n not in cluster_modes()]}")
        if spec.cluster is not None and not 0 <= spec.cluster < num_clusters:
            raise InvalidSample("cluster", f"must be in [0, {num_clusters - 1}], got {spec.cluster}")
        if spec.assignment is not None:
            if spec.assignment not in ASSIGNMENTS:
                raise InvalidSample("assignment", f"must be one of {ASSIGNMENTS}, got {spec.assignment!r}")
            if spec.cluster is not None:
                raise InvalidSample("assignment", "only applies without a forced cluster")
            if assignments is not None and spec.assignment not in assignments:
                raise InvalidSample("assignment", f"{spec.assignment!r} is not available here; "
                                    f"available: {tuple(assignments)}")

    def available(self, sampler):
        return sampler.assigner is not None

    def targets(self, sampler, specs, w):
        chosen = [spec.cluster for spec in specs]  # forced centers; None: the nearest by the spec's rule
        for by, assigner in sampler.assigners.items():
            nearest = [i for i, s in enumerate(specs) if s.cluster is None and (s.assignment or sampler.assign_by) == by]
            if nearest:  # each assigner pads its own passes: a center never depends on the rest of the chunk
                for i, k in zip(nearest, assigner.assign(w[nearest]).tolist()):
                    chosen[i] = k
        return sampler.centers[chosen], chosen

    def fig7_lines(self, sampler):
        """The sampler's own rule (the paper's LPIPS one in run_evaluation), and the learned rule beside it
        when the clusters file has its classifier: does the cheaper rule change quality?"""
        if not self.available(sampler):
            return []
        default, learned = self.curves
        lines = [(default, sampler.assign_by)]
        if "learned" in sampler.assignments and sampler.assign_by != "learned":
            lines.append((learned, "learned"))
        return lines


TRUNCATION_MODES: Registry[TruncationMode] = Registry("truncation mode")  # in the order figures and the page list them
TRUNCATION_MODES.register(NoTruncation.name, NoTruncation())
TRUNCATION_MODES.register(MeanTruncation.name, MeanTruncation())
TRUNCATION_MODES.register(MultimodalTruncation.name, MultimodalTruncation())


def cluster_modes() -> list[str]:
    """The registered modes that truncate toward cluster centers."""
    return [name for name, mode in TRUNCATION_MODES.items() if mode.uses_clusters]


def fig7_curves() -> list[Curve]:
    """Every registered Fig. 7 curve, in drawing order (figures, the report and the evaluation log)."""
    return [curve for _, mode in TRUNCATION_MODES.items() for curve in mode.curves]
