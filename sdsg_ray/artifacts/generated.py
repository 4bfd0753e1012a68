"""What `sdsg generate` leaves: one PNG per seed and their grid."""

from __future__ import annotations

from dataclasses import dataclass

from sdsg_ray.artifacts.base import Artifact, Member
from sdsg_ray.storage import join


@dataclass(frozen=True)
class GeneratedImages(Artifact):
    """``sdsg generate --out``."""

    grid = Member("grid.png", "every seed's image, row-major in seed order")

    def image(self, seed: int) -> str:
        """seedNNNN.png: one seed's image, as NVIDIA's gen_images.py names it."""
        return join(self.uri, f"seed{seed:04d}.png")
