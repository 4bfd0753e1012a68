"""Scoring throughput: the Ray Data pipeline vs the same models in a plain loop, same machine, one run.

    python3 bench/bench_scoring.py --images 1536 --batch-size 64 --repeats 3

1. Plain loop: ReconstructionScorer (G(E(x)), the perceptual metric, FID features of x and G(E(x))) over
   pre-decoded uint8 images already in memory, batch by batch. No I/O, no decode: the ceiling. Once with
   every CPU's torch threads, once with one thread (what one scoring actor with one CPU gets).
2. Pipeline: `run_scoring` on the same images stored as PNG files, same batch size: listing, read +
   decode tasks, the actor pool, the driver writing shards. Reported end to end (incl. Ray Data start-up
   and actor start-up) and steady state (from the first scored batch on), with 1 and with 2 actors.
3. A projection (NOT a measurement) of GPU-hours per million images at 256 px with the paper's
   architecture, from FLOPs counted by torch's FlopCounterMode and a stated sustained GPU throughput.

Weights are random: throughput does not depend on their values. Images: smooth random PNGs at 48 px,
resized to the model resolution by the reader as real photos would be.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sdsg_ray.artifacts.checkpoint import export_inference, load_inference
from sdsg_ray.config import ModelConfig, load_config
from sdsg_ray.filtering.scorer import ReconstructionScorer
from sdsg_ray.imaging import load_batch
from sdsg_ray.models.networks import build_networks
from sdsg_ray.storage import get_storage

PAPER_256 = ModelConfig(resolution=256, z_dim=512, w_dim=512, mapping_layers=8, channel_base=16384, channel_max=512)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=1536)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="plain-loop passes (median reported)")
    p.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray instance")
    p.add_argument("--metric", default="auto")
    p.add_argument("--fid-features", default="auto")
    p.add_argument("--gpu-tflops", type=float, default=100.0,
                   help="assumed sustained GPU throughput for the projection (A100 bf16 ~312 peak, ~1/3 sustained)")
    p.add_argument("--workdir", default=None, help="default: a temporary directory, removed at the end")
    return p.parse_args()


def write_corpus(root: Path, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:48, 0:48] / 48
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = rng.uniform(0, 255, 3) + xx[..., None] * rng.uniform(-120, 120, 3) + yy[..., None] * rng.uniform(-120, 120, 3)
        buf = io.BytesIO()
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="PNG")
        (root / f"img-{i:06d}.png").write_bytes(buf.getvalue())


def plain_loop(scorer: ReconstructionScorer, images: np.ndarray, batch: int, repeats: int) -> float:
    """Median images/s over `repeats` passes (one warm-up batch first)."""
    scorer(images[:batch])
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(0, len(images), batch):
            scorer(images[i : i + batch])
        rates.append(len(images) / (time.perf_counter() - t0))
    return statistics.median(rates)


def pipeline_run(data: str, checkpoint: str, out: str, batch: int, actors: int, cpus: int, metric: str,
                 features: str) -> dict:
    """One scoring run; the actors share what the read/decode tasks leave (one CPU), at most one CPU each."""
    from sdsg_ray.filtering.score import run_scoring

    shutil.rmtree(out, ignore_errors=True)
    config = load_config(None, {
        "score.data": data, "score.checkpoint": checkpoint, "score.out": out, "score.batch_size": batch,
        "score.actors": actors, "score.min_actors": actors, "score.cpus_per_actor": min(1.0, (cpus - 1) / actors),
        "score.metric": metric, "score.fid_features": features,
        "score.manifest_shard_size": max(batch, 256),
    })
    return run_scoring(config)


def flops_per_image(metric, features, model: ModelConfig) -> dict[str, float]:
    """Forward FLOPs of E, G.synthesis, the metric and the feature net (x2) for one image at model size."""
    from torch.utils.flop_counter import FlopCounterMode

    G, _, E = build_networks(model)
    for net in (G, E):
        net.eval().requires_grad_(False)  # FlopCounterMode's module hooks trip over no_grad outputs
    x = torch.rand(1, 3, model.resolution, model.resolution) * 2 - 1
    counts = {}
    for name, fn in {
        "E": lambda: E(x),
        "G.synthesis": lambda: G.synthesis(E(x), noise_mode="const"),
        "metric": lambda: metric(x, x),
        "features x2": lambda: (features(x), features(x)),
    }.items():
        with FlopCounterMode(display=False) as counter:
            fn()
        counts[name] = float(counter.get_total_flops())
    counts["G.synthesis"] -= counts["E"]  # measured as G(E(x)); keep G alone
    counts["total"] = sum(counts.values())
    return counts


def main() -> None:
    args = parse_args()
    import ray

    from sdsg_ray.pretrained import build_fid_features, build_metric

    torch.set_num_threads(args.num_cpus)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-scoring-"))
    storage = get_storage()
    data = work / "raw"
    if not data.exists():
        write_corpus(data, args.images)
    model = ModelConfig()
    torch.manual_seed(0)
    G, _, E = build_networks(model)
    checkpoint = str(work / "stage1" / "inference.pt")
    export_inference(G, E, model, {"stage": "bench-random-weights"}, checkpoint, storage)

    # 1. plain loop over pre-decoded images
    bundle = load_inference(checkpoint, storage)
    metric = build_metric(args.metric)
    features = build_fid_features(args.fid_features)
    keys = sorted(str(p) for p in data.glob("*.png"))
    images = load_batch(keys, storage, model.resolution)["image"]
    scorer = ReconstructionScorer(bundle, metric, features, torch.device("cpu"))
    loop_rate = plain_loop(scorer, images, args.batch_size, args.repeats)
    torch.set_num_threads(1)  # what one scoring actor gets (Ray sets its threads to its CPUs)
    loop_rate_1_thread = plain_loop(scorer, images, args.batch_size, args.repeats)
    torch.set_num_threads(args.num_cpus)

    # 2. the pipeline, 1 and 2 actors, same batch size
    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False)
    runs = {}
    for actors in (1, 2):
        s = pipeline_run(str(data), checkpoint, str(work / f"scores-{actors}"), args.batch_size, actors,
                         args.num_cpus, metric.name, features.name)
        runs[actors] = {"end_to_end": s["images_per_s"], "steady": s["images_per_s_steady"], "seconds": s["seconds_this_run"]}
    ray.shutdown()

    # 3. projection at 256 px, paper architecture
    flops = flops_per_image(metric, features, PAPER_256)
    gpu_s_per_image = flops["total"] / (args.gpu_tflops * 1e12)
    gpu_hours_per_million = gpu_s_per_image * 1e6 / 3600

    result = {
        "images": len(keys), "batch_size": args.batch_size, "resolution": model.resolution, "cpus": args.num_cpus,
        "metric": metric.name, "features": features.name,
        "plain_loop_images_per_s": round(loop_rate, 1),
        "plain_loop_1_thread_images_per_s": round(loop_rate_1_thread, 1),
        "pipeline": runs,
        "pipeline_steady_vs_loop_1_actor": round(runs[1]["steady"] / loop_rate, 3) if runs[1]["steady"] else None,
        "pipeline_end_to_end_vs_loop_1_actor": round(runs[1]["end_to_end"] / loop_rate, 3),
        "pipeline_steady_vs_loop_2_actors": round(runs[2]["steady"] / loop_rate, 3) if runs[2]["steady"] else None,
        "pipeline_end_to_end_vs_loop_2_actors": round(runs[2]["end_to_end"] / loop_rate, 3),
        "pipeline_steady_1_actor_vs_loop_1_thread": round(runs[1]["steady"] / loop_rate_1_thread, 3) if runs[1]["steady"] else None,
        "actors_2_vs_1_steady": round(runs[2]["steady"] / runs[1]["steady"], 3) if runs[1]["steady"] and runs[2]["steady"] else None,
        "projection_256px": {
            "model": PAPER_256.model_dump(),
            "gflops_per_image": {k: round(v / 1e9, 3) for k, v in flops.items()},
            "assumed_sustained_gpu_tflops": args.gpu_tflops,
            "gpu_hours_per_million_images": round(gpu_hours_per_million, 2),
        },
    }
    print(json.dumps(result, indent=2))
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
