"""FID/KID and the paper's comparisons, at whatever scale the machine allows.

- Tables 1/3: each stage-2 generator (trained on the filtered set Y, on a random subset of |Y| images, on
  the raw set X) against its own training set (the paper's protocol) and against X (a common yardstick).
- Fig. 7: distance against psi for global-mean and multi-modal truncation (the paper's LPIPS assignment,
  and the learned assignment when the clusters file has its classifier: does the cheaper rule change quality?).
- Fig. 4: the same seeds untruncated, mean-truncated and multimodal-truncated.
- Outlier detection of the selection against planted labels (synthetic data only).

Distances come from clean-fid's functions on in-memory features. With Inception features they are FID and
KID; with any other network they are reported as "FD (<network>)" / "KD (<network>)", never as FID.
Sampling goes through the truncation Sampler, the same code path as the HTTP service.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from tqdm import tqdm

from sdsg_ray import figures
from sdsg_ray.config import EvalModel, EvaluateConfig, SDSGConfig
from sdsg_ray.pretrained import distance_labels
from sdsg_ray.storage import ObjectNotFound, Storage, get_storage, join

log = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
FIG7_FILE = "fid_vs_psi.png"
FIG4_FILE = "truncation_grid.png"
TRUNCATION_MODES = ("mean", "multimodal")
LEARNED_CURVE = "multimodal_learned"  # Fig. 7 curve: multi-modal truncation with the learned assignment
KID_SUBSETS = 100


# ----------------------------------------------------------------------------------------------------------
# Distances on features


@dataclass(frozen=True)
class Distances:
    fd: float  # Frechet distance (FID with Inception features)
    kd: float  # kernel distance (KID), unbiased MMD^2 with the cubic polynomial kernel


def distances(feats_a: np.ndarray, feats_b: np.ndarray) -> Distances:
    """FD and KD between two feature sets [N, D] through clean-fid's own functions."""
    from cleanfid.fid import fid_from_feats, kernel_distance

    assert feats_a.ndim == 2 and feats_b.ndim == 2 and feats_a.shape[1] == feats_b.shape[1], (
        feats_a.shape, feats_b.shape)
    if min(len(feats_a), len(feats_b)) < 2:
        raise ValueError(f"need at least 2 samples per set, got {len(feats_a)} and {len(feats_b)}")
    fd = float(fid_from_feats(feats_a.astype(np.float64), feats_b.astype(np.float64)))
    # kernel_distance draws its subsets from numpy's global RNG: seed it so a rerun gives the same KID.
    np.random.seed(0)
    subset = min(len(feats_a), len(feats_b), 1000)
    kd = float(kernel_distance(feats_a, feats_b, num_subsets=KID_SUBSETS, max_subset_size=subset))
    return Distances(fd, kd)


def unbiased_mmd2(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """KID's estimator on two whole feature sets: unbiased MMD^2 with the cubic polynomial kernel
    k(x, y) = (x.y / d + 1)^3 (diagonals left out of the within-set means), as clean-fid's
    ``kernel_distance`` computes it per subset."""
    a, b = feats_a.astype(np.float64), feats_b.astype(np.float64)
    d, m, n = a.shape[1], len(a), len(b)
    k_aa, k_bb, k_ab = ((x @ y.T / d + 1) ** 3 for x, y in ((a, a), (b, b), (a, b)))
    return float((k_aa.sum() - np.trace(k_aa)) / (m * (m - 1)) + (k_bb.sum() - np.trace(k_bb)) / (n * (n - 1))
                 - 2 * k_ab.mean())


def t_interval(values: Sequence[float], confidence: float = 0.95) -> dict:
    """Mean and Student-t interval over independent estimates (one per disjoint sample block)."""
    from scipy import stats

    v = np.asarray(values, np.float64)
    mean = float(v.mean())
    if len(v) < 2:
        return {"mean": mean, "low": None, "high": None, "n": len(v), "confidence": confidence}
    half = float(stats.t.ppf(0.5 + confidence / 2, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v)))
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": len(v), "confidence": confidence}


KID_BLOCKS = 5


def block_kids(fake: np.ndarray, real: np.ndarray, blocks: int = KID_BLOCKS) -> list[float]:
    """Unbiased KID of each of ``blocks`` disjoint blocks of the samples against the whole real set: the
    per-block values are independent estimates (the same seeds' block k in every model, so two models'
    values pair up block by block)."""
    return [unbiased_mmd2(part, real) for part in np.array_split(fake, blocks) if len(part) >= 2]


def compare_blocks(a: Sequence[float], b: Sequence[float]) -> dict:
    """Paired difference a - b over blocks with its 95 % t-interval; ``holds`` (a lower than b) only when
    the whole interval lies below zero."""
    diff = t_interval([x - y for x, y in zip(a, b)])
    diff["holds"] = diff["high"] is not None and diff["high"] < 0
    diff["interval"] = f"t-interval over {diff['n']} disjoint sample blocks (paired by seed block)"
    return diff


# ----------------------------------------------------------------------------------------------------------
# Features of real sets and of samples


class FeatureBank:
    """Features of real image sets, computed once per set URI (X is the reference of every model)."""

    def __init__(self, extractor, storage: Storage, resolution: int, max_real: int | None, seed: int,
                 batch_size: int) -> None:
        self.extractor = extractor
        self.storage = storage
        self.resolution = resolution
        self.max_real = max_real
        self.seed = seed
        self.batch_size = batch_size
        self.sizes: dict[str, int] = {}
        self.failed: dict[str, int] = {}
        self._cache: dict[str, np.ndarray] = {}

    def real(self, uri: str) -> np.ndarray:
        if uri not in self._cache:
            self._cache[uri] = self._compute(uri)
        return self._cache[uri]

    def _compute(self, uri: str) -> np.ndarray:
        from sdsg_ray.imaging import load_batch, to_tensor
        from sdsg_ray.manifest import resolve_images

        keys = resolve_images(uri, self.storage)
        if not keys:
            raise ObjectNotFound(f"{uri}: no images found")
        self.sizes[uri] = len(keys)
        if self.max_real is not None and len(keys) > self.max_real:
            keys = sorted(random.Random(self.seed).sample(keys, self.max_real))
        chunks, failed = [], 0
        for start in tqdm(range(0, len(keys), self.batch_size), desc=f"features {uri}", unit="batch"):
            batch = load_batch(keys[start:start + self.batch_size], self.storage, self.resolution)
            ok = batch["status"] == "ok"
            failed += int((~ok).sum())
            if ok.any():
                chunks.append(self.extractor(to_tensor(batch["image"][ok])))
        self.failed[uri] = failed
        if failed:
            log.warning("%s: %d images could not be read and are left out of its features", uri, failed)
        return np.concatenate(chunks)

    def images(self, images: np.ndarray) -> np.ndarray:
        """Features of generated uint8 NHWC images."""
        from sdsg_ray.imaging import to_tensor

        return np.concatenate([self.extractor(to_tensor(images[i:i + self.batch_size]))
                               for i in range(0, len(images), self.batch_size)])


def sample_features(sampler, bank: FeatureBank, seeds: Sequence[int], psi: float, mode: str,
                    clusters: Sequence[int] | None = None, desc: str = "") -> np.ndarray:
    """Features of the sampler's images for the seeds; ``clusters`` pins each seed's multimodal center."""
    from sdsg_ray.truncation import SampleSpec

    feats = []
    step = sampler.batch_size
    for start in tqdm(range(0, len(seeds), step), desc=desc or f"{mode} psi={psi}", unit="batch", leave=False):
        chunk = seeds[start:start + step]
        pinned = clusters[start:start + step] if clusters is not None else [None] * len(chunk)
        specs = [SampleSpec(int(s), float(psi), mode, None if c is None else int(c)) for s, c in zip(chunk, pinned)]
        feats.append(bank.images(sampler.render_specs(specs)))
    return np.concatenate(feats)


def nearest_centers(sampler, seeds: Sequence[int], by: str | None = None) -> list[int]:
    """Each seed's multimodal center, computed once and reused at every psi (it does not depend on psi);
    ``by``: the assignment rule (default: the sampler's)."""
    assigner = sampler.assigner if by is None else sampler.assigners[by]
    out: list[int] = []
    for start in range(0, len(seeds), sampler.batch_size):
        w = sampler.latents(seeds[start:start + sampler.batch_size])
        out += [int(k) for k in assigner.assign(w)]
    return out


# ----------------------------------------------------------------------------------------------------------
# The comparisons


def evaluate_models(models: Sequence[EvalModel], raw: str, bank: FeatureBank, seeds: Sequence[int],
                    storage: Storage, device: str, batch_size: int) -> list[dict]:
    """Tables 1/3: every model against its own training set and against the raw set X."""
    from sdsg_ray.artifacts.checkpoint import load_inference
    from sdsg_ray.truncation import Sampler

    rows = []
    for model in models:
        bundle = load_inference(model.checkpoint, storage, device=device)
        sampler = Sampler(bundle, batch_size=batch_size)
        fake = sample_features(sampler, bank, seeds, 1.0, "none", desc=f"samples {model.name}")
        own = distances(fake, bank.real(model.train_data))
        vs_raw = distances(fake, bank.real(raw))
        rows.append({
            "model": model.name, "checkpoint": model.checkpoint, "identity": bundle.identity,
            "kimg": bundle.meta.get("kimg"), "train_data": model.train_data,
            "train_size": bank.sizes[model.train_data],
            "fd_vs_train": own.fd, "kd_vs_train": own.kd, "fd_vs_raw": vs_raw.fd, "kd_vs_raw": vs_raw.kd,
            # unbiased KID per disjoint block of the samples: the interval behind Tables 1/3's claims
            "kid_blocks_vs_train": block_kids(fake, bank.real(model.train_data)),
            "kid_blocks_vs_raw": block_kids(fake, bank.real(raw)),
        })
        rows[-1]["kid_vs_train_interval"] = t_interval(rows[-1]["kid_blocks_vs_train"])
        log.info("%s: vs train %.4g / vs raw %.4g", model.name, own.fd, vs_raw.fd)
    return rows


def truncation_curve(sampler, bank: FeatureBank, reference: np.ndarray, seeds: Sequence[int],
                     psis: Sequence[float], untruncated: Distances | None = None) -> dict:
    """Fig. 7: FD/KD against psi for each truncation mode, the same seeds at every point.

    At psi = 1 every mode draws w itself, so that point is computed once (or taken from ``untruncated``,
    the same seeds' untruncated distances to ``reference`` when the caller already has them).
    "multimodal" uses the sampler's own assignment (the paper's LPIPS rule in run_evaluation); when the
    sampler also offers the learned one, its curve is LEARNED_CURVE, with how often it picked the same center.
    """
    centers = {}
    if sampler.assigner is not None:
        centers["multimodal"] = nearest_centers(sampler, seeds)
        if "learned" in sampler.assignments and sampler.assign_by != "learned":
            centers[LEARNED_CURVE] = nearest_centers(sampler, seeds, "learned")
    curve: dict = {"psis": list(psis)}
    for name in TRUNCATION_MODES + (LEARNED_CURVE,):
        if name != "mean" and name not in centers:
            continue
        mode = "mean" if name == "mean" else "multimodal"
        points = []
        for psi in psis:
            if psi == 1.0 and untruncated is not None:
                points.append(untruncated)
                continue
            feats = sample_features(sampler, bank, seeds, psi, mode, centers.get(name), desc=f"{name} psi={psi}")
            points.append(distances(feats, reference))
            if psi == 1.0:
                untruncated = points[-1]
        curve[name] = {"fd": [p.fd for p in points], "kd": [p.kd for p in points]}
    if LEARNED_CURVE in centers:
        same = np.mean(np.array(centers[LEARNED_CURVE]) == np.array(centers["multimodal"]))
        curve[LEARNED_CURVE]["same_center_as_lpips"] = float(same)
    return curve


def truncation_grid(sampler, seeds: Sequence[int], psi: float) -> tuple[np.ndarray, list[str]]:
    """Fig. 4: rows none / mean / multimodal of the same seeds; returns the grid and its row labels."""
    from sdsg_ray.imaging import image_grid

    modes = ["none", "mean"] + (["multimodal"] if sampler.assigner is not None else [])
    rows = [sampler.sample(seeds, psi=psi, mode=mode) for mode in modes]
    grid = image_grid(np.concatenate(rows), ncols=len(seeds), pad=2)
    return grid, [m if m == "none" else f"{m}, ψ={psi}" for m in modes]


def outlier_detection(scores_uri: str, kept_uri: str, labels_uri: str, storage: Storage,
                      controls_device: str | None = None, batch_size: int = 64) -> dict:
    """The selection as an outlier detector against planted labels: removed images are its positives.
    With ``controls_device``, also the controls on the same images (:func:`outlier_controls`)."""
    from sdsg_ray.dataset.synthetic import read_labels
    from sdsg_ray.evaluation.controls import auroc_report
    from sdsg_ray.artifacts.scores import iter_score_batches
    from sdsg_ray.manifest import read_manifest

    label_by_key = {row["key"]: row for row in read_labels(labels_uri, storage)}
    kept = set(read_manifest(kept_uri, storage))
    y_true, y_score, removed, kinds, keys = [], [], [], [], []
    unlabelled = 0
    rows = ((str(k), s, float(d)) for batch in iter_score_batches(scores_uri, storage, ["key", "status", "d_lpips"])
            for k, s, d in zip(batch["key"], batch["status"], batch["d_lpips"]))
    for key, status, d in rows:
        if status != "ok":
            continue
        if key not in label_by_key:
            unlabelled += 1
            continue
        y_true.append(label_by_key[key]["is_outlier"])
        kinds.append(label_by_key[key].get("kind") or "")  # hand-made labels may have no kind column
        y_score.append(d)
        keys.append(key)
        removed.append(key not in kept)
    y_true_a, removed_a = np.array(y_true, bool), np.array(removed, bool)
    score_a, kinds_a = np.array(y_score, np.float64), np.array(kinds)
    tp = int((y_true_a & removed_a).sum())
    # Each outlier kind against all inliers: which kinds the generator fails to reconstruct, and which it can.
    ranking = auroc_report(y_true_a, score_a, kinds_a)
    result = {
        "images": len(y_true), "outliers": int(y_true_a.sum()), "removed": int(removed_a.sum()),
        "true_positives": tp,
        "precision": tp / max(1, int(removed_a.sum())),
        "recall": tp / max(1, int(y_true_a.sum())),
        "auroc": ranking["auroc"],
        "auroc_by_kind": ranking["auroc_by_kind"],
        "outlier_fraction_raw": float(y_true_a.mean()) if len(y_true_a) else None,
        "outlier_fraction_kept": float(y_true_a[~removed_a].mean()) if (~removed_a).any() else None,
        # the selection at random: removing as many images blindly gives precision = the outlier share
        "precision_random": float(y_true_a.mean()) if len(y_true_a) else None,
        "recall_random": float(removed_a.mean()) if len(removed_a) else None,
        "unlabelled": unlabelled,
    }
    if controls_device is not None and keys:
        result["controls"] = outlier_controls(keys, y_true_a, kinds_a, scores_uri, storage, controls_device, batch_size)
    return result


def outlier_controls(keys: Sequence[str], is_outlier: np.ndarray, kinds: np.ndarray, scores_uri: str,
                     storage: Storage, device: str, batch_size: int) -> dict:
    """The controls beside d(x)'s AUROC on the same images: the untrained network (stage 1's seeded
    initialisation, same architecture and metric, scored through models.reconstruct) and the trivial
    detectors (sdsg_ray.evaluation.controls)."""
    from sdsg_ray.artifacts.checkpoint import load_inference
    from sdsg_ray.evaluation.controls import auroc_report, trivial_report, untrained_scores
    from sdsg_ray.imaging import load_batch
    from sdsg_ray.pretrained import build_metric

    summary = json.loads(storage.read_text(join(scores_uri, "summary.json")))
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


# ----------------------------------------------------------------------------------------------------------
# Entry point


def run_evaluation(config: SDSGConfig) -> dict:
    """``sdsg evaluate``: write ``<out>/results.json``, fid_vs_psi.png and truncation_grid.png."""
    from sdsg_ray.artifacts.checkpoint import load_inference
    from sdsg_ray.pretrained import build_fid_features, build_metric
    from sdsg_ray.truncation import Sampler, load_clusters
    from sdsg_ray.truncation.clusters import clusters_uri

    cfg: EvaluateConfig = config.evaluate
    storage = get_storage(config.storage)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    extractor = build_fid_features(cfg.fid_features, device=device)
    fd_label, kd_label = distance_labels(extractor.name, extractor.is_inception)
    log.info("evaluation features: %s (%s)", extractor.name, fd_label)

    bundle = load_inference(cfg.checkpoint, storage, device=device)
    bank = FeatureBank(extractor, storage, bundle.G_ema.resolution, cfg.max_real, cfg.seed, cfg.batch_size)
    seeds = list(range(cfg.seed, cfg.seed + cfg.num_samples))
    models = cfg.models or [EvalModel(name="model", checkpoint=cfg.checkpoint, train_data=cfg.data)]

    clusters = load_clusters(cfg.clusters, storage) if storage.exists(clusters_uri(cfg.clusters)) else None
    if clusters is None:
        log.warning("no clusters at %s: multi-modal truncation is left out", cfg.clusters)
    metric = (build_metric(clusters.metric, device=device, judge_resolution=clusters.judge_resolution)
              if clusters is not None else None)
    # The paper's LPIPS rule is the reference; the learned rule (if the clusters have it) is a second curve.
    sampler = Sampler(bundle, clusters, metric=metric, assign_by="lpips", batch_size=cfg.batch_size)

    results: dict = {
        "features": {"name": extractor.name, "dim": extractor.dim, "is_inception": extractor.is_inception},
        "labels": {"fd": fd_label, "kd": kd_label},
        "num_samples": cfg.num_samples,
        "raw_data": cfg.data,
        "checkpoint": cfg.checkpoint,
    }
    results["models"] = evaluate_models(models, cfg.data, bank, seeds, storage, device, cfg.batch_size)
    rows = {m["model"]: m for m in results["models"]}
    if "filtered" in rows:  # Tables 1/3: filtered minus the other row, unbiased KID vs own training set
        results["table_claims"] = {
            other: compare_blocks(rows["filtered"]["kid_blocks_vs_train"], rows[other]["kid_blocks_vs_train"])
            for other in ("raw", "random") if other in rows}
    reference = bank.real(models[0].train_data)  # the paper measures FID against the training set
    first = results["models"][0]  # its untruncated samples, same seeds: Fig. 7's psi = 1 point
    untruncated = (Distances(first["fd_vs_train"], first["kd_vs_train"])
                   if first["checkpoint"] == cfg.checkpoint else None)
    results["truncation"] = truncation_curve(sampler, bank, reference, seeds, cfg.psis, untruncated)
    results["truncation"]["reference"] = models[0].train_data
    storage.write_bytes(join(cfg.out, FIG7_FILE), figures.distance_vs_psi(results["truncation"], fd_label))
    grid, row_labels = truncation_grid(sampler, list(range(cfg.seed, cfg.seed + cfg.grid_seeds)), cfg.grid_psi)
    storage.write_bytes(join(cfg.out, FIG4_FILE), figures.labelled_grid(
        grid, row_labels, "Same seeds: no truncation / mean / multi-modal (paper Fig. 4)"))
    results["figures"] = {"fid_vs_psi": FIG7_FILE, "truncation_grid": FIG4_FILE}
    results["real_sets"] = {uri: {"size": n, "unreadable": bank.failed.get(uri, 0)} for uri, n in bank.sizes.items()}

    if cfg.labels and cfg.scores and cfg.selection and storage.exists(cfg.labels):
        results["outliers"] = outlier_detection(cfg.scores, join(cfg.selection, "kept.parquet"), cfg.labels, storage,
                                                controls_device=device, batch_size=cfg.batch_size)
    if cfg.selection and storage.exists(join(cfg.selection, "report.json")):
        results["selection"] = {k: v for k, v in json.loads(storage.read_text(join(cfg.selection, "report.json"))).items()
                                if k not in ("curve", "best", "worst")}

    storage.write_text(join(cfg.out, RESULTS_FILE), json.dumps(results, indent=2))
    _log_summary(results)
    return results


def _log_summary(results: dict) -> None:
    fd = results["labels"]["fd"]
    lines = [f"{'model':<10} {fd + ' vs train':>22} {fd + ' vs raw':>22}"]
    lines += [f"{row['model']:<10} {row['fd_vs_train']:>22.4g} {row['fd_vs_raw']:>22.4g}" for row in results["models"]]
    curve = results["truncation"]
    lines += [f"{mode:<10} " + " ".join(f"ψ={p}:{v:.4g}" for p, v in zip(curve["psis"], curve[mode]["fd"]))
              for mode in TRUNCATION_MODES + (LEARNED_CURVE,) if mode in curve]
    log.info("evaluation:\n%s", "\n".join(lines))
