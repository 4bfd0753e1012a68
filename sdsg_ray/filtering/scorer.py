"""d(x) = LPIPS(x, G(E(x))), |x - G(E(x))|₁ and the FID features of x and G(E(x)), in one pass per image.

`ReconstructionScorer` is plain PyTorch (no Ray); `ScoreActor` is the thin callable class that Ray Data's
actor pool instantiates once per actor, so G, E and the metric load once and serve many batches.
"""

from __future__ import annotations

import json
import time

import numpy as np
import torch
from torch import Tensor

from sdsg_ray.config import StorageConfig
from sdsg_ray.imaging import to_tensor
from sdsg_ray.models import reconstruct


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class ReconstructionScorer:
    """Scores uint8 images with a stage-1 bundle (the `score.pair` of G and E), a perceptual metric and an FID feature net.

    The metric judges at its own ``judge_resolution`` (pretrained.PerceptualMetric): x and G(E(x)) are resized
    there, together, so this and the controls' d(x) (evaluation.controls.reconstruction_scores) cannot differ.
    """

    def __init__(self, bundle, metric, features, device: torch.device, pair: str = "ema") -> None:
        from sdsg_ray.artifacts.checkpoint import scoring_pair

        G, E = scoring_pair(bundle, pair)  # (G_ema, E_ema) or (G, E): a pair trained together; no E: CheckpointError
        self.G = G.to(device).eval()
        self.E = E.to(device).eval()
        self.metric = metric
        self.features = features
        self.device = device
        self.resolution = bundle.model.resolution

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """images uint8 [N, R, R, 3] -> d_lpips [N], d_l1 [N], feat_real [N, D], feat_recon [N, D]."""
        n = images.shape[0]
        assert images.shape[1:] == (self.resolution, self.resolution, 3), images.shape
        x = to_tensor(images).to(self.device)
        recon = reconstruct(self.G.synthesis, self.E, x).image.float()
        assert recon.shape == x.shape, (recon.shape, x.shape)
        d_lpips = self.metric(x, recon).reshape(n)
        d_l1 = (x - recon).abs().mean(dim=(1, 2, 3))
        return {
            "d_lpips": d_lpips.float().cpu().numpy(),
            "d_l1": d_l1.float().cpu().numpy(),
            "feat_real": np.asarray(self.features(x), np.float32),
            "feat_recon": np.asarray(self.features(recon.clamp(-1, 1)), np.float32),
        }


class ScoreActor:
    """Ray Data actor: rows with status "ok" are scored; error rows pass through with NaN scores."""

    def __init__(self, checkpoint: str, metric: str, fid_features: str, storage: StorageConfig, pair: str = "ema",
                 judge_resolution: int | None = None) -> None:
        import ray

        from sdsg_ray.artifacts.checkpoint import load_inference
        from sdsg_ray.pretrained import build_fid_features, build_metric
        from sdsg_ray.storage import get_storage

        device = default_device()
        bundle = load_inference(checkpoint, get_storage(storage), device="cpu")
        self.scorer = ReconstructionScorer(
            bundle, build_metric(metric, device=device, judge_resolution=judge_resolution),
            build_fid_features(fid_features, device=device), device,
            pair=pair,
        )
        self.feature_dim = self.scorer.features.dim
        # Where this actor ran, so the driver can report (and tests can check) the placement.
        context = ray.get_runtime_context()
        self.placement = json.dumps(
            {"node_id": context.get_node_id(), "gpu_ids": [str(g) for g in ray.get_gpu_ids()], "device": str(device)}
        )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        started = time.perf_counter()
        n = len(batch["key"])
        ok = batch["status"] == "ok"
        d_lpips = np.full(n, np.nan, np.float32)
        d_l1 = np.full(n, np.nan, np.float32)
        feat_real = np.full((n, self.feature_dim), np.nan, np.float32)
        feat_recon = np.full((n, self.feature_dim), np.nan, np.float32)
        if ok.any():
            scores = self.scorer(batch["image"][ok])
            d_lpips[ok], d_l1[ok] = scores["d_lpips"], scores["d_l1"]
            feat_real[ok], feat_recon[ok] = scores["feat_real"], scores["feat_recon"]
        return {
            "key": batch["key"],
            "shard": batch["shard"],
            "status": batch["status"],
            "error": batch["error"],
            "d_lpips": d_lpips,
            "d_l1": d_l1,
            "feat_real": feat_real,
            "feat_recon": feat_recon,
            "scorer": np.full(n, self.placement, dtype=object),
            # This call's compute time spread over its rows: the driver's sum is the actors' busy time,
            # against which their idle time (waiting for decoded batches) is measured.
            "busy_s": np.full(n, (time.perf_counter() - started) / max(n, 1), np.float64),
        }
