"""d(x) = metric(x, G(E(x))), |x - G(E(x))|₁ and the FID features of x and G(E(x)), in one pass per image.

`ReconstructionScorer` is plain PyTorch (no Ray); `ScoreActor` is the thin callable class that Ray Data's
actor pool instantiates once per actor, so G, E and the metric load once and serve many batches.
"""

from __future__ import annotations

import json
import time

import numpy as np
import ray
import torch

from sdsg_ray.artifacts.checkpoint import InferenceBundle, load_inference, scoring_pair
from sdsg_ray.artifacts.scores import SCORE_COLUMN
from sdsg_ray.config import StorageConfig
from sdsg_ray.imaging import load_batch, to_tensor, to_uint8
from sdsg_ray.models import reconstruct
from sdsg_ray.pretrained import build_fid_features, build_metric
from sdsg_ray.storage import Storage, get_storage


class ReconstructionScorer:
    """Scores uint8 images with a stage-1 bundle's `score.pair` (G, E), a perceptual metric and an FID feature net.

    The metric judges at its own ``judge_resolution`` (pretrained.PerceptualMetric): x and G(E(x)) are resized
    there, together, so this and the controls' d(x) (diagnostics.reconstruction_scores) cannot differ.
    """

    def __init__(self, bundle, metric, features, device: torch.device, pair: str = "ema") -> None:
        G, E = scoring_pair(bundle, pair)  # (G_ema, E_ema) or (G, E): a pair trained together; no E: CheckpointError
        self.G = G.to(device).eval()
        self.E = E.to(device).eval()
        self.metric = metric
        self.features = features
        self.device = device
        self.resolution = bundle.model.resolution

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """images uint8 [N, R, R, 3] -> d(x) [N] (SCORE_COLUMN), d_l1 [N], feat_real [N, D], feat_recon [N, D]."""
        assert images.shape[1:] == (self.resolution, self.resolution, 3), images.shape
        x = to_tensor(images).to(self.device)
        recon = reconstruct(self.G.synthesis, self.E, x).image.float()
        assert recon.shape == x.shape, (recon.shape, x.shape)
        return {
            SCORE_COLUMN: self.metric(x, recon).reshape(images.shape[0]).float().cpu().numpy(),
            "d_l1": (x - recon).abs().mean(dim=(1, 2, 3)).float().cpu().numpy(),
            "feat_real": np.asarray(self.features(x), np.float32),
            "feat_recon": np.asarray(self.features(recon.clamp(-1, 1)), np.float32),
        }


def reconstruct_keys(keys: list[str], bundle: InferenceBundle, storage: Storage,
                     pair: str = "ema") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(readable mask over ``keys``, originals, G(E(x))) as uint8 NHWC for the readable ones; G and E
    are the scoring ``pair`` that computed the scores."""
    loaded = load_batch(keys, storage, bundle.model.resolution)
    good = loaded["status"] == "ok"
    originals = loaded["image"][good]
    if not good.any():
        return good, originals, originals
    with torch.no_grad():
        G, E = scoring_pair(bundle, pair)
        recon = reconstruct(G.synthesis, E, to_tensor(originals)).image
    return good, originals, to_uint8(recon)


class ScoreActor:
    """Ray Data actor: rows with status "ok" are scored; error rows pass through with NaN scores."""

    def __init__(self, checkpoint: str, metric: str, fid_features: str, storage: StorageConfig, pair: str = "ema",
                 judge_resolution: int | None = None) -> None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        bundle = load_inference(checkpoint, get_storage(storage), device="cpu")
        self.scorer = ReconstructionScorer(
            bundle, build_metric(metric, device=device, judge_resolution=judge_resolution),
            build_fid_features(fid_features, device=device), device, pair=pair)
        self.feature_dim = self.scorer.features.dim
        # Where this actor ran, so the driver can report (and tests can check) the placement.
        context = ray.get_runtime_context()
        self.placement = json.dumps({"node_id": context.get_node_id(), "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
                                     "device": str(device)})

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        started = time.perf_counter()
        n = len(batch["key"])
        ok = batch["status"] == "ok"
        scored = {name: np.full((n, self.feature_dim) if name.startswith("feat_") else n, np.nan, np.float32)
                  for name in (SCORE_COLUMN, "d_l1", "feat_real", "feat_recon")}
        if ok.any():
            for name, values in self.scorer(batch["image"][ok]).items():
                scored[name][ok] = values
        return {
            **{name: batch[name] for name in ("key", "shard", "status", "error")},
            **scored,
            "scorer": np.full(n, self.placement, dtype=object),
            # This call's compute time spread over its rows: the driver's sum is the actors' busy time,
            # against which their idle time (waiting for decoded batches) is measured.
            "busy_s": np.full(n, (time.perf_counter() - started) / max(n, 1), np.float64),
        }
