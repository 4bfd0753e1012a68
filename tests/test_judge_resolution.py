"""The judge's size (issue 31): x and G(E(x)) reach the perceptual metric's trunk at score.judge_resolution,
through the real code paths (the controls' d(x), the scorer, the scoring job's summary, the perceptual
assignment of multi-modal truncation), with one resize rule; the config refuses a size the trunk cannot take."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from sdsg_ray.artifacts.checkpoint import export_inference, load_inference
from sdsg_ray.artifacts.scores import SCORE_COLUMN
from sdsg_ray.config import ConfigError, ModelConfig, ScoreConfig, load_config
from sdsg_ray.diagnostics import reconstruction_scores, untrained_networks
from sdsg_ray.pretrained import build_fid_features, build_metric, judge_resize
from sdsg_ray.storage import get_storage

MODEL = ModelConfig()  # the tiny 32-px default


class ShapeSpy(nn.Module):
    """Wraps the metric's trunk and records the spatial size of every batch it sees."""

    def __init__(self, trunk: nn.Module) -> None:
        super().__init__()
        self.trunk = trunk
        self.sides: list[tuple[int, int]] = []

    def forward(self, x: torch.Tensor):
        self.sides.append(tuple(x.shape[-2:]))
        return self.trunk(x)


@pytest.fixture(scope="module")
def alex():
    return build_metric("stlpips-alex")


def spied(metric) -> ShapeSpy:
    spy = ShapeSpy(metric.net)
    metric.net = spy
    return spy


def images(n: int = 6, side: int = 32, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    smooth = rng.uniform(0, 255, (n, side // 4, side // 4, 3)).repeat(4, axis=1).repeat(4, axis=2)
    return smooth.astype(np.uint8)


def test_resize_rule_area_down_bilinear_up_identity_at_size() -> None:
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    down = judge_resize(x, 4)
    assert torch.allclose(down, x.unfold(2, 2, 2).unfold(3, 2, 2).mean(dim=(-1, -2)))  # area: 2x2 block means
    up = judge_resize(x, 16)
    assert up.shape == (2, 3, 16, 16)
    assert up.min() >= x.min() - 1e-6 and up.max() <= x.max() + 1e-6  # bilinear: no overshoot (bicubic would)
    assert judge_resize(x, 8) is x


def test_both_images_reach_the_trunk_at_the_judge_size_in_the_controls(alex) -> None:
    """controls.reconstruction_scores (the untrained control, the benches) judges x and G(E(x)) at 128 px,
    and the distance differs from the one judged at 32 px: the setting reaches the number."""
    G, E = untrained_networks(MODEL, seed=0)
    x = images()
    d32 = reconstruction_scores(G.synthesis, E, x, build_metric("stlpips-alex", judge_resolution=32))
    d_none = reconstruction_scores(G.synthesis, E, x, alex)
    np.testing.assert_array_equal(d32, d_none)  # the model's own size = no resize: today's d(x) exactly
    judge = build_metric("stlpips-alex", judge_resolution=128)
    spy = spied(judge)
    d128 = reconstruction_scores(G.synthesis, E, x, judge, batch_size=4)
    assert spy.sides == [(128, 128)] * 4  # two batches, x and G(E(x)) each
    assert not np.allclose(d128, d32, rtol=1e-3)


def test_scorer_judges_at_the_set_size(tmp_path) -> None:
    from sdsg_ray.filtering.scorer import ReconstructionScorer

    torch.manual_seed(0)
    G, E = untrained_networks(MODEL, seed=0)
    uri = str(tmp_path / "inference.pt")
    export_inference(G, E, MODEL, {"stage": "joint"}, uri, get_storage(), G_live=G, E_ema=E)
    bundle = load_inference(uri)
    judge = build_metric("stlpips-alex", judge_resolution=64)
    spy = spied(judge)
    scores = ReconstructionScorer(bundle, judge, build_fid_features("stlpips-alex-pool"), torch.device("cpu"))(images())
    assert spy.sides == [(64, 64), (64, 64)]
    direct = reconstruction_scores(bundle.G_ema.synthesis, bundle.E_ema, images(),
                                   build_metric("stlpips-alex", judge_resolution=64))
    np.testing.assert_allclose(scores[SCORE_COLUMN], direct, rtol=1e-5)


def test_perceptual_assignment_compares_samples_and_centers_at_the_judge_size() -> None:
    from sdsg_ray.truncation.assign import PassRows, PerceptualAssigner

    G, _ = untrained_networks(MODEL, seed=0)
    judge = build_metric("stlpips-alex", judge_resolution=64)
    spy = spied(judge)
    centers = torch.randn(3, MODEL.w_dim)
    assigner = PerceptualAssigner(G.synthesis, centers, judge, PassRows([4]))
    assigner.assign(torch.randn(5, MODEL.w_dim))
    assert spy.sides and set(spy.sides) == {(64, 64)}


@pytest.mark.parametrize("bad", [16, 48, 2048])
def test_config_refuses_a_size_the_trunk_cannot_take(bad) -> None:
    with pytest.raises(ValueError, match="power of two in 32..1024"):
        ScoreConfig(judge_resolution=bad)
    with pytest.raises(ConfigError, match="judge_resolution"):
        load_config(None, {"cluster.judge_resolution": bad})
    if bad < 1024:
        with pytest.raises(ConfigError, match="power of two"):
            build_metric("stlpips-alex", judge_resolution=bad)


def test_config_accepts_sizes_and_null() -> None:
    config = load_config(None, {"score.judge_resolution": 128, "cluster.judge_resolution": 64})
    assert (config.score.judge_resolution, config.cluster.judge_resolution) == (128, 64)
    assert load_config(None, {}).score.judge_resolution is None


def test_clusters_file_records_the_judge_size(tmp_path) -> None:
    from sdsg_ray.artifacts.clusters import ClusterFile, ClusterSet

    clusters = ClusterSet(centers=torch.zeros(2, 4), sizes=torch.ones(2, dtype=torch.long), seed=0,
                          metric="stlpips-alex", checkpoint="x", judge_resolution=128)
    uri = ClusterFile(str(tmp_path)).write(clusters, get_storage())
    assert ClusterFile(uri).read(get_storage()).judge_resolution == 128


def test_scoring_summary_records_metric_and_size(ray_cluster, tmp_path) -> None:
    """The scoring job end to end (Ray Data actors): the summary names the size, and every d(x) is the
    one the metric gives at that size."""
    from PIL import Image

    from sdsg_ray.filtering.score import run_scoring
    from sdsg_ray.artifacts.scores import ScoreSet

    data = tmp_path / "images"
    data.mkdir()
    x = images(n=12)
    for i, img in enumerate(x):
        Image.fromarray(img).save(data / f"img-{i:02d}.png")
    G, E = untrained_networks(MODEL, seed=0)
    checkpoint = str(tmp_path / "stage1" / "inference.pt")
    export_inference(G, E, MODEL, {"stage": "joint"}, checkpoint, get_storage(), G_live=G, E_ema=E)
    out = str(tmp_path / "scores")
    summary = run_scoring(load_config(None, {
        "score.data": str(data), "score.checkpoint": checkpoint, "score.out": out, "score.metric": "stlpips-alex",
        "score.judge_resolution": 64, "score.fid_features": "stlpips-alex-pool", "score.batch_size": 6}))
    assert (summary["metric"], summary["judge_resolution"]) == ("stlpips-alex", 64)
    rows = {k: d for b in ScoreSet(out).iter_batches(get_storage(), ["key", SCORE_COLUMN]) for k, d in zip(b["key"], b[SCORE_COLUMN])}
    scored = np.array([rows[k] for k in sorted(rows)])
    expected = reconstruction_scores(G.synthesis, E, x, build_metric("stlpips-alex", judge_resolution=64))
    np.testing.assert_allclose(scored, expected, rtol=1e-4)
    at_32 = reconstruction_scores(G.synthesis, E, x, build_metric("stlpips-alex"))
    assert not np.allclose(scored, at_32, rtol=1e-3)
