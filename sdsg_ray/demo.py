"""`sdsg demo`: the whole method end to end on a laptop-sized problem, then the live sampler.

Generates the synthetic dataset, runs the whole pipeline at tiny scale on a local Ray, writes the report
(``RunLayout(out).report``) and serves the sampler until Ctrl-C. Sized to finish within 15 minutes on a
2-core CPU machine with no network (timings: docs/benchmarks.md). Re-running with the same ``--out`` skips
what is already done.

The defaults live here (not only in configs/demo.yaml) so that the command works after a plain
``pip install`` too; configs/demo.yaml is the same config, commented, and a test keeps the two equal.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from sdsg_ray.config import Layer, SDSGConfig, build_config
from sdsg_ray.storage import get_storage

log = logging.getLogger(__name__)

DEFAULT_OUT = "sdsg-demo"

# Training's loss uses the shipped shift-tolerant AlexNet LPIPS (the paper: LPIPS-VGG): on a CPU the VGG trunk
# in every step would cost several times the whole training budget. Scoring d(x) uses the shift-tolerant VGG
# LPIPS, once per image: a network the reconstruction was not optimised against judges it, and on the demo's
# 2-kimg generator it ranks outliers above its untrained control where the AlexNet one does not. Both judge at
# the images' own 32 px: at 64-256 px no judge beat its untrained control by more on both training seeds, at
# 2-10x the cost (docs/benchmarks.md, "Which network judges d(x)" and "The judge's size").
DEMO_DEFAULTS: dict[str, dict[str, Any]] = {
    "model": {"resolution": 32, "z_dim": 64, "w_dim": 64, "mapping_layers": 2, "channel_base": 2048,
              "channel_max": 64},
    "dataset": {"n": 800, "resolution": 32, "outlier_fraction": 0.15, "seed": 0},
    "train": {"workers": 1, "cpus_per_worker": 2, "batch_size": 16, "kimg": 2.0, "checkpoint_every_kimg": 1.0,
              "ema_kimg": 0.5, "r1_gamma": 0.1, "metric": "stlpips-alex", "log_every": 20, "seed": 0},
    "score": {"actors": 1, "batch_size": 64, "cpus_per_actor": 1.0, "metric": "stlpips-vgg",
              "judge_resolution": None, "fid_features": "auto"},
    "select": {"target_threshold": 0.2, "threshold_step": 0.04, "min_size": 520},
    "cluster": {"n_latents": 4000, "clusters": 8, "metric": "stlpips-alex", "judge_resolution": None, "seed": 0},
    "serve": {"host": "127.0.0.1", "port": 8000, "min_replicas": 1, "max_replicas": 1, "num_cpus": 0.5},
    "evaluate": {"num_samples": 200, "psis": [0.3, 0.5, 0.7, 1.0], "grid_seeds": 10, "grid_psi": 0.5,
                 "fid_features": "auto", "batch_size": 64},
    "pipeline": {"root": DEFAULT_OUT, "baselines": True, "stage2_kimg": 1.0, "make_dataset": True,
                 "evaluate": True, "serve": True},
}


def demo_config(*layers: Layer) -> SDSGConfig:
    """The demo's config: its defaults as the command layer, then whatever layers the caller adds
    (``("set", {"train.kimg": 0.5})``); what the CLI builds for ``sdsg demo``."""
    flat = {f"{section}.{name}": value for section, values in DEMO_DEFAULTS.items() for name, value in values.items()}
    return build_config(("command", flat), *layers)


def _start_local_ray(config: SDSGConfig) -> None:
    """The demo's own Ray, even if `ray start` left a cluster on this machine (a plain ray.init() would
    join that one); RAY_ADDRESS still picks a cluster on purpose. Afterwards RAY_ADDRESS names this
    cluster so that everything the stages start finds it."""
    import ray

    from sdsg_ray.ray_utils import ensure_ray

    if not os.environ.get("RAY_ADDRESS") and not ray.is_initialized():
        os.environ["RAY_ADDRESS"] = "local"
    ensure_ray(config.storage)
    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address


def run_demo(config: SDSGConfig) -> str:
    """Dataset -> pipeline -> report; returns the report's URI. ``config`` is the resolved demo config
    (:func:`demo_config`, or ``sdsg demo`` with its flags); ``sdsg demo`` then serves the sampler (jobs.cli).
    Imports torch and Ray only here: the command line reads :data:`DEMO_DEFAULTS` for ``sdsg --help``."""
    from sdsg_ray.artifacts.layout import RunLayout
    from sdsg_ray.evaluation.report import write_report
    from sdsg_ray.pipeline import run_pipeline

    layout = RunLayout(config.pipeline.root)
    storage = get_storage(config.storage)
    start = time.perf_counter()
    _start_local_ray(config)
    summary = run_pipeline(config)
    report_start = time.perf_counter()
    report = write_report(layout.uri, layout.report.uri, storage,
                          title="sdsg-ray demo: Self-Distilled StyleGAN at toy scale")
    rows = [(s["name"], s["status"], s["seconds"]) for s in summary["stages"]]
    rows.append(("report", "ran", time.perf_counter() - report_start))
    log.info("stage timings (s):\n%s", "\n".join(f"  {name:<14} {status:<8} {sec:8.1f}" for name, status, sec in rows))
    log.info("demo pipeline finished in %.1f min; report: %s", (time.perf_counter() - start) / 60, report)
    return report
