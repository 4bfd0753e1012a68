"""Issue 15's training fixes, measured: how much of G's start G_ema keeps, and how biased w_avg is.

Why: every score, sample and evaluation uses G_ema and w_avg. Without NVIDIA's EMA ramp-up a demo-length
run leaves a visible share of the random initialisation in G_ema; w_avg updated once per G phase from
zero is a shrunk copy of the mean latent, so mean truncation pulls toward a point off the distribution.

Part 1 (arithmetic): the weight G_ema gives to G's state after the first step, and to the whole first half
of training, old formula (fixed half-life) vs new (ramp-up 0.05), at the demo's stage-1 and stage-2 lengths.

Part 2 (a short run, stage 'generator' at the demo's model and batch on the demo's synthetic images): the
current w_avg against the w_avg the old code would have tracked on the same trajectory (plain EMA from 0,
updated only by the G phase's mapping call). w_avg has no effect on the generator stage's training, so one
run gives both exactly. Reference: the mean of 4096 mapped w of the live mapping network; control: the
norm of that mean against its sampling spread.

    PYTHONPATH=$PWD python bench/bench_training_fixes.py --kimg 1.0
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from sdsg_ray.config import load_config
from sdsg_ray.dataset.synthetic import plan, render
from sdsg_ray.demo import DEMO_DEFAULTS
from sdsg_ray.training.losses import ema_beta
from sdsg_ray.training.loop import TrainingRun


def shares(batch: int, kimg: float, ema_kimg: float, rampup: float | None) -> tuple[float, float]:
    """(weight on G after step 1, weight on G's states from the first half of the steps) in the final G_ema."""
    steps = int(np.ceil(kimg * 1000 / batch))
    betas = [ema_beta(batch, ema_kimg, k * batch, rampup) for k in range(steps)]
    return float(np.prod(betas[1:])), float(np.prod(betas[steps // 2:]))


def untrained_control(model_overrides: dict, steps: int, batch: int, latents: int) -> None:
    """The same w_avg call pattern (G phase, path length every 4th step at half batch, D phase) on the
    untrained demo mapping network: the bias of the update rule alone, without training moving w."""
    from sdsg_ray.models.networks import build_generator

    config = load_config(None, model_overrides)
    torch.manual_seed(0)
    mapping = build_generator(config.model).mapping
    with torch.no_grad():
        w_ref = mapping(torch.randn(latents, mapping.z_dim, generator=torch.Generator().manual_seed(1))).mean(0)
        old, calls = torch.zeros_like(mapping.w_avg), 0
        for k in range(steps):
            for phase in ["Gmain"] + (["Greg"] if k % 4 == 0 else []) + ["Dmain"]:
                w = mapping(torch.randn(batch if phase != "Greg" else batch // 2, mapping.z_dim), update_w_avg=True)
                calls += 1
                if phase == "Gmain":
                    old = w.mean(0).lerp(old, mapping.w_avg_beta)
    print(f"\n# Control: untrained mapping, {steps} steps = {calls} update calls, |w_mean of {latents}| = "
          f"{float(w_ref.norm()):.4f}")
    for name, value in (("old (G phase only, from 0)", old), ("new (every call, debiased)", mapping.w_avg)):
        cos = float(torch.nn.functional.cosine_similarity(value, w_ref, dim=0))
        print(f"{name:28s}  cosine {cos:.4f}   norm ratio {float(value.norm() / w_ref.norm()):.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kimg", type=float, default=1.0, help="length of the short run (demo stage 2: 1.0)")
    parser.add_argument("--latents", type=int, default=4096)
    parser.add_argument("--images", type=int, default=400, help="demo images rendered for the run")
    parser.add_argument("--control-only", action="store_true", help="parts 1 and the untrained control only (seconds)")
    args = parser.parse_args()

    t = DEMO_DEFAULTS["train"]
    batch, ema_kimg = t["batch_size"], t["ema_kimg"]
    print(f"# Part 1: share of G's early states left in G_ema (batch {batch}, ema_kimg {ema_kimg})")
    print("stage        kimg  steps  after-step-1 old  new        first-half old  new")
    for stage, kimg in (("stage 1", t["kimg"]), ("stage 2", DEMO_DEFAULTS["pipeline"]["stage2_kimg"])):
        old, new = shares(batch, kimg, ema_kimg, None), shares(batch, kimg, ema_kimg, 0.05)
        steps = int(np.ceil(kimg * 1000 / batch))
        print(f"{stage}  {kimg:6.2f}  {steps:5d}  {old[0]:.4f}  {new[0]:.3g}      {old[1]:.4f}  {new[1]:.3g}")

    overrides = {f"model.{k}": v for k, v in DEMO_DEFAULTS["model"].items()}
    overrides.update({"train.stage": "generator", "train.batch_size": batch, "train.ema_kimg": ema_kimg,
                      "train.r1_gamma": t["r1_gamma"], "train.seed": 0})
    untrained_control({f"model.{k}": v for k, v in DEMO_DEFAULTS["model"].items()},
                      int(np.ceil(args.kimg * 1000 / batch)), batch, args.latents)
    if args.control_only:
        return
    config = load_config(None, overrides)
    res = config.model.resolution
    items = plan(args.images, DEMO_DEFAULTS["dataset"]["outlier_fraction"], 0)
    images = np.stack([render(item, res, 0) for item in items]).astype(np.uint8)
    run = TrainingRun(config)
    mapping = run.G.mapping
    old_w_avg = torch.zeros_like(mapping.w_avg)
    calls = {"step": -1}

    def hook(module, inputs, kwargs, output):  # the old rule: first update call of a step = the G phase
        nonlocal old_w_avg
        if kwargs.get("update_w_avg") and calls["step"] != run.step_count:
            calls["step"] = run.step_count
            old_w_avg = output.detach().float().mean(0).lerp(old_w_avg, module.w_avg_beta)

    mapping.register_forward_hook(hook, with_kwargs=True)
    steps = int(np.ceil(args.kimg * 1000 / batch))
    rng = np.random.default_rng(0)
    started = time.perf_counter()
    for k in range(steps):
        run.step(torch.from_numpy(images[rng.choice(len(images), batch, replace=False)]))
        if (k + 1) % 10 == 0:
            print(f"step {k + 1}/{steps} ({time.perf_counter() - started:.0f} s)", flush=True)
    elapsed = time.perf_counter() - started

    with torch.no_grad():
        z = torch.randn(args.latents, run.G.z_dim, generator=torch.Generator().manual_seed(1))
        w = mapping(z)
    w_mean = w.mean(0)
    spread = float(w.std(0).norm() / np.sqrt(args.latents))  # sampling error of w_mean's norm, roughly
    print(f"\n# Part 2: w_avg after {steps} generator steps ({args.kimg} kimg, {elapsed:.0f} s), "
          f"vs mean of {args.latents} mapped w (|w_mean| = {float(w_mean.norm()):.4f}, sampling spread ~{spread:.4f})")
    print("w_avg                         cosine   norm ratio")
    for name, value in (("old (G phase only, from 0)", old_w_avg), ("new (every call, debiased)", mapping.w_avg)):
        cos = float(torch.nn.functional.cosine_similarity(value, w_mean, dim=0))
        print(f"{name:28s}  {cos:.4f}   {float(value.norm() / w_mean.norm()):.4f}")
    print(f"ratio new/old of the norm ratio: {float(mapping.w_avg.norm() / old_w_avg.norm()):.2f}x; "
          f"update calls counted by the new w_avg: {int(mapping.w_avg_count)} (old: {steps})")


if __name__ == "__main__":
    main()
