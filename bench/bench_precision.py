"""bf16 or fp16 for NVIDIA's precision policy: speed and error of each against float32, same run, same weights.

    python bench/bench_precision.py [--resolution 32] [--channel-base 2048] [--channel-max 64] [--batch 8] [--reps 5]

For each dtype (float32 = the baseline, then bf16 and fp16 in the eligible blocks via
``models.networks.set_reduced_precision``): median seconds of one G+D forward+backward (non-saturating
loss, as a training step's main phases), and the largest |G(z) - G_fp32(z)| on fixed z (const noise).
Interleaved repetitions so load drifts hit every dtype alike. Prints JSON with ratios to float32.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from sdsg_ray.config import ModelConfig  # noqa: E402
from sdsg_ray.models.networks import REDUCED_DTYPES, build_networks, set_reduced_precision  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--channel-base", type=int, default=2048)
    p.add_argument("--channel-max", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    model = ModelConfig(resolution=args.resolution, channel_base=args.channel_base, channel_max=args.channel_max)
    torch.manual_seed(0)
    G, D, _ = build_networks(model)
    G, D = G.to(args.device).train(), D.to(args.device)
    z = torch.randn(args.batch, model.z_dim, device=args.device)
    dtypes = {"fp32": None, **REDUCED_DTYPES}
    with torch.no_grad():
        ref = G.eval()(z, noise_mode="const")
        error = {}
        for name, dtype in dtypes.items():
            set_reduced_precision(G, dtype)
            error[name] = float((G(z, noise_mode="const") - ref).abs().max())
    G.train()

    def step(dtype) -> float:
        set_reduced_precision(G, dtype)
        set_reduced_precision(D, dtype)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = torch.nn.functional.softplus(-D(G(z, noise_mode="const"))).mean()
        loss.backward()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start

    times = {name: [] for name in dtypes}
    for name, dtype in dtypes.items():
        step(dtype)  # warm-up
    for _ in range(args.reps):
        for name, dtype in dtypes.items():
            times[name].append(step(dtype))
    median = {name: statistics.median(t) for name, t in times.items()}
    print(json.dumps({
        "device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "CPU",
        "threads": torch.get_num_threads(), "model": model.model_dump(), "batch": args.batch,
        "eligible_blocks_G": set_reduced_precision(G, torch.bfloat16),
        "step_s_median": median, "speed_vs_fp32": {n: median["fp32"] / m for n, m in median.items()},
        "max_abs_err_vs_fp32": error,
    }, indent=1))


if __name__ == "__main__":
    main()
