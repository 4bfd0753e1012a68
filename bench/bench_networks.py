"""G+D training-step time: our StyleGAN2 networks vs NVIDIA's stylegan2-ada-pytorch, same process.

One step = forward+backward of the non-saturating G loss, then of the D loss (no R1, no path-length,
no style mixing, no optimiser step), both networks in train mode, as NVIDIA's loop runs them.
Steps alternate ours / reference so load from other processes hits both alike; medians are printed.

The reference is NOT part of this repository. Get it once (any copy of the repo works):
    git clone https://github.com/NVlabs/stylegan2-ada-pytorch /tmp/sg2ada
Its custom ops fall back to their pure-PyTorch reference implementations on CPU.

    python3 bench/bench_networks.py --steps 30 --threads 2 [--channels-last] [--compile]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from sdsg_ray.models.networks import Discriminator, Generator


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference-dir", default="/tmp/sg2ada", help="checkout of NVlabs/stylegan2-ada-pytorch")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--z-dim", type=int, default=64)
    p.add_argument("--w-dim", type=int, default=64)
    p.add_argument("--mapping-layers", type=int, default=2)
    p.add_argument("--channel-base", type=int, default=2048)
    p.add_argument("--channel-max", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--channels-last", action="store_true", help="our networks in channels_last memory format")
    p.add_argument("--compile", action="store_true", help="torch.compile our G and D")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args()


def make_step(G, D, batch: int, resolution: int, device: str, call_G: Callable, call_D: Callable, memory_format) -> Callable[[torch.Tensor], None]:
    reals = torch.randn(batch, 3, resolution, resolution, device=device).contiguous(memory_format=memory_format)

    def step(z: torch.Tensor) -> None:
        G.zero_grad(set_to_none=True)
        D.zero_grad(set_to_none=True)
        F.softplus(-call_D(call_G(z))).mean().backward()  # G main: non-saturating loss
        fake = call_G(z).detach()
        (F.softplus(call_D(fake)) + F.softplus(-call_D(reals))).mean().backward()  # D main

    return step


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    ref_dir = Path(args.reference_dir)
    if not (ref_dir / "training" / "networks.py").is_file():
        sys.exit(f"{ref_dir}: no stylegan2-ada-pytorch checkout (git clone https://github.com/NVlabs/stylegan2-ada-pytorch {ref_dir})")
    sys.path.insert(0, str(ref_dir))
    from training import networks as ref_networks  # noqa: E402  (the reference, from --reference-dir)

    device, res = args.device, args.resolution
    torch.manual_seed(0)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    G = Generator(args.z_dim, args.w_dim, res, args.channel_base, args.channel_max, args.mapping_layers).to(device).train()
    D = Discriminator(res, args.channel_base, args.channel_max).to(device).train()
    G, D = G.to(memory_format=memory_format), D.to(memory_format=memory_format)
    G_call, D_call = (torch.compile(G), torch.compile(D)) if args.compile else (G, D)

    common = dict(channel_base=args.channel_base, channel_max=args.channel_max, num_fp16_res=0, conv_clamp=None)
    G_ref = ref_networks.Generator(args.z_dim, 0, args.w_dim, res, 3, mapping_kwargs=dict(num_layers=args.mapping_layers), synthesis_kwargs=common).to(device).train()
    D_ref = ref_networks.Discriminator(0, res, 3, architecture="resnet", **common).to(device).train()
    empty_c = torch.zeros(args.batch, 0, device=device)

    n_ours = sum(p.numel() for m in (G, D) for p in m.parameters())
    n_ref = sum(p.numel() for m in (G_ref, D_ref) for p in m.parameters())
    print(f"parameters: ours {n_ours:,}  reference {n_ref:,}")

    steps = {
        "ours": make_step(G, D, args.batch, res, device, G_call, D_call, memory_format),
        "reference": make_step(G_ref, D_ref, args.batch, res, device, lambda z: G_ref(z, empty_c), lambda x: D_ref(x, empty_c), torch.contiguous_format),
    }
    times: dict[str, list[float]] = {name: [] for name in steps}
    cpu_times: dict[str, list[float]] = {name: [] for name in steps}  # process CPU s: less sensitive to a shared host
    for i in range(args.warmup + args.steps):
        z = torch.randn(args.batch, args.z_dim, device=device)
        for name, step in steps.items():
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t0, c0 = time.perf_counter(), time.process_time()
            step(z)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)
                cpu_times[name].append(time.process_time() - c0)
        print(f"step {i + 1}/{args.warmup + args.steps}", end="\r", file=sys.stderr, flush=True)

    med = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    flags = ", ".join(f for f, on in (("channels_last", args.channels_last), ("compile", args.compile)) if on) or "eager"
    print(f"config: {res}px z=w={args.z_dim} base {args.channel_base} max {args.channel_max} batch {args.batch} threads {args.threads} device {device} ({flags})")
    for name, m in med.items():
        q = statistics.quantiles(times[name], n=4)
        cpu = statistics.median(cpu_times[name]) * 1e3
        print(f"{name:>10}: median {m:7.1f} ms/step wall (IQR {q[0] * 1e3:.1f}-{q[2] * 1e3:.1f}), {cpu:7.1f} ms CPU, {args.steps} steps")
    paired = [a / b for a, b in zip(times["ours"], times["reference"])]  # robust to load that drifts between steps
    cpu_ratio = statistics.median(cpu_times["ours"]) / statistics.median(cpu_times["reference"])
    print(f"ratio ours/reference: {med['ours'] / med['reference']:.3f} (wall medians), "
          f"{statistics.median(paired):.3f} (median of paired wall steps), {cpu_ratio:.3f} (CPU medians)")


if __name__ == "__main__":
    main()
