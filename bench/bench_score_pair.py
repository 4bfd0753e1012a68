"""Which (G, E) pair should score d(x) = LPIPS(x, G(E(x)))? Outlier AUROC on the demo set, per pair.

Why (issue 15, deviation 2): scoring used to pair G_ema with the live E, which was trained against the
live G, not G_ema. Now the bundle carries both pairs trained together, (G_ema, E_ema) and (G, E), and
`score.pair` picks one. This trains stage 1 in-process (no Ray; the demo's model, batch, metric and
length) on the demo's synthetic set and scores every image with each pair through ReconstructionScorer.

Pairs: ema (G_ema, E_ema; the default), live (G, E), mixed (G_ema, E; what scoring did before).
Control: the untrained network (step 0, where all pairs coincide). Intervals: 95 % bootstrap over images
(paired for the differences).

    PYTHONPATH=$PWD python bench/bench_score_pair.py --kimg 2.0
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from sdsg_ray.artifacts.checkpoint import load_inference
from sdsg_ray.artifacts.scores import SCORE_COLUMN
from sdsg_ray.config import load_config
from sdsg_ray.dataset.synthetic import plan, render
from sdsg_ray.demo import DEMO_DEFAULTS
from sdsg_ray.filtering.scorer import ReconstructionScorer
from sdsg_ray.pretrained import build_metric
from sdsg_ray.storage import get_storage
from sdsg_ray.training.loop import TrainingRun


def no_features(x: torch.Tensor) -> np.ndarray:
    return np.zeros((x.shape[0], 1), np.float32)


def score(bundle, metric, pair: str, images: np.ndarray, batch: int = 64) -> np.ndarray:
    scorer = ReconstructionScorer(bundle, metric, no_features, torch.device("cpu"), pair=pair)
    return np.concatenate([scorer(images[i:i + batch])[SCORE_COLUMN] for i in range(0, len(images), batch)])


def bootstrap(y: np.ndarray, scores: dict[str, np.ndarray], n: int = 1000, seed: int = 0) -> dict[str, tuple[float, float]]:
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {k: [] for k in scores}
    for _ in range(n):
        idx = rng.integers(0, len(y), len(y))
        if 0 < y[idx].sum() < len(idx):
            for k, s in scores.items():
                draws[k].append(roc_auc_score(y[idx], s[idx]))
    return {k: (float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))) for k, v in draws.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kimg", type=float, default=DEMO_DEFAULTS["train"]["kimg"])
    args = parser.parse_args()

    t, d = DEMO_DEFAULTS["train"], DEMO_DEFAULTS["dataset"]
    overrides = {f"model.{k}": v for k, v in DEMO_DEFAULTS["model"].items()}
    overrides.update({f"train.{k}": t[k] for k in ("batch_size", "ema_kimg", "r1_gamma", "metric", "seed")})
    config = load_config(None, overrides)
    items = plan(d["n"], d["outlier_fraction"], d["seed"])
    images = np.stack([render(item, config.model.resolution, d["seed"]) for item in items]).astype(np.uint8)
    y = np.array([item.is_outlier for item in items], dtype=int)
    metric = build_metric(t["metric"])
    run = TrainingRun(config, metric=metric)
    storage, tmp = get_storage(), tempfile.mkdtemp(prefix="bench_pair_")

    def bundle_now(name: str):
        uri = f"{tmp}/{name}.pt"
        run.export_inference({"stage": "joint", "kimg": run.kimg}, uri, storage)
        return load_inference(uri, storage)

    untrained = score(bundle_now("init"), metric, "ema", images)
    steps = int(np.ceil(args.kimg * 1000 / config.train.batch_size))
    rng = np.random.default_rng(0)
    started = time.perf_counter()
    for _ in range(steps):
        run.step(torch.from_numpy(images[rng.choice(len(images), config.train.batch_size, replace=False)]))
    train_s = time.perf_counter() - started
    bundle = bundle_now("trained")
    scores = {"untrained": untrained}
    for pair in ("ema", "live"):
        scores[pair] = score(bundle, metric, pair, images)
    bundle.E_ema = None  # scoring_pair's fallback: (G_ema, E), what scoring used before E_ema existed
    scores["mixed (G_ema, E)"] = score(bundle, metric, "ema", images)

    ci = bootstrap(y, scores)
    print(f"# demo set: {len(y)} images, {y.sum()} outliers; stage 1 {args.kimg} kimg = {steps} steps in {train_s:.0f} s")
    print("pair                AUROC   95% CI           mean d inliers  outliers")
    for k, s in scores.items():
        print(f"{k:18s}  {roc_auc_score(y, s):.3f}   [{ci[k][0]:.3f}, {ci[k][1]:.3f}]   "
              f"{s[y == 0].mean():.4f}          {s[y == 1].mean():.4f}")
    rngb = np.random.default_rng(1)
    for a, b in (("ema", "live"), ("ema", "mixed (G_ema, E)"), ("ema", "untrained")):
        deltas = []
        for _ in range(1000):
            idx = rngb.integers(0, len(y), len(y))
            if 0 < y[idx].sum() < len(idx):
                deltas.append(roc_auc_score(y[idx], scores[a][idx]) - roc_auc_score(y[idx], scores[b][idx]))
        print(f"AUROC {a} - {b}: {roc_auc_score(y, scores[a]) - roc_auc_score(y, scores[b]):+.3f} "
              f"[{np.percentile(deltas, 2.5):+.3f}, {np.percentile(deltas, 97.5):+.3f}] (paired bootstrap)")

if __name__ == "__main__":
    main()
