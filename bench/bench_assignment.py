"""Learned multi-modal assignment: how many labelled latents, which targets, which model (run by hand).

The paper assigns w to argmin_k LPIPS(G(w), G(c_k)); `sdsg cluster` fits a w -> center classifier to that
rule (truncation/learned.py) so that serving needs no second synthesis pass. This bench asks what its
agreement and LPIPS regret depend on, on one generator, with every rule scored on the same held-out latents:

- labelled latents: the classifier fitted on 1k, 4k, 16k, ... latents labelled with the LPIPS rule;
- targets: the argmin alone (temperature 0, what `sdsg cluster` fitted before) or all K distances distilled
  (softmax(-d / temperature), `cluster.classifier_temperature`);
- model: the torch MLP beside scikit-learn's k-nearest neighbours and multinomial logistic regression;
- baselines: nearest center in W (the cheap rule the paper ablates) and the commonest center.

It also reports how close the LPIPS rule's own choices are: the share of held-out latents whose two nearest
centers are within 0.005 LPIPS (near-ties no rule can call from w, and whose miss costs little regret),
and two ceilings on what agreement with it can mean:

- the same rule under another trained perceptual network (`--second-metric`, default stlpips-vgg; the paper
  used LPIPS-VGG): how often two LPIPS networks name the same center, and the regret (in the main metric)
  of taking the other's choice. A learned rule that agrees with one metric more than the two metrics agree
  with each other is fitting that network's quirks, not perceptual nearness;
- the rule's stability in W: the share of held-out latents whose LPIPS choice is unchanged when w moves
  by eps * (per-dimension std of w) in a random direction (`--perturbations`). A partition that changes
  under small moves in W is one a smooth classifier needs very many labels to follow.

    python3 bench/bench_assignment.py --checkpoint sdsg-demo/stage2 [--clusters 8 64] [--labelled 1000 4000 16000]
    python3 bench/bench_assignment.py --checkpoint sdsg-demo/stage2 --judge-resolution 128   # the judge's size

``--judge-resolution``: the side G(w) and the center images are resized to before the metric (both metrics;
as `cluster.judge_resolution`, issue 31); the labels, the agreement and the regret are all in that judge.

Prints JSON; writes assignment_top1_k<K>.png and assignment_regret_vs_w_k<K>.png next to it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def sklearn_rules(w_train: np.ndarray, labels: np.ndarray, w_test: np.ndarray) -> dict[str, np.ndarray]:
    """scikit-learn's off-the-shelf classifiers on standardised w: predicted center of each test latent."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    models = {
        "sklearn_knn15": make_pipeline(StandardScaler(), KNeighborsClassifier(15, weights="distance")),
        "sklearn_logistic": make_pipeline(StandardScaler(), LogisticRegression(max_iter=300)),
    }
    out = {}
    for name, model in models.items():
        if len(np.unique(labels)) < 2:
            continue
        out[name] = model.fit(w_train, labels).predict(w_test)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="an inference export (`sdsg train` / demo stage --out)")
    p.add_argument("--clusters", type=int, nargs="+", default=[8, 64])
    p.add_argument("--n-latents", type=int, default=4000, help="mapped w the KMeans centers are fitted on")
    p.add_argument("--labelled", type=int, nargs="+", default=[1000, 4000, 16000])
    p.add_argument("--held-out", type=int, default=2000)
    p.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 0.002, 0.01])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--metric", default="stlpips-alex")
    p.add_argument("--judge-resolution", type=int, default=None,
                   help="side the metric sees G(w) and the centers at (default: the image's own)")
    p.add_argument("--second-metric", default="stlpips-vgg", help="another perceptual network ('' to skip)")
    p.add_argument("--perturbations", type=float, nargs="*", default=[0.05, 0.1, 0.25],
                   help="eps of the stability check, in units of w's per-dimension std")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="default: a temporary directory (kept, printed)")
    args = p.parse_args()

    from sdsg_ray import figures
    from sdsg_ray.artifacts.checkpoint import load_inference
    from sdsg_ray.pretrained import build_metric
    from sdsg_ray.truncation.assign import LatentAssigner, PassRows, PerceptualAssigner, render
    from sdsg_ray.truncation.clusters import fit_centers, map_latents
    from sdsg_ray.truncation.learned import assignment_quality, fit_classifier, regret

    out = Path(args.out or tempfile.mkdtemp(prefix="bench-assignment-"))
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    bundle = load_inference(args.checkpoint)
    G, metric = bundle.G_ema, build_metric(args.metric, judge_resolution=args.judge_resolution)
    n_label = max(args.labelled) + args.held_out
    with torch.no_grad():
        w = map_latents(G.mapping, G.z_dim, max(args.n_latents, n_label), args.seed)
        started = time.perf_counter()
        rows = PassRows([64])
        images = render(G.synthesis, w[:n_label], rows)  # G(w) once, compared with every center set
        render_s = time.perf_counter() - started
        test = slice(n_label - args.held_out, n_label)  # the last latents: never fitted on, for every size
        w_std = w[:args.n_latents].std(0)
        generator = torch.Generator().manual_seed(args.seed + 1)
        moved = {eps: w[test] + eps * w_std * torch.randn(w[test].shape, generator=generator)
                 for eps in args.perturbations}
        moved_images = {eps: render(G.synthesis, w_eps, rows) for eps, w_eps in moved.items()}
    second_metric = (build_metric(args.second_metric, judge_resolution=args.judge_resolution)
                     if args.second_metric else None)
    result: dict = {"checkpoint": args.checkpoint, "identity": bundle.identity, "metric": args.metric,
                    "judge_resolution": metric.judged_side(G.resolution), "judge": metric.label(G.resolution),
                    "held_out": args.held_out, "render_s_per_1k": round(1000 * render_s / n_label, 2),
                    "hidden": args.hidden, "steps": args.steps, "clusters": {}}
    for k in args.clusters:
        centers, _ = fit_centers(w[:args.n_latents], k, args.seed)
        started = time.perf_counter()
        assigner = PerceptualAssigner(G.synthesis, centers, metric, rows)  # center features once per K
        distances = assigner.distances(images).cpu()
        label_s = time.perf_counter() - started
        d_test = distances[test]
        nearest_two = d_test.topk(2, dim=1, largest=False).values
        gap = nearest_two[:, 1] - nearest_two[:, 0]
        w_rule = LatentAssigner(centers).assign(w[test])
        base = assignment_quality(d_test, torch.zeros_like(d_test), {"w": w_rule})
        entry: dict = {
            "label_s_per_1k": round(1000 * label_s / n_label + result["render_s_per_1k"], 2),
            "mean_lpips_to_nearest": base["mean_lpips_to_nearest"],
            "near_tie_share_0.005": float((gap < 0.005).float().mean()), "median_top2_gap": float(gap.median()),
            "w_top1": base["w_top1"], "w_regret": base["w_regret"], "majority_top1": base["majority_top1"],
            "by_labelled": {},
        }
        lpips_choice = d_test.argmin(1)
        if second_metric is not None:
            other = PerceptualAssigner(G.synthesis, centers, second_metric, rows).distances(images[test]).cpu().argmin(1)
            entry["second_metric"] = {"name": args.second_metric,
                                      "top1": round(float((other == lpips_choice).float().mean()), 4),
                                      "regret_vs_w": round(regret(d_test, other) / max(base["w_regret"], 1e-12), 3)}
        entry["stability"] = {}
        nearest_center_distance = torch.cdist(w[test], centers).min(1).values.median()
        for eps, images_eps in moved_images.items():
            choice_eps = assigner.distances(images_eps).cpu().argmin(1)
            entry["stability"][f"{eps:g}"] = {
                "unchanged": round(float((choice_eps == lpips_choice).float().mean()), 4),
                "move_vs_nearest_center": round(float((moved[eps] - w[test]).norm(dim=1).median()
                                                      / nearest_center_distance), 3)}
        print(json.dumps({"clusters": k, "second_metric": entry.get("second_metric"),
                          "stability": entry["stability"]}), flush=True)
        for n in sorted(args.labelled):
            train = slice(0, n)
            labels = distances[train].argmin(1)
            rules: dict[str, torch.Tensor] = {}
            for temperature in args.temperatures:
                with torch.enable_grad():
                    clf = fit_classifier(w[train], distances[train], args.hidden, args.steps, args.seed,
                                         temperature=temperature)
                rules[f"mlp_t{temperature:g}"] = clf.logits(w[test]).argmax(1)
            for name, pred in sklearn_rules(w[train].numpy(), labels.numpy(), w[test].numpy()).items():
                rules[name] = torch.from_numpy(pred).long()
            scores = {}
            for name, pred in rules.items():
                rule_regret = regret(d_test, pred)
                scores[name] = {"top1": round(float((pred == lpips_choice).float().mean()), 4),
                                "regret": round(rule_regret, 5),
                                "regret_vs_w": round(rule_regret / max(base["w_regret"], 1e-12), 3)}
            entry["by_labelled"][str(n)] = scores
            print(json.dumps({"clusters": k, "labelled": n, **entry["by_labelled"][str(n)]}), flush=True)
        result["clusters"][str(k)] = entry

    # per K, two PNGs from the one figure helper: top-1 and regret/W against labelled latents, a line per rule
    sizes = sorted(args.labelled)
    result["figures"] = []
    for k in args.clusters:
        entry = result["clusters"][str(k)]
        names = list(entry["by_labelled"][str(sizes[0])])
        for field, what, target, baseline in (("top1", "top-1 agreement with the LPIPS rule", 0.9, entry["w_top1"]),
                                              ("regret_vs_w", "LPIPS regret / nearest-in-W's", 0.1, 1.0)):
            series = {name: (sizes, [entry["by_labelled"][str(n)][name][field] for n in sizes]) for name in names}
            series["nearest in W"] = (sizes, [baseline] * len(sizes))
            if "second_metric" in entry:  # the ceiling: the same rule under another perceptual network
                series[f"{entry['second_metric']['name']}'s choice"] = (sizes, [entry["second_metric"][field]] * len(sizes))
            series[f"target {target:g}"] = (sizes, [target] * len(sizes))
            path = out / f"assignment_{field}_k{k}.png"
            path.write_bytes(figures.curves(series, "labelled latents", what,
                                            f"K = {k}, {args.held_out} held-out latents, {result['judge']}"))
            result["figures"].append(str(path))
    (out / "assignment.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
