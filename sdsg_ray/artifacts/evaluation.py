"""What `sdsg evaluate` leaves: results.json and the paper's figures."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from sdsg_ray.artifacts.json_file import read_json, read_json_or_none, write_json
from sdsg_ray.storage import Storage, join


@dataclass(frozen=True)
class EvaluationResults:
    """``sdsg evaluate --out``: results.json, Fig. 7 (distance vs psi) and Fig. 4 (truncation grid)."""

    uri: str
    RESULTS_FILE: ClassVar[str] = "results.json"
    FIG7_FILE: ClassVar[str] = "fid_vs_psi.png"
    FIG4_FILE: ClassVar[str] = "truncation_grid.png"

    @property
    def results(self) -> str:
        return join(self.uri, self.RESULTS_FILE)

    @property
    def fig7(self) -> str:
        return join(self.uri, self.FIG7_FILE)

    @property
    def fig4(self) -> str:
        return join(self.uri, self.FIG4_FILE)

    def read(self, storage: Storage) -> dict[str, Any]:
        return read_json(self.results, storage, missing=f"is {self.uri} the --out of `sdsg evaluate`?")

    def read_or_none(self, storage: Storage) -> dict[str, Any] | None:
        return read_json_or_none(self.results, storage)

    def write(self, results: dict[str, Any], storage: Storage) -> str:
        return write_json(self.results, results, storage)
