"""curation.html's data: the stratified thumbnail sample, and numbers that equal report.json's at every θ
of the grid (counts) and at the chosen θ (precision and recall). A real selection over score shards of
real images (the synthetic dataset) with a real G and E (untrained: the thumbnails only need some G(E(x)));
no Ray. The page itself runs in a browser in tests/test_pages.py."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from sdsg_ray.artifacts.scores import SCORE_COLUMN, ScoreSet, ShardAssembler
from sdsg_ray.artifacts.selection import FilteredSet
from sdsg_ray.config import load_config
from sdsg_ray.filtering.curation_page import allocate, sample_by_score
from sdsg_ray.filtering.select import run_selection
from sdsg_ray.storage import get_storage, join


def make_small_selection(root: Path, n: int = 120, page_images: int = 2000, **select: object) -> dict:
    """The synthetic dataset (real images, planted outliers), a stage-1-like checkpoint (untrained G and
    E), score shards whose d(x) ranks the outliers high (drawn, not computed: scoring is tested elsewhere)
    and ``sdsg select`` over them with the labels. Returns report.json plus the paths."""
    import torch

    from sdsg_ray.artifacts.checkpoint import export_inference
    from sdsg_ray.config import build_config
    from sdsg_ray.artifacts.dataset import read_labels
    from sdsg_ray.dataset.synthetic import make_dataset
    from sdsg_ray.diagnostics import untrained_networks

    storage = get_storage()
    data = str(root / "data")
    make_dataset(data, n=n, resolution=32, outlier_fraction=0.2, seed=0, storage=storage)
    labels = read_labels(data, storage)
    model = build_config(("set", {"model.resolution": 32, "model.channel_base": 256, "model.channel_max": 16,
                                  "model.z_dim": 16, "model.w_dim": 16, "model.mapping_layers": 1})).model
    G, E = untrained_networks(model, seed=1)
    ckpt = str(root / "stage1" / "inference.pt")
    with torch.no_grad():
        export_inference(G, E, model, {"stage": "joint"}, ckpt, storage, E_ema=E)
    rng = np.random.default_rng(0)
    outlier = np.array([row["is_outlier"] for row in labels])
    d = np.where(outlier, rng.uniform(0.35, 0.7, len(labels)), rng.uniform(0.1, 0.45, len(labels))).astype(np.float32)
    feat = (rng.normal(0, 1, (len(labels), 8)) + 2 * outlier[:, None]).astype(np.float32)
    scores = str(root / "scores")
    batch = {"key": np.array([row["key"] for row in labels], object), "shard": np.arange(len(labels)) % 2,
             "status": np.array(["ok"] * len(labels), object), "error": np.array([""] * len(labels), object),
             SCORE_COLUMN: d, "d_l1": d / 2, "feat_real": feat, "feat_recon": feat * 0.5}
    ShardAssembler(ScoreSet(scores), storage, {s: int((batch["shard"] == s).sum()) for s in range(2)}).add(batch)
    storage.write_text(ScoreSet(scores).summary, json.dumps({
        "metric": "stlpips-vgg", "features": "test-features", "features_is_inception": False,
        "checkpoint": ckpt, "pair": "ema"}))
    out = str(root / "selection")
    overrides = {"select.scores": scores, "select.out": out, "select.target_threshold": 0.15,
                 "select.threshold_step": 0.02, "select.min_size": n // 2, "select.labels": join(data, "labels.csv"),
                 "select.page_images": page_images, **{f"select.{k}": v for k, v in select.items()}}
    report = run_selection(load_config(None, overrides))
    return {"report": report, "out": out, "page": FilteredSet(out).curation_page, "d": d, "outlier": outlier,
            "kinds": [row["kind"] for row in labels]}


def page_data(page: str) -> dict:
    text = Path(page).read_text()
    found = re.search(r'<script id="curation-data" type="application/json">(.*?)</script>', text, re.S)
    assert found, "no embedded data"
    return json.loads(found.group(1))


@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> dict:
    return make_small_selection(tmp_path_factory.mktemp("curation"))


def test_allocation_takes_sparse_strata_whole_and_fills_the_cap() -> None:
    counts = np.array([1000, 3, 0, 50, 7])
    alloc = allocate(counts, 40)
    assert alloc.sum() == 40 and np.all(alloc <= counts)
    assert alloc[1] == 3 and alloc[4] == 7 and alloc[2] == 0  # the sparse tail is shown in full
    assert alloc[0] == alloc[3] == 15  # the rest share equally
    assert np.array_equal(allocate(counts, 10_000), counts)  # under the cap: every image


def test_page_counts_equal_report_at_every_theta(small_run) -> None:
    report, data = small_run["report"], page_data(small_run["page"])
    assert data["report"]["curve"] == report["curve"] and data["shown"] == report["size_raw"] == 120
    assert not data["sampled"] and report["curation_page"]["images"] == 120
    d = np.array([item[1] for item in data["items"]])
    assert np.all(np.diff(d) >= 0)  # ordered by d(x)
    assert sorted(item[5] for item in data["items"]) == sorted(small_run["kinds"])  # each one's planted label
    for j, point in enumerate(report["curve"]):
        kept_items = sum(1 for item in data["items"] if j < item[2])  # what the page marks kept
        kept_kinds = sum(kept[j] for kept in data["kinds"]["kept"].values())
        assert kept_items == kept_kinds == point["size"] == int((small_run["d"] <= point["theta"]).sum())


def test_page_precision_recall_at_chosen_theta_equal_report(small_run) -> None:
    report, kinds = small_run["report"], page_data(small_run["page"])["kinds"]
    j = next(i for i, p in enumerate(report["curve"]) if p["theta"] == report["theta"])
    removed = {k: kinds["total"][k] - kinds["kept"][k][j] for k in kinds["names"]}
    tp = sum(v for k, v in removed.items() if k != "inlier")
    outliers = sum(v for k, v in kinds["total"].items() if k != "inlier")
    assert outliers == report["outliers"]["outliers"] == int(small_run["outlier"].sum())
    assert tp + removed["inlier"] == report["outliers"]["removed"] > 0
    assert tp / (tp + removed["inlier"]) == pytest.approx(report["outliers"]["precision"])
    assert tp / outliers == pytest.approx(report["outliers"]["recall"])
    assert set(kinds["names"]) == set(small_run["kinds"])


def test_thumbnails_are_bounded_sprites_of_x_and_reconstruction(small_run) -> None:
    from PIL import Image

    data, entry = page_data(small_run["page"]), small_run["report"]["curation_page"]
    thumbs = data["thumbs"]
    assert thumbs["size"] == 32 and len(thumbs["x"]) == len(thumbs["recon"]) == 1
    x = np.asarray(Image.open(Path(small_run["out"]) / thumbs["x"][0]))
    recon = np.asarray(Image.open(Path(small_run["out"]) / thumbs["recon"][0]))
    assert x.shape == recon.shape == (4 * 32, 32 * 32, 3)  # 120 thumbnails, 32 to a row
    assert np.abs(x.astype(int) - recon.astype(int)).mean() > 5  # G(E(x)) of an untrained G is not x
    assert sorted(item[3] for item in data["items"]) == list(range(120))
    page_bytes = Path(small_run["page"]).stat().st_size + sum(
        (Path(small_run["out"]) / p).stat().st_size for p in thumbs["x"] + thumbs["recon"])
    assert entry["bytes"] == page_bytes < 400_000


def test_beyond_the_cap_a_stratified_sample_over_d(tmp_path) -> None:
    """A cap below the image count: exactly `cap` thumbnails, spanning d(x) from the lowest to the highest
    stratum, each weighted by the images it stands for (weights sum to the set)."""
    from test_selection import write_fake_scores

    scores = str(tmp_path / "scores")
    fake = write_fake_scores(scores, n_in=3000, n_out=100, dim=4, recon_shrink=0.5)
    edges = np.linspace(fake["d"].min(), fake["d"].max(), 101)
    counts = np.histogram(fake["d"], bins=edges)[0]
    sample = sample_by_score(ScoreSet(scores), get_storage(), edges, counts, cap=200)
    assert len(sample.keys) == 200 and sample.sampled and sample.total == 3100
    assert sample.weight.sum() == pytest.approx(3100)
    assert sample.d[0] <= np.quantile(fake["d"], 0.01) and sample.d[-1] >= np.quantile(fake["d"], 0.99)
    high = fake["d"] >= 0.5  # the 100 outliers' stratum band: sparse, so taken nearly whole
    assert (sample.d >= 0.5).sum() >= 0.5 * high.sum()
    again = sample_by_score(ScoreSet(scores), get_storage(), edges, counts, cap=200)
    assert again.keys == sample.keys  # seeded: the same page on every run


def test_demo_report_links_the_curation_page(small_run, tmp_path) -> None:
    from sdsg_ray.evaluation.report import _selection_section

    report_dir = str(tmp_path / "report")
    section = _selection_section({}, get_storage(), FilteredSet(small_run["out"]), report_dir)
    href = re.search(r"<a href='([^']+)'>Curation page</a>", section).group(1)
    assert not href.startswith("/") and (Path(report_dir) / href).resolve() == Path(small_run["page"]).resolve()
    relative_link = get_storage().relative_link  # the link across buckets stays absolute (tests/test_storage.py)
    assert relative_link("s3://b/run/selection/curation.html", "s3://b/run/report") == "../selection/curation.html"
    assert relative_link("s3://other/selection/curation.html", "s3://b/run/report") == "s3://other/selection/curation.html"
