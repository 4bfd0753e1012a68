"""The synthetic dataset `sdsg make-dataset` writes: the raw images X and the planted outliers' labels."""

from __future__ import annotations

from dataclasses import dataclass

from sdsg_ray.artifacts.base import Artifact, Member


@dataclass(frozen=True)
class SyntheticDataset(Artifact):
    """``sdsg make-dataset --out``."""

    images = Member("images", "X: one .jpg or .png per image")
    labels = Member("labels.csv", "one row per image: its mode or planted outlier kind")
    preview = Member("preview.png", "inliers by mode and outliers by kind")

    @classmethod
    def labels_of(cls, uri: str) -> str:
        """``uri`` itself if it names a .csv, else the labels file of the dataset directory ``uri``."""
        return uri if uri.endswith(".csv") else cls(uri).labels
