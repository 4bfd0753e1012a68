"""The filtered set Y as `sdsg select` leaves it: the kept manifest, the report and what a person looks at."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from sdsg_ray.artifacts.json_file import read_json, read_json_or_none, write_json
from sdsg_ray.storage import Storage, join


@dataclass(frozen=True)
class FilteredSet:
    """``sdsg select --out``: Y (a manifest of image keys), report.json, the figures and the curation page."""

    uri: str
    KEPT_FILE: ClassVar[str] = "kept.parquet"
    REPORT_FILE: ClassVar[str] = "report.json"
    HISTOGRAM_FILE: ClassVar[str] = "histogram.png"
    BOUNDS_FILE: ClassVar[str] = "fid_vs_threshold.png"  # Fig. 8
    EXAMPLES_FILE: ClassVar[str] = "best_worst.png"
    CURATION_PAGE_FILE: ClassVar[str] = "curation.html"
    CURATION_ASSETS_DIR: ClassVar[str] = "curation"

    @property
    def kept(self) -> str:
        return join(self.uri, self.KEPT_FILE)

    @property
    def report(self) -> str:
        return join(self.uri, self.REPORT_FILE)

    @property
    def histogram(self) -> str:
        return join(self.uri, self.HISTOGRAM_FILE)

    @property
    def bounds_figure(self) -> str:
        return join(self.uri, self.BOUNDS_FILE)

    @property
    def examples_figure(self) -> str:
        return join(self.uri, self.EXAMPLES_FILE)

    @property
    def curation_page(self) -> str:
        return join(self.uri, self.CURATION_PAGE_FILE)

    @property
    def curation_assets(self) -> str:
        return join(self.uri, self.CURATION_ASSETS_DIR)

    def read_report(self, storage: Storage) -> dict[str, Any]:
        return read_json(self.report, storage, missing=f"is {self.uri} the --out of `sdsg select`?")

    def read_report_or_none(self, storage: Storage) -> dict[str, Any] | None:
        return read_json_or_none(self.report, storage)

    def write_report(self, report: dict[str, Any], storage: Storage) -> str:
        return write_json(self.report, report, storage)
