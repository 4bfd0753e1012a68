"""FID/KID and the paper's comparisons, at whatever scale the machine allows.

- Tables 1/3: each stage-2 generator (trained on the filtered set Y, on a random subset of |Y| images, on
  the raw set X) against its own training set (the paper's protocol) and against X (a common yardstick).
- Fig. 7 and Fig. 4: truncation (:mod:`sdsg_ray.evaluation.truncation_curves`).
- Outlier detection of the selection against planted labels (synthetic data only; :mod:`sdsg_ray.diagnostics`).
With Inception features the distances are FID and KID; with any other network "FD (<network>)" and
"KD (<network>)", never FID.
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch

from sdsg_ray import figures
from sdsg_ray.artifacts.checkpoint import load_inference
from sdsg_ray.artifacts.clusters import ClusterFile
from sdsg_ray.artifacts.evaluation import EvaluationResults
from sdsg_ray.artifacts.selection import FilteredSet
from sdsg_ray.config import EvalModel, EvaluateConfig, SDSGConfig
from sdsg_ray.diagnostics import outlier_detection
from sdsg_ray.distances import Distances, block_kids, compare_blocks, distances, t_interval
from sdsg_ray.evaluation.features import FeatureBank, sample_features
from sdsg_ray.evaluation.truncation_curves import truncation_curve, truncation_grid
from sdsg_ray.pretrained import build_fid_features, build_metric, distance_labels
from sdsg_ray.storage import Storage, get_storage
from sdsg_ray.truncation.sampler import Sampler

log = logging.getLogger(__name__)


def evaluate_models(models: Sequence[EvalModel], raw: str, bank: FeatureBank, seeds: Sequence[int],
                    storage: Storage, device: str, batch_size: int) -> list[dict]:
    """Tables 1/3: every model against its own training set and against the raw set X."""
    rows = []
    for model in models:
        bundle = load_inference(model.checkpoint, storage, device=device)
        sampler = Sampler(bundle, batch_size=batch_size)
        fake = sample_features(sampler, bank, seeds, 1.0, "none", desc=f"samples {model.name}")
        own, vs_raw = distances(fake, bank.real(model.train_data)), distances(fake, bank.real(raw))
        kid_blocks = block_kids(fake, bank.real(model.train_data))
        rows.append({
            "model": model.name, "checkpoint": model.checkpoint, "identity": bundle.identity,
            "kimg": bundle.meta.get("kimg"), "train_data": model.train_data,
            "train_size": bank.sizes[model.train_data],
            "fd_vs_train": own.fd, "kd_vs_train": own.kd, "fd_vs_raw": vs_raw.fd, "kd_vs_raw": vs_raw.kd,
            # unbiased KID per disjoint block of the samples: the interval behind Tables 1/3's claims
            "kid_blocks_vs_train": kid_blocks, "kid_blocks_vs_raw": block_kids(fake, bank.real(raw)),
            "kid_vs_train_interval": t_interval(kid_blocks),
        })
        log.info("%s: vs train %.4g / vs raw %.4g", model.name, own.fd, vs_raw.fd)
    return rows


def run_evaluation(config: SDSGConfig) -> dict:
    """``sdsg evaluate``: write the results and the paper's Fig. 7 and Fig. 4 (:class:`EvaluationResults`)."""
    cfg: EvaluateConfig = config.evaluate
    out = EvaluationResults(cfg.out)
    storage = get_storage(config.storage)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    extractor = build_fid_features(cfg.fid_features, device=device)
    fd_label, kd_label = distance_labels(extractor.name, extractor.is_inception)
    log.info("evaluation features: %s (%s)", extractor.name, fd_label)

    bundle = load_inference(cfg.checkpoint, storage, device=device)
    bank = FeatureBank(extractor, storage, bundle.G_ema.resolution, cfg.max_real, cfg.seed, cfg.batch_size)
    seeds = list(range(cfg.seed, cfg.seed + cfg.num_samples))
    models = cfg.models or [EvalModel(name="model", checkpoint=cfg.checkpoint, train_data=cfg.data)]

    cluster_file = ClusterFile(cfg.clusters)
    clusters = cluster_file.read(storage) if storage.exists(cluster_file.file) else None
    if clusters is None:
        log.warning("no clusters at %s: multi-modal truncation is left out", cfg.clusters)
    metric = (build_metric(clusters.metric, device=device, judge_resolution=clusters.judge_resolution)
              if clusters is not None else None)
    # The paper's LPIPS rule is the reference; the learned rule (if the clusters have it) is a second curve.
    sampler = Sampler(bundle, clusters, metric=metric, assign_by="lpips", batch_size=cfg.batch_size)

    results: dict = {
        "features": {"name": extractor.name, "dim": extractor.dim, "is_inception": extractor.is_inception},
        "labels": {"fd": fd_label, "kd": kd_label},
        "num_samples": cfg.num_samples, "raw_data": cfg.data, "checkpoint": cfg.checkpoint,
        "models": evaluate_models(models, cfg.data, bank, seeds, storage, device, cfg.batch_size),
    }
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
    storage.write_bytes(out.fig7, figures.distance_vs_psi(results["truncation"], fd_label))
    grid, row_labels = truncation_grid(sampler, list(range(cfg.seed, cfg.seed + cfg.grid_seeds)), cfg.grid_psi)
    storage.write_bytes(out.fig4, figures.labelled_grid(
        grid, row_labels, "Same seeds: no truncation / mean / multi-modal (paper Fig. 4)"))
    results["figures"] = {"fid_vs_psi": EvaluationResults.fig7.name, "truncation_grid": EvaluationResults.fig4.name}
    results["real_sets"] = {uri: {"size": n, "unreadable": bank.failed.get(uri, 0)} for uri, n in bank.sizes.items()}

    selection = FilteredSet(cfg.selection) if cfg.selection else None
    if cfg.labels and cfg.scores and selection and storage.exists(cfg.labels):
        results["outliers"] = outlier_detection(cfg.scores, selection.kept, cfg.labels, storage,
                                                controls_device=device, batch_size=cfg.batch_size)
    report = selection.read_report_or_none(storage) if selection else None
    if report is not None:
        results["selection"] = {k: v for k, v in report.items() if k not in ("curve", "best", "worst")}

    out.write(results, storage)
    _log_summary(results)
    return results


def _log_summary(results: dict) -> None:
    fd = results["labels"]["fd"]
    lines = [f"{'model':<10} {fd + ' vs train':>22} {fd + ' vs raw':>22}"]
    lines += [f"{row['model']:<10} {row['fd_vs_train']:>22.4g} {row['fd_vs_raw']:>22.4g}" for row in results["models"]]
    curve = results["truncation"]
    lines += [f"{name:<10} " + " ".join(f"ψ={p}:{v:.4g}" for p, v in zip(curve["psis"], line["fd"]))
              for name, line in curve.items() if isinstance(line, dict)]
    log.info("evaluation:\n%s", "\n".join(lines))
