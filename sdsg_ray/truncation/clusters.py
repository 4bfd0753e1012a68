"""Multi-modal truncation centers: KMeans on w = mapping(z) for many random z (Mokady et al. 2022, Sec. 4).

The paper maps 60,000 z, clusters the w with scikit-learn KMeans (64 clusters, defaults except
init='random') and truncates each new w toward its nearest center instead of toward the one global
mean, so that low psi keeps the modes (breeds, poses, colours) instead of collapsing them.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from sklearn.cluster import KMeans
from tqdm import tqdm

from sdsg_ray.artifacts.checkpoint import load_inference
from sdsg_ray.artifacts.clusters import ClusterFile, ClusterSet
from sdsg_ray.config import SDSGConfig
from sdsg_ray.pretrained import build_metric, resolve_metric
from sdsg_ray.storage import get_storage
from sdsg_ray.truncation.learned import fit_learned_assignment

log = logging.getLogger(__name__)


@torch.no_grad()
def map_latents(mapping: torch.nn.Module, z_dim: int, n: int, seed: int, batch_size: int = 1024) -> torch.Tensor:
    """w = mapping(z) for n z drawn from one generator seeded with ``seed``; returns [n, w_dim] on CPU."""
    device = next(mapping.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    chunks = []
    for start in tqdm(range(0, n, batch_size), desc="mapping z -> w", unit="batch"):
        z = torch.randn(min(batch_size, n - start), z_dim, generator=gen)
        chunks.append(mapping(z.to(device)).float().cpu())
    return torch.cat(chunks)


def fit_centers(w: torch.Tensor, clusters: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's KMeans: init='random', scikit-learn defaults otherwise. Returns (centers [K, D], sizes [K])."""
    kmeans = KMeans(n_clusters=clusters, init="random", random_state=seed)
    labels = kmeans.fit_predict(w.numpy().astype(np.float64))
    centers = torch.from_numpy(kmeans.cluster_centers_).float()
    sizes = torch.from_numpy(np.bincount(labels, minlength=clusters)).long()
    return centers, sizes


def run_clustering(config: SDSGConfig) -> str:
    """``sdsg cluster``: fit the centers for a checkpoint's G_ema and write them to ``--out`` (a ClusterFile)."""
    cfg = config.cluster
    storage = get_storage(config.storage)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    bundle = load_inference(cfg.checkpoint, storage, device=device)
    metric = resolve_metric(cfg.metric)
    log.info("mapping %d latents of checkpoint %s (%s)", cfg.n_latents, cfg.checkpoint, bundle.identity)
    w = map_latents(bundle.G_ema.mapping, bundle.G_ema.z_dim, cfg.n_latents, cfg.seed)
    log.info("KMeans: %d clusters on %s", cfg.clusters, tuple(w.shape))
    centers, sizes = fit_centers(w, cfg.clusters, cfg.seed)
    result = ClusterSet(centers=centers, sizes=sizes, seed=cfg.seed, metric=metric, checkpoint=bundle.identity,
                        config=cfg.model_dump(mode="json"), w_mean=w.mean(dim=0), judge_resolution=cfg.judge_resolution)
    if cfg.classifier_latents > 0:  # label the first classifier_latents w with the LPIPS rule, fit w -> center
        n = min(cfg.classifier_latents, len(w))
        log.info("learned assignment: labelling %d latents with their LPIPS-nearest center", n)
        full = int(bundle.G_ema.resolution)
        coarse = tuple(r for r in (full // 2, full // 4) if r in bundle.G_ema.synthesis.block_resolutions)
        classifier, result.assignment_quality = fit_learned_assignment(
            bundle.G_ema.synthesis, centers.to(device), w[:n].to(device),
            build_metric(metric, device=device, judge_resolution=cfg.judge_resolution),
            cfg.classifier_held_out, cfg.classifier_hidden, cfg.classifier_steps, cfg.seed, coarse_resolutions=coarse,
            temperature=cfg.classifier_temperature)
        result.classifier = classifier.state()
    target = ClusterFile(cfg.out).write(result, storage)
    log.info("wrote %s (identity %s); cluster sizes min %d max %d", target, result.identity,
             int(sizes.min()), int(sizes.max()))
    return target
