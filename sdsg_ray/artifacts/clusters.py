"""Multi-modal truncation centers on storage: clusters.pt."""

from __future__ import annotations

from dataclasses import dataclass

from sdsg_ray.artifacts.base import Artifact, Member


@dataclass(frozen=True)
class ClusterFile(Artifact):
    """``sdsg cluster --out`` (or the file itself)."""

    clusters = Member("clusters.pt", "KMeans centers, their sizes, the judge, the learned assignment")

    @property
    def file(self) -> str:
        return self.uri if self.uri.endswith(".pt") else self.clusters
