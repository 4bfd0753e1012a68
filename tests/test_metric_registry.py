"""A perceptual metric registered from this file alone: the config accepts it, build_metric builds it, and
the scoring stage (Ray Data actors in worker processes) scores a run with it, end to end.

The toy is the mean squared pixel difference at the judge size: no network and nothing LPIPS about it.
The scoring run happens in a subprocess that runs this file as a script: it registers the toy, starts its
own local Ray with the toy registered in every worker (Ray's public ``worker_process_setup_hook``), and
scores; the test then checks every stored d(x) against the formula, computed here from the images and
the checkpoint without the scoring code.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from sdsg_ray.config import ConfigError, ModelConfig, load_config
from sdsg_ray.perceptual import METRICS
from sdsg_ray.pretrained import PerceptualMetric, build_metric

TOY = "toy-mse"


class MeanSquaredDifference(PerceptualMetric):
    """d(x, y) = mean over pixels and channels of (x - y)^2, at the judge size."""

    def embed(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [x]

    def distance_from_features(self, fx: list[torch.Tensor], fy: list[torch.Tensor]) -> torch.Tensor:
        return (fx[0] - fy[0]).pow(2).mean(dim=(1, 2, 3))


class ToyEntry:
    description = "mean squared pixel difference (a test's toy)"

    def available(self) -> tuple[bool, str]:
        return True, "needs no weights"

    def build(self, name: str, judge_resolution: int | None) -> PerceptualMetric:
        return MeanSquaredDifference(name, judge_resolution)


def register_toy() -> None:
    """Also Ray's worker_process_setup_hook: it runs in every worker process of the scoring job."""
    from sdsg_ray.perceptual import METRICS as registry  # the worker's own registry, not a pickled copy

    if TOY not in registry:
        registry.register(TOY, ToyEntry())


@pytest.fixture
def toy():
    register_toy()
    yield TOY
    METRICS.unregister(TOY)


def test_config_takes_a_registered_metric_and_refuses_it_after(toy) -> None:
    assert load_config(None, {"score.metric": toy, "train.metric": toy, "cluster.metric": toy}).score.metric == toy
    METRICS.unregister(toy)
    with pytest.raises(ConfigError, match=f"unknown perceptual metric '{toy}'"):
        load_config(None, {"score.metric": toy})
    register_toy()


def test_the_toy_builds_frozen_and_measures_what_it_says(toy) -> None:
    metric = build_metric(toy, judge_resolution=64)
    assert isinstance(metric, MeanSquaredDifference) and metric.label(32) == f"{toy} at 64 px"
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(3, 3, 32, 32, generator=g) * 2 - 1, torch.rand(3, 3, 32, 32, generator=g) * 2 - 1
    up = lambda t: torch.nn.functional.interpolate(t, size=(64, 64), mode="bilinear", align_corners=False)  # noqa: E731
    torch.testing.assert_close(metric(x, y), (up(x) - up(y)).pow(2).mean(dim=(1, 2, 3)))
    fx, fy = metric.features(x), metric.features(y)
    brute = torch.stack([metric(x, y[k:k + 1].expand_as(x)) for k in range(3)], dim=1)
    torch.testing.assert_close(metric.pairwise_distance_from_features(fx, fy), brute)


def _score_with_the_toy(settings: dict) -> None:
    """The subprocess: the toy registered here and in every Ray worker, then `sdsg score`."""
    import ray

    from sdsg_ray.filtering.score import run_scoring

    register_toy()
    ray.init(address="local", num_cpus=2, include_dashboard=False, runtime_env={"worker_process_setup_hook": register_toy})
    try:
        run_scoring(load_config(None, settings))
    finally:
        ray.shutdown()


def test_a_toy_metric_scores_a_run(toy, tmp_path) -> None:
    from sdsg_ray.artifacts.checkpoint import export_inference, load_inference, scoring_pair
    from sdsg_ray.artifacts.scores import SCORE_COLUMN, ScoreSet
    from sdsg_ray.imaging import load_batch, to_tensor
    from sdsg_ray.models import reconstruct
    from sdsg_ray.models.networks import build_networks
    from sdsg_ray.storage import get_storage

    storage = get_storage()
    data = tmp_path / "images"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(10):
        smooth = rng.uniform(0, 255, (8, 8, 3)).repeat(4, axis=0).repeat(4, axis=1).astype(np.uint8)
        Image.fromarray(smooth).save(data / f"img-{i:02d}.png")
    model = ModelConfig()  # the tiny 32-px default
    torch.manual_seed(0)
    G, _, E = build_networks(model)
    checkpoint = str(tmp_path / "stage1" / "inference.pt")
    export_inference(G, E, model, {"stage": "joint"}, checkpoint, storage)
    out = str(tmp_path / "scores")
    settings = {"score.data": str(data), "score.checkpoint": checkpoint, "score.out": out, "score.metric": toy,
                "score.fid_features": "stlpips-alex-pool", "score.batch_size": 4, "score.manifest_shard_size": 5}
    run = subprocess.run([sys.executable, __file__, json.dumps(settings)], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    scores = ScoreSet(out)
    summary = scores.read_summary(storage)
    assert (summary["metric"], summary["judge"], summary["scored"]) == (toy, f"{toy} at 32 px", 10)
    rows = {k: (d, l1) for b in scores.iter_batches(storage, ["key", SCORE_COLUMN, "d_l1"])
            for k, d, l1 in zip(b["key"], b[SCORE_COLUMN], b["d_l1"])}
    keys = sorted(rows)
    bundle = load_inference(checkpoint, storage)
    G_ema, E_ema = scoring_pair(bundle, "ema")
    x = to_tensor(load_batch(keys, storage, 32)["image"])
    with torch.no_grad():
        recon = reconstruct(G_ema.synthesis, E_ema, x).image.float()
    expected = (x - recon).pow(2).mean(dim=(1, 2, 3)).numpy()
    scored = np.array([rows[k][0] for k in keys])
    np.testing.assert_allclose(scored, expected, rtol=1e-5, atol=1e-7)
    assert not np.allclose(scored, [rows[k][1] for k in keys])  # the toy's squares, not the L1 column


if __name__ == "__main__":
    _score_with_the_toy(json.loads(sys.argv[1]))


def test_a_score_set_without_the_score_column_is_refused_by_name(tmp_path):
    """Score sets written before d(x)'s column was named for no metric in particular (d_lpips) get a
    clear error naming the shard and the missing column, not a pyarrow KeyError."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from sdsg_ray.artifacts.scores import SCORE_COLUMN, ScoreSet
    from sdsg_ray.errors import InvalidRequest
    from sdsg_ray.storage import get_storage

    scores = ScoreSet(str(tmp_path / "scores"))
    (tmp_path / "scores" / "scores").mkdir(parents=True)
    pq.write_table(pa.table({"key": ["a"], "d_lpips": [0.1]}), scores.shard(0))
    with pytest.raises(InvalidRequest, match=rf"scores-00000\.parquet: .*\['{SCORE_COLUMN}'\]"):
        list(scores.iter_batches(get_storage(), ["key", SCORE_COLUMN]))
