"""The perceptual metrics the project can judge with: one registry, whose names are the config's choices.

Scoring's d(x) = metric(x, G(E(x))), the controls, the selection's examples, multi-modal truncation's
perceptual assignment and training's reconstruction loss all build their metric from an entry here
(:func:`sdsg_ray.pretrained.build_metric`). ``score.metric``, ``train.metric`` and ``clusters.metric`` accept
"auto" or a registered name, checked when a config is validated, so a later entry (a plugin, a test) is
accepted too. Importing this module imports no torch: an entry builds its network only when asked.

An entry is a description, ``available`` (are its weights here? what "auto" asks, in registration order)
and ``build``, which returns a :class:`sdsg_ray.pretrained.PerceptualMetric`. Nothing assumes LPIPS: a new
metric is one PerceptualMetric subclass (features of a judged image, distance between features) and one
``METRICS.register(name, entry)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from sdsg_ray.registry import Registry

if TYPE_CHECKING:
    from sdsg_ray.pretrained import PerceptualMetric

AUTO = "auto"  # the best available entry, in registration order (the paper used LPIPS-VGG)


class MetricEntry(Protocol):
    description: str

    def available(self) -> tuple[bool, str]:
        """(usable here, why): whether the weights are present, without building anything."""

    def build(self, name: str, judge_resolution: int | None) -> "PerceptualMetric":
        """The metric named ``name`` on the CPU, judging at ``judge_resolution`` px (None: the input's size)."""


METRICS: Registry[MetricEntry] = Registry("perceptual metric")


def metric_choice(name: str) -> str:
    """The config's check of a metric name: "auto" or a registered entry."""
    if name != AUTO and name not in METRICS:
        raise ValueError(f"unknown perceptual metric {name!r}; choose one of: {', '.join((AUTO, *METRICS))}")
    return name


@dataclass(frozen=True)
class LpipsEntry:
    """An LPIPS-family network: ``family`` "lpips" (the ``lpips`` package, torchvision's ImageNet trunk) or
    "stlpips" (shift-tolerant LPIPS, trunk and heads in the wheel: works offline), trunk ``net``."""

    family: str
    net: str
    description: str

    def available(self) -> tuple[bool, str]:
        from sdsg_ray.pretrained import lpips_weights  # deferred: torch

        path = lpips_weights(self.family, self.net)
        return path.is_file(), f"{path} {'found' if path.is_file() else 'missing'}"

    def build(self, name: str, judge_resolution: int | None) -> "PerceptualMetric":
        from sdsg_ray.pretrained import LpipsMetric  # deferred: torch

        return LpipsMetric.load(name, self.family, self.net, judge_resolution)


# Registration order is "auto"'s order of preference.
METRICS.register("lpips-vgg", LpipsEntry("lpips", "vgg", "LPIPS with the VGG-16 trunk, as in the paper"))
METRICS.register("lpips-alex", LpipsEntry("lpips", "alex", "LPIPS with the AlexNet trunk"))
METRICS.register("stlpips-vgg", LpipsEntry("stlpips", "vgg", "shift-tolerant LPIPS, VGG-16 trunk (offline)"))
METRICS.register("stlpips-alex", LpipsEntry("stlpips", "alex", "shift-tolerant LPIPS, AlexNet trunk (offline, "
                                            "the default for CPU work)"))
