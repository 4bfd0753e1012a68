"""Does self-filtering filter? AUROC of d(x) = LPIPS(x, G(E(x))) against stage-1 length, beside controls.

    python3 bench/bench_filtering.py --lengths 0,1,2,4 --out /tmp/bench_filtering          # CPU, 32 px
    python3 bench/bench_filtering.py --device cuda --lengths 0,1,2,4,8,16,32                # GPU, 64 px
    python3 bench/bench_filtering.py --set train.lambda_l1=1.0 --out /tmp/bf_l1              # one experiment
    python3 bench/bench_filtering.py --checkpoint /tmp/bf32/generator --metric stlpips-alex  # another judge
    python3 bench/bench_filtering.py --checkpoint /tmp/bf32/generator --held-out-seed 1      # memorised or not
    python3 bench/bench_filtering.py --checkpoint /tmp/bf32/generator --judge-resolution 128 --pairs G_ema+E_ema
                                                                  # the judge's size (issue 31)

Stage 1 (the demo's config: model, batch, lr, lambdas, metric, seed) is trained ONCE in-process on the
demo dataset (rendered in memory, jpg/png round trip as the files are), and at each requested length
(kimg; 0 = the untrained initialisation) every image is scored through ``models.reconstruct``, in the
demo's ``score.metric`` at the demo's ``score.judge_resolution`` (what the pipeline judges d(x) with;
``--metric`` and ``--judge-resolution`` pick others; training keeps ``train.metric`` at the image's size):
  - d(x) with each (synthesis, encoder) pair: (G_ema, E_ema), what the pipeline scores with by default
    (`score.pair=ema`), (G, E), the live pair trained together (`score.pair=live`), and (G_ema, E), the
    mixed pair the scorer used before issue 15;
  - the controls: the untrained network (length 0; the same seed's initialisation) and the trivial
    detectors (PNG size, gradient energy, mean-colour distance, foreground share), which need no model.
The ratio printed is AUROC(d) - AUROC(untrained): what training adds. Writes ``<out>/filtering.json``,
``<out>/auroc_vs_kimg.png`` (figures.curves) and ``<out>/reconstructions.png`` (originals over G_ema(E(x))
at the last length: inliers by mode, then outliers by kind) so a person can look at what was learnt, and
``<out>/samples.png`` (G_ema's samples) and
``<out>/generator/inference.pt`` at the last length (the input of bench_assignment.py and `sdsg cluster`).
"""

from __future__ import annotations

import argparse
import io
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sdsg_ray import figures
from sdsg_ray.artifacts.checkpoint import load_inference
from sdsg_ray.config import SDSGConfig, overrides_layer
from sdsg_ray.dataset.synthetic import MODES, OUTLIER_KINDS, encode, plan, render
from sdsg_ray.demo import demo_config
from sdsg_ray.diagnostics import auroc_report, reconstruction_scores, trivial_report, untrained_scores
from sdsg_ray.imaging import image_grid, to_uint8
from sdsg_ray.models import reconstruct
from sdsg_ray.pretrained import build_metric
from sdsg_ray.storage import get_storage
from sdsg_ray.training.loop import TrainingRun


def demo_images(config: SDSGConfig, resolution: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, list]:
    """The demo dataset as stage 1 sees it: rendered, written as jpg/png, decoded."""
    ds = config.dataset
    items = plan(ds.n, ds.outlier_fraction, ds.seed)
    images = np.stack([np.asarray(Image.open(io.BytesIO(encode(render(i, resolution, ds.seed), i.suffix))).convert("RGB"))
                       for i in items])
    return images, np.array([i.is_outlier for i in items]), np.array([i.kind for i in items]), items


PAIRS = ("G_ema+E_ema", "G+E", "G_ema+E")  # the first is what the pipeline scores with (score.pair=ema)


def pair_networks(run) -> dict:
    """{pair name in PAIRS: (G, E)}; ``run``: a TrainingRun or an InferenceBundle (both hold G_ema, G, E, E_ema)."""
    return {"G_ema+E_ema": (run.G_ema, run.E_ema), "G+E": (run.G, run.E), "G_ema+E": (run.G_ema, run.E)}


def d_report(y: np.ndarray, d: np.ndarray, kinds) -> dict:
    """AUROC of d(x) overall and per kind, with the mean d of each class."""
    return {**auroc_report(y, d, kinds), "mean_d_inliers": float(d[~y].mean()), "mean_d_outliers": float(d[y].mean())}


def score_pairs(run, images: np.ndarray, metric, device, y, kinds, pairs=PAIRS) -> tuple[dict, np.ndarray]:
    """d_report for each (synthesis, encoder) pair in ``pairs`` (PAIRS' order), with its scoring cost per
    image; also d(x) of the first."""
    networks, out, scored = pair_networks(run), {}, {}
    for name in pairs:
        G, E = networks[name]
        start = time.perf_counter()
        scored[name] = reconstruction_scores(G.synthesis, E, images, metric, device)
        out[name] = {**d_report(y, scored[name], kinds), "seconds_per_image": (time.perf_counter() - start) / len(images)}
    return out, scored[pairs[0]]


def recon_grid(run: TrainingRun, images: np.ndarray, d: np.ndarray, items, device, per_row: int = 8) -> bytes:
    rows = []
    groups = [(m, [i.index for i in items if i.mode == m]) for m in MODES]
    groups += [(k, [i.index for i in items if i.kind == k]) for k in OUTLIER_KINDS]
    with torch.no_grad():
        for name, idx in groups:
            idx = idx[:per_row]
            if not idx:
                continue
            x = torch.from_numpy(images[idx]).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1
            rec = to_uint8(reconstruct(run.G_ema.synthesis, run.E_ema, x).image.float().cpu())
            rows.append((name, [float(d[i]) for i in idx], images[idx], rec))
    return figures.originals_over_reconstructions(rows)


def samples_grid(run: TrainingRun, device, rows: int = 4, per_row: int = 8) -> bytes:
    """G_ema's own samples (fixed z, psi 1): whether G learnt the inliers, apart from how well E inverts it."""
    z = torch.randn(rows * per_row, run.G_ema.z_dim, generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        images = to_uint8(run.samples(z))
    return figures.labelled_grid(image_grid(images, per_row, pad=1), [""] * rows,
                                 f"G_ema samples after {run.kimg:.1f} kimg (psi 1)")


def fixed_subset(is_outlier: np.ndarray, size: int | None, seed: int = 0) -> np.ndarray:
    """Indices of a fixed random subset of ``size`` images, half outliers and half inliers (as far as there
    are), sorted: the same images at every judge size, for the settings too slow to score the whole set on a
    CPU. Balanced classes give the smallest AUROC error for the images scored (a random 100 of the demo set
    hold ~9 outliers). All images when size is None or >= their number."""
    n = len(is_outlier)
    if size is None or size >= n:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    outliers, inliers = np.flatnonzero(is_outlier), np.flatnonzero(~np.asarray(is_outlier, bool))
    k = min(size // 2, len(outliers))
    return np.sort(np.concatenate([rng.choice(outliers, k, replace=False), rng.choice(inliers, size - k, replace=False)]))


def score_checkpoint(args, config: SDSGConfig, resolution: int, device) -> None:
    """Score an exported stage-1 generator with ``--metric`` at ``--judge-resolution`` beside the untrained
    control judged the same way and the trivial detectors on the same images.

    The metric experiment of issue 15 and the judge-size experiment of issue 31: does another perceptual
    network, or the same one shown the images larger, rank outliers better with the same trained (G, E)?
    No training; prints and writes ``<out>/metric.json``.
    """
    images, y, kinds, _ = demo_images(config, resolution)
    keep = fixed_subset(y, args.subset)
    images, y, kinds = images[keep], y[keep], kinds[keep]
    bundle = load_inference(args.checkpoint, device=device)
    metric_name = args.metric or config.score.metric
    metric = build_metric(metric_name, device=device, judge_resolution=config.score.judge_resolution)
    pairs, _ = score_pairs(bundle, images, metric, device, y, kinds, args.pairs)
    start = time.perf_counter()
    untrained = auroc_report(y, untrained_scores(bundle.model, config.train.seed, images, metric, device), kinds)
    untrained["seconds_per_image"] = (time.perf_counter() - start) / len(images)
    first = args.pairs[0]
    result = {"checkpoint": args.checkpoint, "kimg": bundle.meta.get("kimg"), "metric": metric_name,
              "judge_resolution": metric.judged_side(resolution), "judge": metric.label(resolution),
              "images": len(images), "subset": args.subset, "train_seed": config.train.seed,
              "untrained": untrained, "lift": pairs[first]["auroc"] - untrained["auroc"],
              "trivial": trivial_report(images, y, kinds), **pairs}
    if args.held_out_seed is not None:
        result["held_out"] = held_out_gap(bundle, config, args.held_out_seed, resolution, metric, device, pairs[first],
                                          args.subset)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metric.json").write_text(json.dumps(result, indent=2))
    trivial_max = max(r["separation"] for r in result["trivial"].values())
    print(f"{result['judge']} on {args.checkpoint} ({result['kimg']} kimg, {len(images)} images): "
          f"untrained {untrained['auroc']:.3f}  " + "  ".join(f"{n} {pairs[n]['auroc']:.3f}" for n in args.pairs)
          + f"  lift {result['lift']:+.3f}  trivial max sep {trivial_max:.3f}  "
          f"{pairs[first]['seconds_per_image'] * 1000:.1f} ms/image  per kind ({first}) "
          + " ".join(f"{k}={v:.2f}" for k, v in pairs[first]["auroc_by_kind"].items()))


def held_out_gap(bundle, config: SDSGConfig, seed: int, resolution: int, metric, device, trained: dict,
                 subset: int | None = None) -> dict:
    """Underfitting or memorisation? d(x) of the first pair on a set rendered with another dataset seed (the
    same plan of kinds, images never trained on) beside the training set's.

    Memorising outliers through the real-image reconstruction term shows as outliers reconstructing better
    in the training set than held out (an outlier gap well above the inliers'); underfitting shows as no
    gap for either class with d high for both."""
    held_config = config.model_copy(update={"dataset": config.dataset.model_copy(update={"seed": seed})})
    images, y, kinds, _ = demo_images(held_config, resolution)
    keep = fixed_subset(y, subset)
    images, y, kinds = images[keep], y[keep], kinds[keep]
    G, E = pair_networks(bundle)[PAIRS[0]]
    held = d_report(y, reconstruction_scores(G.synthesis, E, images, metric, device), kinds)
    untrained = auroc_report(y, untrained_scores(bundle.model, config.train.seed, images, metric, device), kinds)
    held["untrained"] = untrained
    held["lift"] = held["auroc"] - untrained["auroc"]
    held["trivial"] = trivial_report(images, y, kinds)
    gap = {"inliers": held["mean_d_inliers"] - trained["mean_d_inliers"],
           "outliers": held["mean_d_outliers"] - trained["mean_d_outliers"]}
    print(f"held out (dataset seed {seed}, {PAIRS[0]}): AUROC {held['auroc']:.3f}, untrained {untrained['auroc']:.3f} "
          f"(lift {held['lift']:+.3f}), trivial max sep {max(r['separation'] for r in held['trivial'].values()):.3f}; "
          f"training set {trained['auroc']:.3f}; "
          f"mean d held out - training set: inliers {gap['inliers']:+.4f}, outliers {gap['outliers']:+.4f}")
    return {"dataset_seed": seed, "pair": PAIRS[0], **held, "gap_held_out_minus_train": gap}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="0,1,2,4", help="stage-1 lengths in kimg, comma separated (0 = untrained)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--resolution", type=int, default=None, help="32 on CPU, 64 with --device cuda")
    parser.add_argument("--n", type=int, default=None, help="dataset size (demo default)")
    parser.add_argument("--out", default="bench_filtering_out")
    parser.add_argument("--checkpoint", default=None,
                        help="score this exported stage-1 generator instead of training (with --metric)")
    parser.add_argument("--metric", default=None, help="perceptual metric of d(x) (default: the demo's score.metric, "
                                                       "what the pipeline judges with; training keeps train.metric)")
    parser.add_argument("--held-out-seed", type=int, default=None,
                        help="with --checkpoint: also score a set rendered with this dataset seed (never trained on) "
                             "and print the held-out minus training-set gap of mean d, inliers and outliers")
    parser.add_argument("--judge-resolution", type=int, default=None,
                        help="side x and G(E(x)) are resized to before the metric (default: the demo's "
                             "score.judge_resolution; the model resolution = no resize)")
    parser.add_argument("--pairs", default=",".join(PAIRS),
                        help=f"with --checkpoint: the (G, E) pairs to score, comma separated, from {PAIRS}")
    parser.add_argument("--subset", type=int, default=None,
                        help="with --checkpoint: score a fixed random subset of this many images (seed 0, half outliers), the "
                             "same at every judge size, and as many of the held-out set (for settings too slow "
                             "for the whole set on a CPU)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides over the demo's (e.g. train.lambda_l1=1.0 model.channel_max=128): "
                             "one experiment on why the ranking does or does not emerge")
    args = parser.parse_args()
    lengths = sorted(float(v) for v in args.lengths.split(","))
    resolution = args.resolution or (64 if args.device.startswith("cuda") else 32)
    device = torch.device(args.device)
    overrides = {"model.resolution": resolution, "dataset.resolution": resolution, "train.kimg": max(lengths)}
    if args.n:
        overrides["dataset.n"] = args.n
    if args.judge_resolution is not None:
        overrides["score.judge_resolution"] = args.judge_resolution
    overrides.update(overrides_layer(args.set)[1])
    config = demo_config(("set", overrides))
    args.pairs = [p for p in PAIRS if p in args.pairs.split(",")]
    if not args.pairs:
        parser.error(f"--pairs: name at least one of {PAIRS}")
    if args.held_out_seed is not None and not args.checkpoint:
        parser.error("--held-out-seed scores an exported generator: give --checkpoint too")
    if args.held_out_seed == config.dataset.seed:
        parser.error(f"--held-out-seed {args.held_out_seed} is the training set's dataset.seed: pick another")
    if args.checkpoint:
        return score_checkpoint(args, config, resolution, device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    storage = get_storage()
    images, y, kinds, items = demo_images(config, resolution)
    trivial = trivial_report(images, y, kinds)
    train_metric = build_metric(config.train.metric, device=device)
    run = TrainingRun(config, device, metric=train_metric)
    metric_name = args.metric or config.score.metric
    judge = config.score.judge_resolution
    metric = (train_metric if metric_name == config.train.metric and judge in (None, resolution)
              else build_metric(metric_name, device=device, judge_resolution=judge))
    bs = config.train.batch_size
    rng = np.random.default_rng(config.train.seed)
    order = rng.permutation(len(images))
    cursor, start, points = 0, time.perf_counter(), []
    for length in lengths:
        while run.kimg < length - 1e-9:
            if cursor + bs > len(order):
                order, cursor = rng.permutation(len(images)), 0
            run.step(torch.from_numpy(images[order[cursor:cursor + bs]]))
            cursor += bs
        train_s = time.perf_counter() - start
        pairs, d_ema = score_pairs(run, images, metric, device, y, kinds)
        point = {"kimg": length, "actual_kimg": run.kimg, "steps": run.step_count, "train_seconds": round(train_s, 1),
                 **pairs}
        points.append(point)
        print(f"kimg {length:6.3g} ({train_s:6.0f} s): AUROC " + "  ".join(f"{n} {point[n]['auroc']:.3f}" for n in PAIRS)
              + f"  mean d in/out {point[PAIRS[0]]['mean_d_inliers']:.3f}/{point[PAIRS[0]]['mean_d_outliers']:.3f}",
              flush=True)
        write_results(out, config, resolution, device, images, lengths, trivial, points, overrides, metric.label(resolution))  # partial results survive a kill
        (out / "reconstructions.png").write_bytes(recon_grid(run, images, d_ema, items, device))  # at the latest length
        (out / "samples.png").write_bytes(samples_grid(run, device))
        run.export_inference({"stage": "joint", "kimg": run.kimg, "bench": "bench_filtering"},
                             str(out / "generator"), storage)
    report(out, trivial, points)


def write_results(out: Path, config: SDSGConfig, resolution: int, device, images, lengths, trivial, points,
                  overrides: dict, judge: str) -> None:
    untrained = points[0][PAIRS[0]]["auroc"] if lengths[0] == 0 else None
    result = {"config": {"resolution": resolution, "device": str(device), "n": len(images),
                         "batch_size": config.train.batch_size, "train_metric": config.train.metric,
                         "judge": judge, "lengths": lengths,
                         "overrides": overrides},
              "untrained_auroc": untrained, "trivial": trivial, "points": points}
    (out / "filtering.json").write_text(json.dumps(result, indent=2))
    xs = [p["kimg"] for p in points]
    series = {f"d(x) {pair}": (xs, [p[pair]["auroc"] for p in points]) for pair in PAIRS}
    for name, rep in trivial.items():
        series[f"trivial: {name}"] = (xs, [rep["separation"]] * len(xs))
    (out / "auroc_vs_kimg.png").write_bytes(figures.curves(
        series, "stage-1 length (kimg; 0 = untrained)", "outlier AUROC (trivial: max(A, 1-A))",
        f"AUROC of d(x) ({judge}) vs stage-1 length, {resolution} px, {len(images)} images"))


def report(out: Path, trivial: dict, points: list) -> None:
    untrained = points[0][PAIRS[0]]["auroc"] if points[0]["kimg"] == 0 else None
    print("\ntrivial detectors (overall AUROC, separation = max(A, 1-A)):")
    for name, rep in trivial.items():
        print(f"  {name:22s} {rep['auroc']:.3f}  sep {rep['separation']:.3f}  "
              + " ".join(f"{k}={v:.2f}" for k, v in rep["auroc_by_kind"].items()))
    print("\nkimg  " + "  ".join(f"AUROC({n})" for n in PAIRS) + f"  minus untrained  per kind ({PAIRS[0]})")
    for p in points:
        delta = "" if untrained is None else f"{p[PAIRS[0]]['auroc'] - untrained:+.3f}"
        print(f"{p['kimg']:6.3g} " + " ".join(f"{p[n]['auroc']:{len(n) + 7}.3f}" for n in PAIRS) + f" {delta:>14}  "
              + " ".join(f"{k}={v:.2f}" for k, v in p[PAIRS[0]]["auroc_by_kind"].items()))
    print(f"\nwrote {out}/filtering.json, auroc_vs_kimg.png, reconstructions.png")


if __name__ == "__main__":
    main()
