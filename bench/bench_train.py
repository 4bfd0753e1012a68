"""Training throughput on CPU through the real Ray Train path: 1 worker x 2 threads vs 2 workers x 1 thread.

    python bench/bench_train.py [--steps 40] [--resolution 32] [--channel-max 64] [--batch 8]

One step = G main + D main + the amortised lazy regularisers (path length every 4, R1 every 16) + E's terms
(stage joint). Images/s is the median over report windows (``log_every`` steps, the first window dropped
as warm-up), summed over workers. Scaling efficiency = 2-worker throughput / 1-worker throughput (same 2
cores). Also prints the per-step time of each config so the demo can budget its kimg, and the CPU
seconds per step of the in-process loop on one thread (``time.process_time``), which shared or
oversubscribed machines distort much less than wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import ray  # noqa: E402

from sdsg_ray.config import load_config  # noqa: E402
from sdsg_ray.dataset.synthetic import make_dataset  # noqa: E402
from sdsg_ray.distributed.train import run_training  # noqa: E402
from sdsg_ray.storage import get_storage, join  # noqa: E402


def measure(data: str, out: str, args: argparse.Namespace, stage: str, workers: int, threads: int) -> dict:
    log_every = max(2, args.steps // 8)
    config = load_config(None, {
        "model.resolution": args.resolution, "model.channel_max": args.channel_max,
        "train.stage": stage, "train.metric": args.metric, "train.data": data, "train.out": out,
        "train.workers": workers, "train.cpus_per_worker": threads, "train.threads_per_worker": threads,
        "train.batch_size": args.batch, "train.kimg": args.steps * args.batch / 1000,
        "train.checkpoint_every_kimg": 10_000, "train.log_every": log_every,
    })
    start = time.perf_counter()
    run_training(config)
    wall = time.perf_counter() - start
    rows = [json.loads(line) for line in get_storage().read_text(join(out, "metrics.jsonl")).splitlines() if line]
    windows = [row["images_per_s_per_worker"] * workers for row in rows if row["step"] > 0][1:]
    images_per_s = statistics.median(windows)
    return {
        "stage": stage, "workers": workers, "threads": threads, "images_per_s": images_per_s,
        "step_s": args.batch / images_per_s, "wall_s": wall,
    }


def cpu_seconds_per_step(args: argparse.Namespace, stage: str, steps: int = 16) -> float:
    """Median CPU time of one TrainingRun.step on one thread (no Ray, no data loading)."""
    import torch

    from sdsg_ray.pretrained import build_metric
    from sdsg_ray.training.loop import TrainingRun

    torch.set_num_threads(1)
    config = load_config(None, {
        "model.resolution": args.resolution, "model.channel_max": args.channel_max, "train.stage": stage,
        "train.metric": args.metric, "train.batch_size": args.batch,
    })
    run = TrainingRun(config, metric=build_metric(args.metric) if stage == "joint" else None)
    real = torch.randint(0, 256, (args.batch, args.resolution, args.resolution, 3), dtype=torch.uint8)
    run.step(real)  # warm-up (allocations, first regularisation step)
    times = []
    for _ in range(steps):  # steps 1..16: four path-length and one R1 step, amortised as in training
        start = time.process_time()
        run.step(real)
        times.append(time.process_time() - start)
    return statistics.mean(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--channel-max", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--metric", default="stlpips-alex")
    args = parser.parse_args()

    cpu = {stage: cpu_seconds_per_step(args, stage) for stage in ("joint", "generator")}
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        make_dataset(join(tmp, "data"), args.images, args.resolution, 0.1, 0, get_storage())
        data = join(tmp, "data", "images")
        results = [
            measure(data, join(tmp, name), args, stage, workers, threads)
            for name, stage, workers, threads in [
                ("joint-1x2", "joint", 1, 2),
                ("joint-2x1", "joint", 2, 1),
                ("generator-1x2", "generator", 1, 2),
            ]
        ]
    print(f"\nconfig: {args.resolution}px channel_max {args.channel_max} batch {args.batch} metric {args.metric}, "
          f"{args.steps} steps, medians over report windows")
    print(f"{'stage':10s} {'workers x threads':>18s} {'images/s':>9s} {'s/step':>7s} {'wall s':>7s}")
    for r in results:
        print(f"{r['stage']:10s} {r['workers']:>9d} x {r['threads']:<6d} {r['images_per_s']:9.1f} {r['step_s']:7.3f} {r['wall_s']:7.1f}")
    one, two = results[0]["images_per_s"], results[1]["images_per_s"]
    print(f"scaling efficiency (2 workers x 1 thread / 1 worker x 2 threads, joint): {two / one:.2f}")
    for stage, seconds in cpu.items():
        print(f"in-process {stage}, 1 thread: {seconds:.3f} CPU-s/step ({args.batch / seconds:.1f} images per CPU-second)")
    ray.shutdown()


if __name__ == "__main__":
    main()
