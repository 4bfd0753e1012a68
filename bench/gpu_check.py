"""The first GPU hour: one command that proves the GPU path in at most ten minutes and ends with a table.

    python bench/gpu_check.py                 # on one or two GPUs: 256 px, the paper's architecture
    python bench/gpu_check.py --tiny          # the same code path on CPU at 32 px, under a minute (CI)

No part of the project had run on a GPU before this script; it checks, with the library's own code:
  1. train: TrainingRun.step (joint stage: G, D and E, R1 and path length included) on synthetic images with
     the model section of configs/lsun-256.yaml and reduced precision on (NVIDIA's policy, models.networks):
     s/kimg and img/s beside NVIDIA's published 256-px figure (21.6-24.2 s/kimg on one V100, G+D only:
     our joint step also runs E, G(E(x)) and LPIPS, so it has more to do), and a NaN/inf check on every
     loss of every step;
  2. ddp: the same with 2 DDP workers over NCCL when 2 GPUs exist (torch.distributed directly, the same
     TrainingRun that Ray Train wraps); otherwise a line saying it was skipped;
  3. score: ReconstructionScorer (G(E(x)), the real perceptual metric, FID features) at 256 px, images/s,
     and the share of the GPU's peak that the counted FLOPs per image imply (peak from a table by device
     name or --peak-tflops; FLOPs counted here with bench_scoring.flops_per_image, the count
     docs/benchmarks.md reports);
  4. serve: the Sampler at 256 px, batch 1 and 16, mean vs multimodal truncation, ms per image;
  5. paper: serving throughput of the paper's generators (256, 512 and 1024 px with NVIDIA's channel counts:
     paper256 channel_base 16384, paper512/1024 32768, channel_max 512, z = w = 512, 8 mapping layers;
     random weights) through the Sampler, float32 against bf16 in NVIDIA's num_fp16_res = 4 blocks (the
     bundle an `sdsg import` of an SDIP or NVIDIA-zoo pickle gives), batch 1 and 16, with peak GPU memory;
     --tiny runs the same code at 32 px with tiny channels;
  6. auroc: bench/bench_filtering.py's AUROC-vs-length sweep at 64 px when that benchmark exists.
Every section checks the time left (--budget-s) and is skipped with a line rather than overrun it. Weights
are random (speed does not depend on them). Exits 1 when a loss was not finite.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

NVIDIA_V100_S_PER_KIMG = (21.6, 24.2)  # stylegan2-ada-pytorch README, 256x256, 1 V100
# Dense tensor-core peaks in TFLOP/s for bf16 (fp16 on V100/T4, which lack bf16), from the vendors' sheets.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "A10": 125.0, "L40S": 362.0, "L4": 121.0,
               "V100": 125.0, "T4": 65.0}
SECTIONS = ("train", "ddp", "score", "serve", "paper", "auroc")
# NVIDIA's train.py specs: (resolution, channel_base); channel_max 512, z_dim = w_dim = 512, 8 mapping layers
PAPER_SIZES = ((256, 16384), (512, 32768), (1024, 32768))
TABLE_MARKER = "GPU_CHECK_TABLE"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="CPU, 32 px, tiny channels, few steps: the CI check")
    p.add_argument("--config", default=str(ROOT / "configs" / "lsun-256.yaml"), help="its model section is trained")
    p.add_argument("--steps", type=int, default=None, help="timed training steps (default 40; --tiny 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed first steps (default 4; --tiny 1)")
    p.add_argument("--batch", type=int, default=None, help="images per GPU per step (default 32; --tiny 4)")
    p.add_argument("--score-images", type=int, default=None, help="images scored (default 512; --tiny 16)")
    p.add_argument("--peak-tflops", type=float, default=None, help="GPU peak; default: table by device name")
    p.add_argument("--budget-s", type=float, default=540.0, help="skip what would not fit in this many seconds")
    p.add_argument("--json", default=None, help="also write the rows as JSON here")
    return p.parse_args(argv)


class Table:
    """Rows of (section, setting, value, unit, note); values are floats or None (not measured)."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def add(self, section: str, setting: str, value: float | None, unit: str, note: str = "") -> None:
        assert section in SECTIONS, section
        self.rows.append({"section": section, "setting": setting, "value": value, "unit": unit, "note": note})
        shown = "-" if value is None else f"{value:.4g}"
        print(f"[{section}] {setting}: {shown} {unit} {note}".rstrip(), flush=True)

    def render(self, title: str) -> str:
        lines = [f"{TABLE_MARKER} {title}", "| check | setting | figure | unit | note |", "| --- | --- | --- | --- | --- |"]
        for r in self.rows:
            shown = "-" if r["value"] is None else f"{r['value']:.4g}"
            lines.append(f"| {r['section']} | {r['setting']} | {shown} | {r['unit']} | {r['note']} |")
        return "\n".join(lines)


def check_config(args: argparse.Namespace, device: str):
    """The SDSG config of every section: the --config file's model (or the tiny CPU model), joint stage."""
    from sdsg_ray.config import load_config

    if args.tiny:
        overrides = {"model.resolution": 32, "model.z_dim": 32, "model.w_dim": 32, "model.mapping_layers": 2,
                     "model.channel_base": 256, "model.channel_max": 16, "train.metric": "stlpips-alex",
                     "score.metric": "stlpips-alex", "cluster.metric": "stlpips-alex"}
        config = load_config(None, overrides)
    else:
        # fid_features auto: Inception when its file is there, else stlpips-alex-pool (a bare GPU box has no Inception)
        config = load_config(args.config, {"train.metric": "auto", "score.fid_features": "auto"})
    return config.model_copy(update={"train": config.train.model_copy(update={
        "stage": "joint", "batch_size": args.batch, "workers": 1, "gpus_per_worker": 1.0 if device != "cpu" else 0.0})})


def synthetic_batch(n: int, resolution: int, seed: int) -> torch.Tensor:
    """Smooth random uint8 NHWC images (speed does not depend on their content)."""
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256, (n, 4, 4, 3)).astype(np.float32)
    up = torch.nn.functional.interpolate(torch.from_numpy(low).permute(0, 3, 1, 2), size=resolution, mode="bilinear")
    return up.permute(0, 2, 3, 1).round().clamp(0, 255).to(torch.uint8).contiguous()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_training(config, device: str, steps: int, warmup: int, wrap=None, world_size: int = 1, rank: int = 0) -> dict:
    """TrainingRun.step (the library's, reduced precision on) for warmup + steps; returns timing and the
    count of non-finite loss values over every step."""
    from sdsg_ray.pretrained import build_metric
    from sdsg_ray.training.loop import TrainingRun

    metric = build_metric(config.train.metric, device=device)
    kwargs = {"wrap": wrap} if wrap is not None else {}
    run = TrainingRun(config, device, world_size=world_size, metric=metric, reduced_precision=True, **kwargs)
    res = config.model.resolution
    batches = [synthetic_batch(run.local_batch, res, seed=rank * 1000 + k) for k in range(4)]
    bad: list[str] = []
    start = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            _sync(device)
            start = time.perf_counter()
        logs = run.step(batches[step % len(batches)])
        bad += [f"{k}@{step}" for k, v in logs.items() if not bool(torch.isfinite(v).all())]
    _sync(device)
    seconds = time.perf_counter() - start
    images = steps * config.train.batch_size  # global images
    return {"seconds": seconds, "img_per_s": images / seconds, "s_per_kimg": seconds / images * 1000,
            "non_finite": bad, "reduced_blocks": run.reduced_blocks, "dtype": str(run.reduced_dtype),
            "metric": getattr(metric, "name", "?")}


def _ddp_worker(rank: int, world: int, port: int, config_json: str, steps: int, warmup: int, out: str) -> None:
    from torch.nn.parallel import DistributedDataParallel

    from sdsg_ray.config import SDSGConfig

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    torch.distributed.init_process_group("nccl", rank=rank, world_size=world)
    try:
        config = SDSGConfig.model_validate(json.loads(config_json))
        # what ray.train.torch.prepare_model does (sdsg_ray.distributed.train), without Ray
        wrap = lambda m: DistributedDataParallel(m, device_ids=[rank], broadcast_buffers=False)  # noqa: E731
        result = time_training(config, f"cuda:{rank}", steps, warmup, wrap=wrap, world_size=world, rank=rank)
        if rank == 0:
            Path(out).write_text(json.dumps({k: result[k] for k in ("seconds", "img_per_s", "s_per_kimg", "non_finite")}))
    finally:
        torch.distributed.destroy_process_group()


def check_ddp(config, args, table: Table, baseline_img_s: float | None) -> list[str]:
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus < 2:
        table.add("ddp", "2 workers, NCCL", None, "img/s", f"skipped: {gpus} GPU(s) here, DDP needs 2")
        return []
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    two = config.model_copy(update={"train": config.train.model_copy(update={
        "batch_size": 2 * args.batch, "workers": 2})})
    out = tempfile.mktemp(suffix=".json")
    mp.spawn(_ddp_worker, args=(2, port, json.dumps(two.model_dump(mode="json")), args.steps, args.warmup, out), nprocs=2)
    r = json.loads(Path(out).read_text())
    scaling = f"{r['img_per_s'] / baseline_img_s:.2f}x one GPU" if baseline_img_s else ""
    table.add("ddp", f"2 workers, NCCL, batch {args.batch}/GPU", r["img_per_s"], "img/s", scaling)
    table.add("ddp", "s/kimg", r["s_per_kimg"], "s/kimg")
    table.add("ddp", "non-finite loss values", float(len(r["non_finite"])), "count", ", ".join(r["non_finite"][:5]))
    return r["non_finite"]


def device_peak_tflops(device: str, flag: float | None) -> tuple[float | None, str]:
    if flag is not None:
        return flag, "--peak-tflops"
    if not device.startswith("cuda"):
        return None, "no peak known for a CPU; pass --peak-tflops"
    name = torch.cuda.get_device_name(0)
    for key, peak in PEAK_TFLOPS.items():
        if key in name:
            return peak, f"{name}: {key} table"
    return None, f"{name} not in the table; pass --peak-tflops"


def export_random(config, root: Path, with_encoder: bool):
    """A random-weight inference bundle of this model, loaded back as the stages would load it."""
    from sdsg_ray.artifacts.checkpoint import export_inference, load_inference
    from sdsg_ray.models.networks import build_networks
    from sdsg_ray.storage import get_storage

    torch.manual_seed(0)
    G, _, E = build_networks(config.model)
    with torch.no_grad():
        G.mapping.w_avg.copy_(G.mapping(torch.randn(2048, G.z_dim)).mean(0))
    uri = str(root / ("stage1" if with_encoder else "stage2") / "inference.pt")
    export_inference(G, E if with_encoder else None, config.model, {"stage": "gpu-check"}, uri, get_storage())
    return uri, load_inference


def check_scoring(config, args, device: str, work: Path, table: Table) -> None:
    from bench_scoring import flops_per_image

    from sdsg_ray.filtering.scorer import ReconstructionScorer
    from sdsg_ray.pretrained import build_fid_features, build_metric

    uri, load_inference = export_random(config, work, with_encoder=True)
    bundle = load_inference(uri, device=device)
    metric = build_metric(config.score.metric, device=device)
    features = build_fid_features(config.score.fid_features, device=device)
    scorer = ReconstructionScorer(bundle, metric, features, torch.device(device))
    res, batch = config.model.resolution, min(config.score.batch_size, args.score_images)
    images = synthetic_batch(args.score_images, res, seed=7).numpy()
    out = scorer(images[:batch])  # warm-up
    _sync(device)
    start = time.perf_counter()
    for i in range(0, len(images), batch):
        out = scorer(images[i:i + batch])
    _sync(device)
    rate = len(images) / (time.perf_counter() - start)
    finite = all(np.isfinite(v).all() for v in out.values())
    table.add("score", f"{res} px, batch {batch}, {metric.name} + {features.name}", rate, "img/s",
              "" if finite else "NON-FINITE SCORES")
    flops = flops_per_image(metric, features, config.model)["total"]
    table.add("score", "forward FLOPs per image", flops / 1e9, "GFLOP", "counted here (FlopCounterMode)")
    peak, source = device_peak_tflops(device, args.peak_tflops)
    share = rate * flops / (peak * 1e12) if peak else None
    table.add("score", "share of peak FLOP/s", share, "fraction", f"peak {peak} TFLOP/s ({source})" if peak else source)


def check_serving(config, args, device: str, work: Path, table: Table) -> None:
    from sdsg_ray.pretrained import build_metric
    from sdsg_ray.artifacts.clusters import ClusterSet
    from sdsg_ray.truncation.clusters import fit_centers, map_latents
    from sdsg_ray.truncation.sampler import Sampler

    uri, load_inference = export_random(config, work, with_encoder=False)
    bundle = load_inference(uri, device=device)
    n_latents, k = (512, 8) if args.tiny else (8192, 64)
    w = map_latents(bundle.G_ema.mapping, bundle.G_ema.z_dim, n_latents, seed=0)
    centers, sizes = fit_centers(w, k, seed=0)
    metric = build_metric(config.cluster.metric, device=device)
    clusters = ClusterSet(centers, sizes, 0, metric.name, bundle.identity)
    sampler = Sampler(bundle, clusters, metric, assign_by="lpips", batch_size=16)
    reps = 2 if args.tiny else 5
    for batch in (1, 16):
        for mode in ("mean", "multimodal"):
            seeds = list(range(batch))
            images = sampler.sample(seeds, psi=0.7, mode=mode)  # warm-up
            assert images.shape == (batch, bundle.model.resolution, bundle.model.resolution, 3), images.shape
            _sync(device)
            start = time.perf_counter()
            for r in range(reps):
                sampler.sample([s + 1000 * (r + 1) for s in seeds], psi=0.7, mode=mode)
            _sync(device)
            ms = (time.perf_counter() - start) / (reps * batch) * 1000
            table.add("serve", f"{bundle.model.resolution} px, batch {batch}, {mode}", ms, "ms/image",
                      f"{k} centers, LPIPS assignment ({metric.name})" if mode == "multimodal" else "")


def check_paper_sizes(args, device: str, table: Table, left) -> None:
    """ms/image of the Sampler (mean truncation, psi 0.7) on random paper-size generators, fp32 vs bf16."""
    from sdsg_ray.artifacts.checkpoint import InferenceBundle
    from sdsg_ray.config import ModelConfig
    from sdsg_ray.models.networks import build_generator, set_reduced_precision
    from sdsg_ray.truncation.sampler import Sampler

    if args.tiny:
        sizes, batches = [dict(resolution=32, channel_base=256, channel_max=16, z_dim=32, w_dim=32, mapping_layers=2)], (1, 4)
    else:
        sizes = [dict(resolution=r, channel_base=base, channel_max=512, z_dim=512, w_dim=512, mapping_layers=8)
                 for r, base in PAPER_SIZES]
        batches = (1, 16)
    reps = 2 if args.tiny else 5
    for fields in sizes:
        res = fields["resolution"]
        if left() < 60:
            table.add("paper", f"{res} px", None, "ms/image", f"skipped: {left():.0f} s of the budget left")
            continue
        model = ModelConfig(num_fp16_res=4, conv_clamp=256.0, **fields)
        torch.manual_seed(0)
        G = build_generator(model).to(device).eval().requires_grad_(False)
        bundle = InferenceBundle(G_ema=G, E=None, w_avg=G.mapping.w_avg, model=model, identity="random", meta={})
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        per_dtype = {}
        for dtype in (None, torch.bfloat16):
            blocks = set_reduced_precision(G, dtype)
            sampler = Sampler(bundle, batch_size=max(batches))
            for batch in batches:
                sampler.sample(list(range(batch)), psi=0.7, mode="mean")  # warm-up
                _sync(device)
                start = time.perf_counter()
                for r in range(reps):
                    sampler.sample([s + 1000 * (r + 1) for s in range(batch)], psi=0.7, mode="mean")
                _sync(device)
                ms = (time.perf_counter() - start) / (reps * batch) * 1000
                per_dtype[(dtype, batch)] = ms
                name = "bf16" if dtype is not None else "fp32"
                note = f"bf16 blocks {sorted(blocks)}" if dtype is not None else ""
                if dtype is not None:
                    note += f"; {per_dtype[(None, batch)] / ms:.2f}x fp32's img/s"
                table.add("paper", f"{res} px, batch {batch}, {name}", ms, "ms/image", note)
        set_reduced_precision(G, None)
        peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
        table.add("paper", f"{res} px peak GPU memory", peak, "GiB", "" if peak is not None else "not measured on CPU")
        del G, bundle, sampler
        if device == "cuda":
            torch.cuda.empty_cache()


def check_auroc(args, table: Table, remaining_s: float) -> None:
    script = ROOT / "bench" / "bench_filtering.py"
    if not script.exists():
        table.add("auroc", "AUROC vs stage-1 length, 64 px", None, "AUROC", "skipped: bench/bench_filtering.py does not exist on this branch")
        return
    if args.tiny:
        table.add("auroc", "AUROC vs stage-1 length, 64 px", None, "AUROC",
                  "skipped with --tiny (a CPU sweep takes hours: run bench/bench_filtering.py by hand)")
        return
    import subprocess

    out = tempfile.mkdtemp(prefix="gpu-check-filtering-")
    cmd = [sys.executable, str(script), "--device", "cuda", "--resolution", "64", "--out", out]
    try:
        done = subprocess.run(cmd, timeout=max(remaining_s, 1), capture_output=True, text=True)
        print(done.stdout[-4000:], done.stderr[-2000:], flush=True)
        table.add("auroc", "AUROC vs stage-1 length, 64 px", None, "AUROC",
                  f"ran `{' '.join(cmd[1:])}` (rc {done.returncode}); its table is printed above")
    except subprocess.TimeoutExpired:
        table.add("auroc", "AUROC vs stage-1 length, 64 px", None, "AUROC", f"stopped at the budget ({remaining_s:.0f} s)")


def main(argv=None) -> int:
    args = parse_args(argv)
    tiny = args.tiny
    args.steps = args.steps or (3 if tiny else 40)
    args.warmup = args.warmup if args.warmup is not None else (1 if tiny else 4)
    args.batch = args.batch or (4 if tiny else 32)
    args.score_images = args.score_images or (16 if tiny else 512)
    started = time.perf_counter()
    left = lambda: args.budget_s - (time.perf_counter() - started)  # noqa: E731
    device = "cpu" if tiny or not torch.cuda.is_available() else "cuda"
    if not tiny and device == "cpu":
        print("no GPU found: run with --tiny on a CPU", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name(0) if device == "cuda" else "CPU"
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as NVIDIA's trainer
    config = check_config(args, device)
    table = Table()
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    bad: list[str] = []

    r = time_training(config, device, args.steps, args.warmup)
    blocks = ", ".join(f"{n} {sorted(v)}" for n, v in r["reduced_blocks"].items())
    setting = f"{config.model.resolution} px joint, batch {args.batch}, {r['dtype']} in {blocks}"
    table.add("train", setting, r["s_per_kimg"], "s/kimg", "NVIDIA 256 px, 1 V100, G+D only: %.1f-%.1f s/kimg" % NVIDIA_V100_S_PER_KIMG)
    table.add("train", "images per second", r["img_per_s"], "img/s", f"{args.steps} steps after {args.warmup} warm-up, metric {r['metric']}")
    table.add("train", "non-finite loss values", float(len(r["non_finite"])), "count", ", ".join(r["non_finite"][:5]))
    bad += r["non_finite"]

    bad += check_ddp(config, args, table, r["img_per_s"])
    for section, fn in (("score", check_scoring), ("serve", check_serving)):
        if left() < 30:
            table.add(section, "(not run)", None, "-", f"skipped: {left():.0f} s of the budget left")
            continue
        fn(config, args, device, work, table)
    check_paper_sizes(args, device, table, left)
    check_auroc(args, table, left())

    title = f"{name}, torch {torch.__version__}, {time.perf_counter() - started:.0f} s"
    print("\n" + table.render(title), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": name, "rows": table.rows}, indent=1))
    if bad:
        print(f"FAILED: non-finite losses: {bad[:10]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
