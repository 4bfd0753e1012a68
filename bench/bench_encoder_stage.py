"""An encoder for a generator you already have: stage 'encoder' against stage 1 (joint), at equal kimg.

    PYTHONPATH=$PWD python bench/bench_encoder_stage.py --kimg 2 --out /tmp/bench_encoder_stage

On the demo set (the demo's config: model, batch, lr, lambdas, train.metric, seed), with the training loop
``sdsg train`` runs on each Ray worker (``training.loop.run_loop``, in process here: no Ray reservations on a
shared machine):
  1. stage 1 (joint G, D and E) for K kimg from scratch, exported to ``<out>/joint`` (inference.pt +
     discriminator.pt): the generator "you already have";
  2. that export written as safetensors (``sdsg export``) and imported back (``sdsg import``) into
     ``<out>/imported``, the path a user's own generator takes;
  3. stage 'encoder' against the imported frozen G_ema for the same K kimg: a fresh E (the same seed's
     initialisation as stage 1's E, started at G's mean latent) with the paper's encoder terms only, written
     to ``<out>/encoder``.
Throughput: each run's median images/s over its logging windows (checkpoint writes excluded), and, because a
shared machine's load drifts between two runs, a paired measurement: bursts of steps of both stages alternated
on the same in-memory batches (``--pairs`` x ``--burst`` steps each), the ratio taken per pair and its median
reported. Then the outlier AUROC of d(x) = LPIPS(x, G(E(x))) on the demo set, judged in the demo's
``score.metric`` (``--metric`` picks another) with bench_filtering's pieces, for (G_ema, E_ema) and the live
pair of each run, beside two controls: the untrained network (random G and E, bench_filtering's control)
and the frozen G with E at its initialisation (the encoder stage at 0 kimg: what E adds to that G).
Prints the ratios encoder-stage / joint images/s and AUROC(encoder stage) - AUROC(joint); writes
``<out>/encoder_stage.json``. Re-running with the same ``--out`` reuses trained runs of that length.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]  # sdsg_ray and bench_filtering, run as a script from anywhere

from bench_filtering import PAIRS, d_report, demo_images, pair_networks  # noqa: E402

from sdsg_ray.artifacts.checkpoint import load_inference  # noqa: E402
from sdsg_ray.config import SDSGConfig  # noqa: E402
from sdsg_ray.dataset.synthetic import make_dataset  # noqa: E402
from sdsg_ray.demo import demo_config  # noqa: E402
from sdsg_ray.export import export_safetensors, import_model  # noqa: E402
from sdsg_ray.diagnostics import reconstruction_scores, untrained_scores  # noqa: E402
from sdsg_ray.pretrained import build_metric  # noqa: E402
from sdsg_ray.storage import get_storage  # noqa: E402
from sdsg_ray.training.loop import TrainingRun, run_loop, with_checkpoint_model  # noqa: E402

SCORED_PAIRS = PAIRS[:2]  # (G_ema, E_ema) and the live pair; the third (G_ema, E) is the live one for stage 'encoder'


def train(config: SDSGConfig) -> dict:
    """run_loop on ``config`` (skipped when its inference.pt already has train.kimg); images/s per logging
    window from metrics.jsonl (the first window, which holds the loader's start, and checkpoint writes are
    not in any window's median)."""
    out = Path(config.train.out)
    meta = load_inference(str(out)).meta if (out / "inference.pt").exists() else {}
    done = meta.get("kimg", 0) >= config.train.kimg
    start = time.perf_counter()
    summary = meta if done else run_loop(config)
    wall = None if done else time.perf_counter() - start
    rows = [json.loads(line) for line in Path(config.train.out, "metrics.jsonl").read_text().splitlines() if line.strip()]
    rates = [row["images_per_s_per_worker"] for row in rows if "images_per_s_per_worker" in row]
    rates = rates[1:] or rates  # a run of one window keeps it
    return {"stage": config.train.stage, "kimg": summary["kimg"], "steps": summary["step"], "reused": done,
            "wall_s": None if done else round(wall, 1), "images_per_s_median": statistics.median(rates),
            "images_per_s_windows": rates,
            "images_per_s_wall": None if done else round(summary["step"] * config.train.batch_size / wall, 3)}


def describe(run: dict) -> str:
    wall = "reused" if run["reused"] else f"{run['wall_s']:.0f} s wall"
    return (f"{run['stage']:8s} {run['images_per_s_median']:.2f} images/s (median of windows), {run['kimg']:.3f} kimg, "
            f"{wall}")


def paired_speed(joint: TrainingRun, encoder: TrainingRun, images: np.ndarray, pairs: int, burst: int) -> dict:
    """Alternate ``burst`` steps of each stage on the same batches, ``pairs`` times; images/s per burst and
    the per-pair ratio encoder / joint (load drift on a shared machine cancels within a pair). Bursts of
    ``pl_interval`` steps hold the same share of path-length steps each time."""
    batch = joint.config.train.batch_size
    rng = np.random.default_rng(0)
    rates: dict[str, list[float]] = {"joint": [], "encoder": []}
    for _ in range(pairs):
        batches = [torch.from_numpy(images[rng.choice(len(images), batch, replace=False)]) for _ in range(burst)]
        for name, run in (("joint", joint), ("encoder", encoder)):
            start = time.perf_counter()
            for real in batches:
                run.step(real)
            rates[name].append(burst * batch / (time.perf_counter() - start))
    ratios = [e / j for e, j in zip(rates["encoder"], rates["joint"])]
    return {"pairs": pairs, "burst_steps": burst, "images_per_s": rates, "ratios": ratios,
            "median_ratio": statistics.median(ratios),
            "median_images_per_s": {k: statistics.median(v) for k, v in rates.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kimg", type=float, default=2.0, help="length of both stages (the demo's stage 1: 2)")
    parser.add_argument("--out", default="bench_encoder_stage_out")
    parser.add_argument("--metric", default=None, help="judge of d(x) (default: the demo's score.metric)")
    parser.add_argument("--seed", type=int, default=None, help="train.seed of both stages (default: the demo's)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of each training run")
    parser.add_argument("--pairs", type=int, default=5, help="paired speed measurement: alternations")
    parser.add_argument("--burst", type=int, default=4, help="paired speed measurement: steps per burst")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    storage = get_storage()

    base = {"train.kimg": args.kimg, "train.checkpoint_every_kimg": args.kimg, "train.log_every": 10,
            "train.threads_per_worker": args.threads, "train.data": str(out / "raw" / "images")}
    if args.seed is not None:
        base["train.seed"] = args.seed
    config = demo_config(("set", base))
    ds = config.dataset
    if not (out / "raw" / "labels.csv").exists():
        make_dataset(str(out / "raw"), n=ds.n, resolution=ds.resolution, outlier_fraction=ds.outlier_fraction,
                     seed=ds.seed, storage=storage)

    runs = {"joint": train(demo_config(("set", {**base, "train.out": str(out / "joint")})))}
    print(describe(runs["joint"]), flush=True)
    imported = import_model(export_safetensors(str(out / "joint"), str(out / "joint"), storage), str(out / "imported"), storage)
    print(f"exported {out / 'joint'} as safetensors and imported it back: identity {imported['identity']}", flush=True)
    encoder_config = with_checkpoint_model(demo_config(("set", {
        **base, "train.out": str(out / "encoder"), "train.stage": "encoder", "train.checkpoint": str(out / "imported")})))
    runs["encoder"] = train(encoder_config)
    print(describe(runs["encoder"]), flush=True)

    device = torch.device("cpu")
    images, y, kinds, _ = demo_images(config, config.model.resolution)
    torch.set_num_threads(args.threads)
    train_metric = build_metric(config.train.metric, device=device)
    speed = paired_speed(TrainingRun(demo_config(("set", base)), metric=train_metric),
                         TrainingRun(encoder_config, metric=train_metric), images, args.pairs, args.burst)
    print(f"paired bursts: joint {speed['median_images_per_s']['joint']:.2f}, encoder stage "
          f"{speed['median_images_per_s']['encoder']:.2f} images/s; median ratio {speed['median_ratio']:.2f}x "
          f"(per pair: {' '.join(f'{r:.2f}' for r in speed['ratios'])})", flush=True)
    metric_name = args.metric or config.score.metric
    metric = build_metric(metric_name, device=device)
    auroc: dict[str, dict] = {}
    for name in ("joint", "encoder"):
        networks = pair_networks(load_inference(str(out / name)))
        for pair in SCORED_PAIRS:
            G, E = networks[pair]
            auroc[f"{name} {pair}"] = d_report(y, reconstruction_scores(G.synthesis, E, images, metric, device), kinds)
            print(f"AUROC {name} {pair}: {auroc[f'{name} {pair}']['auroc']:.3f}", flush=True)
    auroc["control: untrained G and E"] = d_report(
        y, untrained_scores(config.model, config.train.seed, images, metric, device), kinds)
    at_init = TrainingRun(encoder_config, metric=train_metric)  # the encoder stage before its first step
    auroc["control: frozen G, E at init"] = d_report(
        y, reconstruction_scores(at_init.G_ema.synthesis, at_init.E, images, metric, device), kinds)

    ratio_speed = runs["encoder"]["images_per_s_median"] / runs["joint"]["images_per_s_median"]
    delta = auroc[f"encoder {PAIRS[0]}"]["auroc"] - auroc[f"joint {PAIRS[0]}"]["auroc"]
    result = {"kimg": args.kimg, "metric": metric_name, "train_metric": config.train.metric, "seed": config.train.seed,
              "n": len(images), "resolution": config.model.resolution, "runs": runs, "paired_speed": speed,
              "auroc": auroc, "speed_ratio_encoder_over_joint_windows": ratio_speed, "auroc_encoder_minus_joint": delta}
    (out / "encoder_stage.json").write_text(json.dumps(result, indent=2))
    print(f"\nimages/s, median of the training windows (not paired: load drifts between runs): joint "
          f"{runs['joint']['images_per_s_median']:.2f}, encoder stage {runs['encoder']['images_per_s_median']:.2f}: "
          f"ratio {ratio_speed:.2f}x; paired bursts: median ratio {speed['median_ratio']:.2f}x")
    print(f"AUROC of d(x) ({metric_name}) at {args.kimg:g} kimg, {len(images)} images:")
    for name, rep in auroc.items():
        print(f"  {name:34s} {rep['auroc']:.3f}  mean d in/out {rep['mean_d_inliers']:.3f}/{rep['mean_d_outliers']:.3f}  "
              + " ".join(f"{k}={v:.2f}" for k, v in rep["auroc_by_kind"].items()))
    print(f"AUROC(encoder stage) - AUROC(joint), {PAIRS[0]}: {delta:+.3f}\nwrote {out}/encoder_stage.json")


if __name__ == "__main__":
    main()
