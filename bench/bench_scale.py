"""Scale: listing a million keys, selection over a million score rows, scoring tens of thousands of images,
and a projection to 10M / 100M images. Run by hand (not by CI); prints JSON, writes PNGs next to it.

    python3 bench/bench_scale.py listing --keys 1000000 [--server indexed|moto]
    python3 bench/bench_scale.py selection --rows 100000 1000000
    python3 bench/bench_scale.py scoring --images 50000 [--checkpoint sdsg-demo/stage1]
    python3 bench/bench_scale.py projection [--scoring-json out/scoring.json]

- listing: moto's S3 server (its own process, 127.0.0.1), filled through its in-process backend, is listed
  over HTTP by `manifest.ensure_manifest` into manifest shards in a fresh process: wall time, keys/s, the
  client's CPU per key and that process's peak RSS. A 10x smaller listing in the same run is the baseline
  the peak memory is compared against (it must not grow with the key count). moto sorts the whole bucket
  on every ListObjectsV2 page (N^2 for a listing), so by default (--server indexed) the server process
  pages by bisection over the sorted names instead, checked equal to moto's own pages first; --server moto
  keeps moto's method (wall time is then the server's, not the client's).
- selection: synthetic score shards (real layout: feature vectors of the offline features' 1152
  dimensions, scores in [0, 1]) are written locally, then `run_selection` runs in a fresh process per
  size: wall time and peak RSS, for each --rows; the ratio of peaks shows memory does not grow with N.
- scoring: the dataset generator's images at 32 px, scored end to end by `run_scoring` with the demo's
  model (random weights of the demo's architecture when --checkpoint is not given: the same FLOPs) on a
  local Ray: steady images/s, the actors' idle share (waiting for decoded batches), and the driver's RSS
  sampled every second (flat, not growing with rows), drawn to scoring_driver_rss.png.
- projection: hours and cost for 10M and 100M images on a GPU cluster from the FLOPs per image counted in
  docs/benchmarks.md and the measured per-image decode cost here; every assumption is printed with it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

FEATURE_DIM = 1152  # stlpips-alex-pool, the offline FID features
FLOPS_PER_IMAGE_256 = 146.0e9  # docs/benchmarks.md: E + G.synthesis + metric + features at 256 px


def peak_rss_mb_of(code: str, *args: str) -> dict:
    """Run ``code`` in a fresh Python; returns its JSON result plus its wall time and peak RSS (MB)."""
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_s"] = round(time.perf_counter() - started, 2)
    return result


PEAK = "import resource, json; PEAK = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024"


# ----- listing ---------------------------------------------------------------------------------------------


LIST_CODE = PEAK + """
import sys, time
from sdsg_ray.config import StorageConfig
from sdsg_ray.manifest import ensure_manifest
from sdsg_ray.storage import Storage
prefix, out, endpoint = sys.argv[1:4]
storage = Storage(StorageConfig(endpoint_url=endpoint))
t, cpu = time.perf_counter(), time.process_time()
shards = ensure_manifest(prefix, out, storage, 10_000)
print(json.dumps({"keys": sum(s.rows for s in shards), "shards": len(shards), "list_s": time.perf_counter() - t,
                  "client_cpu_s": time.process_time() - cpu, "peak_rss_mb": PEAK()}))
"""

# moto's server in its own process, filled through its in-process backend: a million PUTs over HTTP take
# hours on 2 cores, and what is measured is the listing, not the fill.
# --server indexed: moto's ListObjectsV2 collects and sorts the whole bucket on every page (O(N log N) a
# page, so N^2 for a listing: 434 s at 100k keys, hours at 1M). Its backend method is swapped, in the
# server process only, for a bisect over the key names sorted once after the fill; moto's HTTP layer, XML,
# continuation tokens and the boto3 client are unchanged. Before the listing starts the server checks that
# both methods return the same pages (the first pages of a prefix and a continued page).
FILLED_MOTO = """
import bisect, sys, time
from moto.server import ThreadedMotoServer
from moto.s3.models import S3Backend, s3_backends
port, bucket_name, keys, server_kind = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
server.start()
backend = s3_backends["123456789012"]["global"]
backend.create_bucket(bucket_name, "us-east-1")
for i in range(keys):  # 10 x 100 "directories", like a crawl; raw/0 holds a tenth
    backend.put_object(bucket_name, f"raw/{i % 10}/{i // 10 % 100:02d}/{i:09d}.jpg", b"")
if server_kind == "indexed":
    bucket = backend.get_bucket(bucket_name)
    names = sorted(bucket.keys.keys())  # nothing writes to this bucket after the fill
    native = S3Backend.list_objects_v2

    def indexed(self, bucket, prefix, delimiter, continuation_token, start_after, max_keys):
        if delimiter or bucket.name != bucket_name:
            return native(self, bucket, prefix, delimiter, continuation_token, start_after, max_keys)
        prefix = prefix or ""
        after = self._pagination_tokens.get(continuation_token) if continuation_token else start_after
        start = max(bisect.bisect_left(names, prefix), bisect.bisect_right(names, after) if after else 0)
        page = []
        for name in names[start:start + max_keys + 1]:
            if not name.startswith(prefix):
                break
            page.append(bucket.keys[name])
        return self._truncate_result(page, max_keys)

    for prefix, after in (("raw/0/", None), ("raw/3/", "raw/3/50/"), ("raw/9/99/", None)):
        args = (bucket, prefix, None, None, after, 1000)
        want, got = native(backend, *args), indexed(backend, *args)
        assert [k.name for k in want[0]] == [k.name for k in got[0]] and want[1] == got[1], prefix
        token = got[2]
        if token:
            args = (bucket, prefix, None, token, None, 1000)
            assert [k.name for k in native(backend, *args)[0]] == [k.name for k in indexed(backend, *args)[0]]
    S3Backend.list_objects_v2 = indexed
print("ready", flush=True)
time.sleep(1e9)
"""


def bench_listing(keys: int, workdir: Path, server: str) -> dict:
    """Lists ``keys`` keys (and, as the baseline, the tenth under raw/0) from moto's S3 server over HTTP.

    With ``server="moto"`` moto sorts the whole bucket on every ListObjectsV2 page, so wall time is the
    server's; ``"indexed"`` pages by bisection (see FILLED_MOTO). The client's own cost is ``client_cpu_s``
    (this project's code), and memory is the listing process's peak RSS."""
    from conftest import free_port, wait_for_port

    port, bucket = free_port(), "scale"
    started = time.perf_counter()
    moto = subprocess.Popen([sys.executable, "-c", FILLED_MOTO, str(port), bucket, str(keys), server],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert moto.stdout.readline().strip() == "ready", "the moto server did not start"
        wait_for_port(port)
        fill_s = time.perf_counter() - started
        endpoint = f"http://127.0.0.1:{port}"
        small = peak_rss_mb_of(LIST_CODE, f"s3://{bucket}/raw/0", str(workdir / "small"), endpoint)
        print(json.dumps({"baseline": small}), flush=True)
        full = peak_rss_mb_of(LIST_CODE, f"s3://{bucket}/raw", str(workdir / "full"), endpoint)
    finally:
        moto.terminate()
        moto.wait(timeout=30)
    return {
        "keys": full["keys"], "server": server, "fill_s": round(fill_s, 1), "list_s": round(full["list_s"], 1),
        "keys_per_s": round(full["keys"] / full["list_s"]),
        "client_cpu_us_per_key": round(1e6 * full["client_cpu_s"] / full["keys"], 1),
        "peak_rss_mb": round(full["peak_rss_mb"]),
        "baseline": {"keys": small["keys"], "list_s": round(small["list_s"], 1),
                     "client_cpu_us_per_key": round(1e6 * small["client_cpu_s"] / small["keys"], 1),
                     "peak_rss_mb": round(small["peak_rss_mb"])},
        "peak_rss_ratio_vs_baseline": round(full["peak_rss_mb"] / small["peak_rss_mb"], 3),
    }


# ----- selection -------------------------------------------------------------------------------------------


def write_score_shards(out: Path, rows: int, seed: int = 0, shard_rows: int = 10_000) -> None:
    """Score shards in the real layout: ~3 % failed rows, d in [0, 1], 1152-d features of real and recon."""
    import pyarrow as pa

    import pyarrow.parquet as pq

    from sdsg_ray.artifacts.scores import SCORE_COLUMN, SCORE_SCHEMA, ScoreSet
    from sdsg_ray.storage import get_storage

    storage, rng = get_storage(), np.random.default_rng(seed)
    for shard_id, start in enumerate(range(0, rows, shard_rows)):
        n = min(shard_rows, rows - start)
        ok = rng.random(n) > 0.03
        d = rng.beta(2, 5, n).astype(np.float32)
        real = rng.standard_normal((n, FEATURE_DIM), dtype=np.float32)
        recon = real + 0.3 * rng.standard_normal((n, FEATURE_DIM), dtype=np.float32)

        def feats(values: np.ndarray) -> pa.Array:
            flat = pa.array(values.reshape(-1), pa.float32())
            offsets = pa.array(np.arange(n + 1, dtype=np.int32) * FEATURE_DIM)
            return pa.ListArray.from_arrays(offsets, flat, mask=pa.array(~ok))

        table = pa.table({
            "key": pa.array([f"s3://scale/raw/{start + i:09d}.jpg" for i in range(n)]),
            "status": pa.array(np.where(ok, "ok", "error")),
            "error": pa.array([None if o else "not an image" for o in ok], pa.string()),
            SCORE_COLUMN: pa.array(d, mask=~ok), "d_l1": pa.array(d, mask=~ok),
            "feat_real": feats(real), "feat_recon": feats(recon),
        }, schema=SCORE_SCHEMA)
        with storage.open_write(ScoreSet(str(out)).shard(shard_id)) as f:
            pq.write_table(table, f)
    summary = {"features": "stlpips-alex-pool", "features_is_inception": False, "metric": "stlpips-alex",
               "checkpoint": None, "checkpoint_identity": None}
    storage.write_text(ScoreSet(str(out)).summary, json.dumps(summary))


SELECT_CODE = PEAK + """
import sys, time
from sdsg_ray.config import load_config
from sdsg_ray.filtering.select import run_selection
scores, out = sys.argv[1:3]
t = time.perf_counter()
report = run_selection(load_config(None, {"select.scores": scores, "select.out": out, "select.min_size": 1000,
                                          "select.threshold_step": 0.02}))
print(json.dumps({"select_s": time.perf_counter() - t, "peak_rss_mb": PEAK(), "theta": report["theta"],
                  "kept": report["size_kept"], "grid_points": len(report["curve"])}))
"""


def bench_selection(sizes: list[int], workdir: Path) -> dict:
    results = {}
    for rows in sizes:
        scores = workdir / f"scores-{rows}"
        started = time.perf_counter()
        write_score_shards(scores, rows)
        write_s = time.perf_counter() - started
        measured = peak_rss_mb_of(SELECT_CODE, str(scores), str(workdir / f"selection-{rows}"))
        measured.update(rows=rows, write_s=round(write_s, 1), select_s=round(measured["select_s"], 1),
                        rows_per_s=round(rows / measured["select_s"]), peak_rss_mb=round(measured["peak_rss_mb"]))
        results[str(rows)] = measured
    first, last = results[str(sizes[0])], results[str(sizes[-1])]
    results["peak_rss_ratio_largest_vs_smallest"] = round(last["peak_rss_mb"] / first["peak_rss_mb"], 3)
    return results


# ----- scoring ---------------------------------------------------------------------------------------------


class RssSampler:
    """This process's RSS every second, in a thread (the driver's memory across the run)."""

    def __init__(self) -> None:
        import psutil

        self.process, self.samples, self.stop = psutil.Process(), [], threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.started = time.perf_counter()

    def _run(self) -> None:
        while not self.stop.is_set():
            self.samples.append((time.perf_counter() - self.started, self.process.memory_info().rss / 2**20))
            self.stop.wait(1.0)

    def __enter__(self) -> "RssSampler":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


def bench_scoring(images: int, checkpoint: str | None, workdir: Path, actors: int) -> dict:
    import torch

    from sdsg_ray import figures
    from sdsg_ray.artifacts.checkpoint import export_inference
    from sdsg_ray.config import ModelConfig, load_config
    from sdsg_ray.dataset.synthetic import make_dataset
    from sdsg_ray.demo import DEMO_DEFAULTS
    from sdsg_ray.filtering.score import run_scoring
    from sdsg_ray.models import build_networks
    from sdsg_ray.ray_utils import ensure_ray
    from sdsg_ray.storage import get_storage

    storage = get_storage()
    started = time.perf_counter()
    make_dataset(str(workdir / "raw"), n=images, resolution=32, outlier_fraction=0.1, seed=0, storage=storage)
    make_s = time.perf_counter() - started
    if checkpoint is None:
        model = ModelConfig(**DEMO_DEFAULTS["model"])
        torch.manual_seed(0)
        G, _, E = build_networks(model)
        checkpoint = str(workdir / "stage1")
        export_inference(G, E, model, {"stage": "random weights, demo architecture"}, checkpoint, storage)
    ensure_ray(num_cpus=os.cpu_count())
    config = load_config(None, {
        "score.data": str(workdir / "raw" / "images"), "score.checkpoint": checkpoint,
        "score.out": str(workdir / "scores"), "score.metric": "stlpips-alex", "score.fid_features": "stlpips-alex-pool",
        "score.batch_size": 64, "score.actors": actors, "score.cpus_per_actor": max(0.5, (os.cpu_count() - 1) / actors),
    })
    with RssSampler() as rss:
        summary = run_scoring(config)
    times, mb = zip(*rss.samples)
    (workdir / "scoring_driver_rss.png").write_bytes(figures.curves(
        {"driver RSS": (times, mb)}, "seconds into run_scoring", "MB",
        f"Driver memory while scoring {images} images"))
    third = max(1, len(mb) // 3)
    return {
        "images": images, "make_dataset_s": round(make_s, 1), "seconds": summary["seconds_this_run"],
        "images_per_s": summary["images_per_s"], "images_per_s_steady": summary["images_per_s_steady"],
        "actor_idle_share_steady": summary["actor_idle_share_steady"], "actors": actors,
        "driver_rss_mb": {"first_third_max": round(max(mb[:third])), "last_third_max": round(max(mb[-third:])),
                          "max": round(max(mb))},
        "figure": str(workdir / "scoring_driver_rss.png"),
    }


# ----- projection ------------------------------------------------------------------------------------------


def decode_cost_per_image(samples: int = 200) -> float:
    """CPU seconds to decode a 512 x 384 photo-like JPEG and resize it to 256 px (one core)."""
    import io

    from PIL import Image

    from sdsg_ray.imaging import decode_image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:384, 0:512] / 512
    photo = (128 + 90 * np.sin(6 * xx[..., None] + rng.uniform(0, 6, 3)) * np.cos(4 * yy[..., None])
             + rng.normal(0, 12, (384, 512, 3)))
    buf = io.BytesIO()
    Image.fromarray(np.clip(photo, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    data = buf.getvalue()
    start = time.process_time()
    for _ in range(samples):
        assert decode_image(data, 256).status == "ok"
    return (time.process_time() - start) / samples


def projection(gpu_tflops: float, gpu_hour_usd: float, cpu_hour_usd: float, gpus: int) -> dict:
    decode_s = decode_cost_per_image()
    gpu_s_per_image = FLOPS_PER_IMAGE_256 / (gpu_tflops * 1e12)
    cores_per_gpu = decode_s / gpu_s_per_image  # decode cores that keep one GPU fed
    out = {"assumptions": {
        "flops_per_image_256px": FLOPS_PER_IMAGE_256, "sustained_gpu_tflops": gpu_tflops,
        "gpu_hour_usd": gpu_hour_usd, "cpu_core_hour_usd": cpu_hour_usd, "gpus": gpus,
        "decode_cpu_s_per_image_measured": round(decode_s, 5),
    }, "decode_cores_per_gpu": round(cores_per_gpu, 1)}
    for images in (10_000_000, 100_000_000):
        gpu_hours = images * gpu_s_per_image / 3600
        core_hours = images * decode_s / 3600
        out[f"{images:,}"] = {
            "gpu_hours": round(gpu_hours, 1), "wall_hours_on_gpus": round(gpu_hours / gpus, 2),
            "decode_core_hours": round(core_hours, 1),
            "cost_usd": round(gpu_hours * gpu_hour_usd + core_hours * cpu_hour_usd),
        }
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    listing = sub.add_parser("listing")
    listing.add_argument("--keys", type=int, default=1_000_000)
    listing.add_argument("--server", choices=("indexed", "moto"), default="indexed",
                         help="indexed: moto with ListObjectsV2 paged by bisection (moto's own is N^2 per listing)")
    sub.add_parser("selection").add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    scoring = sub.add_parser("scoring")
    scoring.add_argument("--images", type=int, default=50_000)
    scoring.add_argument("--checkpoint", default=None, help="a stage-1 --out (default: random demo-size weights)")
    scoring.add_argument("--actors", type=int, default=1)
    proj = sub.add_parser("projection")
    proj.add_argument("--gpu-tflops", type=float, default=100.0, help="sustained, bf16 (A100 ~312 peak)")
    proj.add_argument("--gpu-hour-usd", type=float, default=2.0)
    proj.add_argument("--cpu-hour-usd", type=float, default=0.04)
    proj.add_argument("--gpus", type=int, default=64)
    for parser in sub.choices.values():
        parser.add_argument("--workdir", default=None, help="default: a temporary directory (kept, printed)")
    args = p.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix=f"bench-scale-{args.what}-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"load average before: {os.getloadavg()}", file=sys.stderr)
    if args.what == "listing":
        result = bench_listing(args.keys, workdir, args.server)
    elif args.what == "selection":
        result = bench_selection(sorted(args.rows), workdir)
    elif args.what == "scoring":
        result = bench_scoring(args.images, args.checkpoint, workdir, args.actors)
    else:
        result = projection(args.gpu_tflops, args.gpu_hour_usd, args.cpu_hour_usd, args.gpus)
    result["load_average_after"] = os.getloadavg()
    result["workdir"] = str(workdir)
    (workdir / f"{args.what}.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
