"""Multi-modal truncation centers on storage: clusters.pt."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from sdsg_ray.storage import join


@dataclass(frozen=True)
class ClusterFile:
    """``sdsg cluster --out``: clusters.pt (centers, sizes, the assignment classifier); ``uri`` may name the file."""

    uri: str
    CLUSTERS_FILE: ClassVar[str] = "clusters.pt"

    @property
    def file(self) -> str:
        return self.uri if self.uri.endswith(".pt") else join(self.uri, self.CLUSTERS_FILE)
