"""The synthetic Internet-like dataset: deterministic, labelled truthfully, not separable by colour."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sdsg_ray.artifacts.dataset import read_labels
from sdsg_ray.dataset.synthetic import MODES, OUTLIER_KINDS, make_dataset
from sdsg_ray.imaging import load_batch
from sdsg_ray.manifest import list_images
from sdsg_ray.storage import Storage, join


@pytest.fixture(scope="module")
def storage() -> Storage:
    return Storage()


@pytest.fixture(scope="module")
def big(tmp_path_factory, storage):
    """600 images at 32 px, 15% outliers: enough for every kind and a stable cross-validated AUROC."""
    out = str(tmp_path_factory.mktemp("big"))
    return out, make_dataset(out, 600, 32, 0.15, 0, storage)


def _files(storage: Storage, out: str) -> dict[str, bytes]:
    return {uri[len(out):]: storage.read_bytes(uri) for uri in storage.list(join(out, "images"))}


def test_deterministic_by_seed(tmp_path, storage):
    a, b, c = (str(tmp_path / name) for name in "abc")
    make_dataset(a, 40, 16, 0.25, 7, storage)
    make_dataset(b, 40, 16, 0.25, 7, storage)
    make_dataset(c, 40, 16, 0.25, 8, storage)
    files_a, files_b, files_c = _files(storage, a), _files(storage, b), _files(storage, c)
    assert files_a == files_b  # same names, same bytes
    assert storage.read_text(join(a, "labels.csv")).replace(a, "") == storage.read_text(join(b, "labels.csv")).replace(b, "")
    assert files_a != files_c
    assert sum(files_a.get(k) == v for k, v in files_c.items()) < 5


def test_labels_match_what_was_written(big, storage):
    out, summary = big
    rows = read_labels(out, storage)
    listed = list(list_images(join(out, "images"), storage))
    assert sorted(r["key"] for r in rows) == listed  # keys are exactly the listing's full URIs
    assert len(rows) == 600 and summary["outliers"] == sum(r["is_outlier"] for r in rows) == 90
    assert {r["kind"] for r in rows if r["is_outlier"]} == set(OUTLIER_KINDS)
    assert {r["mode"] for r in rows if not r["is_outlier"]} == set(MODES)
    assert all(r["mode"] == "" for r in rows if r["is_outlier"])
    suffixes = {r["key"].rsplit(".", 1)[1] for r in rows}
    assert suffixes == {"jpg", "png"}
    batch = load_batch([r["key"] for r in rows[:50]], storage, 32)
    assert (batch["status"] == "ok").all()
    preview = Image.open(join(out, "preview.png"))  # outside images/: never part of the image set
    assert preview.size[0] >= 8 * 64 and preview.size[1] >= (len(MODES) + len(OUTLIER_KINDS)) * 64


def _colour_stats(images: np.ndarray) -> np.ndarray:
    """Per-channel mean and std plus a 4x4x4 colour histogram: what an untrained model could exploit."""
    x = images.astype(np.float32) / 255.0
    q = np.minimum((x * 4).astype(int), 3)
    bins = q[..., 0] * 16 + q[..., 1] * 4 + q[..., 2]
    hist = np.stack([np.bincount(b.ravel(), minlength=64) for b in bins]) / bins[0].size
    return np.concatenate([x.mean((1, 2)), x.std((1, 2)), hist], axis=1)


def test_outliers_not_separable_by_colour_statistics(big, storage):
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    out, _ = big
    rows = read_labels(out, storage)
    images = load_batch([r["key"] for r in rows], storage, 32)["image"]
    y = np.array([r["is_outlier"] for r in rows])
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    scores = cross_val_predict(model, _colour_stats(images), y, cv=StratifiedKFold(5, shuffle=True, random_state=0),
                               method="predict_proba")[:, 1]
    auroc = roc_auc_score(y, scores)
    assert auroc < 0.75, auroc


def test_edge_fractions(tmp_path, storage):
    assert make_dataset(str(tmp_path / "none"), 10, 16, 0.0, 0, storage)["outliers"] == 0
    assert make_dataset(str(tmp_path / "all"), 10, 16, 1.0, 0, storage)["kinds"]["inlier"] == 0
    with pytest.raises(ValueError, match="outlier_fraction"):
        make_dataset(str(tmp_path / "bad"), 10, 16, 1.5, 0, storage)


def test_writes_to_s3(s3_bucket, storage):
    out = join(s3_bucket, "raw")
    make_dataset(out, 12, 16, 0.25, 1, storage)
    rows = read_labels(out, storage)
    assert sorted(r["key"] for r in rows) == list(list_images(join(out, "images"), storage))
    assert all(r["key"].startswith(f"{s3_bucket}/raw/images/") for r in rows)
