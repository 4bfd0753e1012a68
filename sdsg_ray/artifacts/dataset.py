"""The synthetic dataset `sdsg make-dataset` writes: the raw images X and the planted outliers' labels."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from sdsg_ray.storage import join


@dataclass(frozen=True)
class SyntheticDataset:
    """``sdsg make-dataset --out``: images/ (X), labels.csv (one row per image) and preview.png."""

    uri: str
    IMAGES_DIR: ClassVar[str] = "images"
    LABELS_FILE: ClassVar[str] = "labels.csv"
    PREVIEW_FILE: ClassVar[str] = "preview.png"

    @property
    def images(self) -> str:
        return join(self.uri, self.IMAGES_DIR)

    @property
    def labels(self) -> str:
        return join(self.uri, self.LABELS_FILE)

    @property
    def preview(self) -> str:
        return join(self.uri, self.PREVIEW_FILE)

    @classmethod
    def labels_of(cls, uri: str) -> str:
        """``uri`` itself if it names a .csv, else the labels file of the dataset directory ``uri``."""
        return uri if uri.endswith(".csv") else cls(uri).labels
