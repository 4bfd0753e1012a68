"""What `sdsg evaluate` leaves: results.json and the paper's figures."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sdsg_ray.artifacts.base import Artifact, Member
from sdsg_ray.artifacts.json_file import read_json_or_none, write_json
from sdsg_ray.storage import Storage


@dataclass(frozen=True)
class EvaluationResults(Artifact):
    """``sdsg evaluate --out``."""

    results = Member("results.json", "FD/KID per model, Fig. 7's curves, the outlier table, the controls")
    fig7 = Member("fid_vs_psi.png", "Fig. 7: distance to the data against ψ, one curve per truncation mode")
    fig4 = Member("truncation_grid.png", "Fig. 4: samples per truncation mode")

    def read_or_none(self, storage: Storage) -> dict[str, Any] | None:
        return read_json_or_none(self.results, storage)

    def write(self, results: dict[str, Any], storage: Storage) -> str:
        return write_json(self.results, results, storage)
