"""The synthetic dataset `sdsg make-dataset` writes: the raw images X and the planted outliers' labels."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass

from sdsg_ray.artifacts.base import Artifact, Member
from sdsg_ray.storage import Storage


@dataclass(frozen=True)
class SyntheticDataset(Artifact):
    """``sdsg make-dataset --out``."""

    images = Member("images", "X: one .jpg or .png per image")
    labels = Member("labels.csv", "one row per image: its mode or planted outlier kind")
    preview = Member("preview.png", "inliers by mode and outliers by kind")


def read_labels(uri: str, storage: Storage) -> list[dict]:
    """Rows of a dataset's labels (its directory, or the .csv itself) with typed ``is_outlier``."""
    labels = uri if uri.endswith(".csv") else SyntheticDataset(uri).labels
    rows = list(csv.DictReader(io.StringIO(storage.read_text(labels))))
    for row in rows:
        row["is_outlier"] = row["is_outlier"] == "1"
    return rows
