"""Outlier diagnostics: the selection as an outlier detector against planted labels (:func:`outlier_detection`,
for filtering's report.json and evaluation's results.json), and the controls that d(x) = metric(x, G(E(x)))
must beat to mean anything:
- trivial detectors, image statistics that need no model: if one separates the outliers, a high AUROC of
  d(x) says nothing about what the generator learnt;
- the untrained network (stage 1's seeded step 0, scored the same way): a trained d(x) that does not beat
  it measures the images' detail, not learning.
AUROCs are as computed (outliers positive); ``separation`` is max(AUROC, 1 - AUROC), since a statistic that
runs the other way separates just as well.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from sdsg_ray.artifacts.checkpoint import load_inference
from sdsg_ray.artifacts.scores import SCORE_COLUMN, ScoreSet
from sdsg_ray.artifacts.dataset import read_labels
from sdsg_ray.imaging import encode_png, load_batch, to_tensor
from sdsg_ray.manifest import read_manifest
from sdsg_ray.models import reconstruct
from sdsg_ray.models.networks import build_networks
from sdsg_ray.pretrained import build_metric
from sdsg_ray.storage import Storage

TRIVIAL_DETECTORS = ("png_size", "gradient_energy", "mean_colour_distance", "foreground_share")
# A pixel is foreground when its colour is this far (L2, 0..255 scale) from its row's background colour.
FOREGROUND_DISTANCE = 40.0


def trivial_scores(images: np.ndarray) -> dict[str, np.ndarray]:
    """Each trivial detector's score for uint8 images [N, R, R, 3] (higher = more outlying for
    png_size, gradient_energy and mean_colour_distance; foreground_share as measured)."""
    assert images.ndim == 4 and images.shape[-1] == 3 and images.dtype == np.uint8, (images.shape, images.dtype)
    x = images.astype(np.float32) / 255.0
    dx, dy = np.diff(x, axis=2), np.diff(x, axis=1)
    mean_colour = x.mean(axis=(1, 2))
    # Each row's background [N, H, 1, 3]: the median of its two outermost columns on each side (the shared
    # backgrounds are vertical gradients, sky and ground, so each row's border is its backdrop).
    border = np.concatenate([images[:, :, :2], images[:, :, -2:]], axis=2).astype(np.float32)
    background = np.median(border, axis=2, keepdims=True)
    fg = np.linalg.norm(images.astype(np.float32) - background, axis=-1) > FOREGROUND_DISTANCE
    return {
        "png_size": np.array([len(encode_png(img)) for img in images], np.float64),
        "gradient_energy": (dx ** 2).mean(axis=(1, 2, 3)) + (dy ** 2).mean(axis=(1, 2, 3)),
        "mean_colour_distance": np.linalg.norm(mean_colour - mean_colour.mean(axis=0), axis=1),
        "foreground_share": fg.mean(axis=(1, 2)).astype(np.float64),
    }


def auroc_report(is_outlier: np.ndarray, score: np.ndarray, kinds: np.ndarray | None = None) -> dict:
    """AUROC overall and per outlier kind (each kind against all inliers); None where undefined
    (a group without both classes)."""
    y = np.asarray(is_outlier, bool)
    score = np.asarray(score, np.float64)

    def auroc(rows: np.ndarray) -> float | None:
        return float(roc_auc_score(y[rows], score[rows])) if 0 < y[rows].sum() < rows.sum() else None

    by_kind = {}
    if kinds is not None:
        kinds = np.asarray(kinds)
        by_kind = {str(k): auroc(~y | (kinds == k)) for k in sorted(set(kinds[y]) - {""})}
    return {"auroc": auroc(np.ones(len(y), bool)), "auroc_by_kind": by_kind}


def separation(auroc: float | None) -> float | None:
    """How well a score separates the classes whichever way it runs: max(AUROC, 1 - AUROC)."""
    return None if auroc is None else max(auroc, 1.0 - auroc)


def trivial_report(images: np.ndarray, is_outlier: np.ndarray, kinds: np.ndarray | None = None) -> dict:
    """{detector: {auroc, separation, auroc_by_kind}} for every trivial detector."""
    reports = {name: auroc_report(is_outlier, score, kinds) for name, score in trivial_scores(images).items()}
    return {name: {"auroc": r["auroc"], "separation": separation(r["auroc"]), "auroc_by_kind": r["auroc_by_kind"]}
            for name, r in reports.items()}


@torch.no_grad()
def reconstruction_scores(synthesis: torch.nn.Module, encoder: torch.nn.Module, images: np.ndarray,
                          metric: Callable, device: str | torch.device = "cpu", batch_size: int = 64) -> np.ndarray:
    """d(x) = metric(x, G(E(x))) for uint8 images [N, R, R, 3], through models.reconstruct."""
    out = []
    for start in range(0, len(images), batch_size):
        x = to_tensor(images[start:start + batch_size]).to(device)
        recon = reconstruct(synthesis, encoder, x).image.float()
        out.append(metric(x, recon).reshape(len(x)).float().cpu().numpy())
    return np.concatenate(out).astype(np.float64)


def untrained_networks(model_config, seed: int, device: str | torch.device = "cpu"):
    """(G, E) as stage 1 initialises them: torch seeded with the training seed, then built (what
    ``TrainingRun`` does before its first step), in eval mode."""
    torch.manual_seed(seed)
    G, _, E = build_networks(model_config)
    return G.to(device).eval(), E.to(device).eval()


def untrained_scores(model_config, seed: int, images: np.ndarray, metric: Callable,
                     device: str | torch.device = "cpu", batch_size: int = 64) -> np.ndarray:
    """The untrained-network control: d(x) with stage 1's initial (G, E), scored as the trained one is."""
    G, E = untrained_networks(model_config, seed, device)
    return reconstruction_scores(G.synthesis, E, images, metric, device, batch_size)


def outlier_detection(scores_uri: str, kept_uri: str, labels_uri: str, storage: Storage,
                      controls_device: str | None = None, batch_size: int = 64) -> dict:
    """The selection as an outlier detector against planted labels: removed images are its positives.
    With ``controls_device``, also the controls on the same images (:func:`outlier_controls`)."""
    label_by_key = {row["key"]: row for row in read_labels(labels_uri, storage)}
    kept = set(read_manifest(kept_uri, storage))
    batches = ScoreSet(scores_uri).iter_batches(storage, ["key", "status", SCORE_COLUMN])
    scored = [(str(k), float(d)) for batch in batches
              for k, s, d in zip(batch["key"], batch["status"], batch[SCORE_COLUMN]) if s == "ok"]
    labelled = [(k, d) for k, d in scored if k in label_by_key]
    keys = [k for k, _ in labelled]
    y_true_a = np.array([label_by_key[k]["is_outlier"] for k in keys], bool)
    removed_a = np.array([k not in kept for k in keys], bool)
    score_a = np.array([d for _, d in labelled], np.float64)
    kinds_a = np.array([label_by_key[k].get("kind") or "" for k in keys])  # hand-made labels may have no kind
    tp = int((y_true_a & removed_a).sum())
    result = {
        "images": len(keys), "outliers": int(y_true_a.sum()), "removed": int(removed_a.sum()),
        "true_positives": tp,
        "precision": tp / max(1, int(removed_a.sum())),
        "recall": tp / max(1, int(y_true_a.sum())),
        # each outlier kind against all inliers: which kinds the generator fails to reconstruct, and which it can
        **auroc_report(y_true_a, score_a, kinds_a),
        "outlier_fraction_raw": float(y_true_a.mean()) if len(y_true_a) else None,
        "outlier_fraction_kept": float(y_true_a[~removed_a].mean()) if (~removed_a).any() else None,
        # the selection at random: removing as many images blindly gives precision = the outlier share
        "precision_random": float(y_true_a.mean()) if len(y_true_a) else None,
        "recall_random": float(removed_a.mean()) if len(removed_a) else None,
        "unlabelled": len(scored) - len(labelled),
    }
    if controls_device is not None and keys:
        result["controls"] = outlier_controls(keys, y_true_a, kinds_a, scores_uri, storage, controls_device, batch_size)
    return result


def outlier_controls(keys: Sequence[str], is_outlier: np.ndarray, kinds: np.ndarray, scores_uri: str,
                     storage: Storage, device: str, batch_size: int) -> dict:
    """The controls beside d(x)'s AUROC on the same images: the untrained network (stage 1's seeded
    initialisation, same architecture and metric, scored through models.reconstruct) and the trivial
    detectors above."""
    summary = ScoreSet(scores_uri).read_summary(storage)
    bundle = load_inference(summary["checkpoint"], storage, device="cpu")
    batch = load_batch(list(keys), storage, bundle.model.resolution)
    ok = batch["status"] == "ok"
    images, y, k = batch["image"][ok], np.asarray(is_outlier)[ok], np.asarray(kinds)[ok]
    seed = int(bundle.meta.get("seed", 0))
    metric = build_metric(summary["metric"], device=device, judge_resolution=summary.get("judge_resolution"))
    d0 = untrained_scores(bundle.model, seed, images, metric, device, batch_size)
    return {
        "untrained": {**auroc_report(y, d0, k), "seed": seed, "metric": summary["metric"],
                      "judge": metric.label(bundle.model.resolution),
                      "note": "same architecture, initialised from the training seed, scored the same way"},
        "trivial": trivial_report(images, y, k),
        "images": int(ok.sum()),
    }
