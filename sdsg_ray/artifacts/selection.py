"""The filtered set Y as `sdsg select` leaves it: the kept manifest, the report and what a person looks at."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sdsg_ray.artifacts.base import Artifact, Member
from sdsg_ray.artifacts.json_file import read_json, read_json_or_none, write_json
from sdsg_ray.storage import Storage, join

# report.json's best/worst rows give d(x) under this key (the name predates other metrics; kept for its readers)
EXAMPLE_SCORE_KEY = "d_lpips"


@dataclass(frozen=True)
class FilteredSet(Artifact):
    """``sdsg select --out``."""

    kept = Member("kept.parquet", "Y: the kept image keys (a manifest every stage reads as a data source)")
    report = Member("report.json", "θ, |Y|, both bounds of Fig. 8, outlier precision/recall")
    histogram = Member("histogram.png", "d(x) histogram with the chosen θ")
    bounds_figure = Member("fid_vs_threshold.png", "Fig. 8: distance of Y to X against θ, with both bounds")
    examples_figure = Member("best_worst.png", "best and worst reconstructions")
    curation_page = Member("curation.html", "the static curation page (θ slider, x beside G(E(x)))")
    curation_assets = Member("curation", "the curation page's sprites")

    def asset(self, name: str) -> str:
        """A file of the curation page's assets (its sprites), by its name inside ``curation_assets``."""
        return join(self.curation_assets, name)

    def read_report(self, storage: Storage) -> dict[str, Any]:
        return read_json(self.report, storage, missing=f"is {self.uri} the --out of `sdsg select`?")

    def read_report_or_none(self, storage: Storage) -> dict[str, Any] | None:
        return read_json_or_none(self.report, storage)

    def write_report(self, report: dict[str, Any], storage: Storage) -> str:
        return write_json(self.report, report, storage)
