"""Ingest and scoring throughput: img2dataset-layout shards vs one object per image, same images, same run.

    python3 bench/bench_ingest.py [--images 400] [--store s3|local] [--shard-size 100]

Why: at scale the images live in shards; this shows what the shard path costs or saves against single
objects on the same bytes. A loopback HTTP server (tests/test_ingest.py's ImageServer) serves --images
generated 48-px PNGs; the store is a moto S3 server in its own process (default) or a local directory.

- ingest: `run_ingest` (Ray Data tasks, tasks x threads downloads) writes tar shards, cold (first Ray Data
  job: task workers start and import the project) and warm (a second run into another prefix); the baseline
  downloads the same URLs through the same fetch/crop/resize code with the same number of threads
  (tasks x threads) and writes one JPEG object per image. URLs/s each, ratio shards / single.
- read + decode alone: `imaging.load_batch` in batches of 32 over the shard samples' addresses and over
  the single objects, 3 alternating rounds, images/s and the ratio of medians.
- scoring: `run_scoring` (random weights of the default 32-px model, 1 actor) over the shard prefix and
  over the prefix of single JPEGs extracted from the shards (the same bytes): images/s end to end
  (listing included) and steady, ratio shards / single.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--shard-size", type=int, default=100)
    parser.add_argument("--store", choices=("s3", "local"), default="s3")
    parser.add_argument("--tasks", type=int, default=2)
    parser.add_argument("--threads", type=int, default=8)
    args = parser.parse_args()

    import os

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    from conftest import create_bucket, free_port, wait_for_port
    from test_ingest import ImageServer

    moto = None
    workdir = Path(tempfile.mkdtemp(prefix="bench_ingest_"))
    if args.store == "s3":
        port = free_port()
        moto = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(port)
        os.environ["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{port}"
        root = create_bucket(os.environ["AWS_ENDPOINT_URL"], "bench-ingest")
    else:
        root = str(workdir)
    server = ImageServer()
    try:
        print(json.dumps(run(args, root, workdir, server), indent=2))
    finally:
        server.close()
        if moto is not None:
            moto.terminate()
            moto.wait(timeout=30)


def run(args, root: str, workdir: Path, server) -> dict:
    import numpy as np
    import ray
    import torch

    from sdsg_ray.artifacts.checkpoint import export_inference
    from sdsg_ray.config import ModelConfig, load_config
    from sdsg_ray.filtering.score import run_scoring
    from sdsg_ray.ingest import run_ingest
    from sdsg_ray.ingest.download import fetch_one, sample_key
    from sdsg_ray.ingest.urls import UrlItem
    from sdsg_ray.manifest import list_images
    from sdsg_ray.models.networks import build_networks
    from sdsg_ray.shards import parse_address, read_samples
    from sdsg_ray.storage import get_storage, join

    storage = get_storage()
    ray.init(num_cpus=3, include_dashboard=False)
    urls = [f"{server.url}/img/{i}.png" for i in range(args.images)]
    (workdir / "urls.txt").write_text("\n".join(urls))
    config = load_config(None, {
        "ingest.urls": str(workdir / "urls.txt"), "ingest.out": join(root, "shards"), "ingest.resolution": 32,
        "ingest.shard_size": args.shard_size, "ingest.tasks": args.tasks, "ingest.threads": args.threads,
        # The bench's server is on loopback, which the default address policy refuses.
        "ingest.allow_networks": ["127.0.0.1/32"]})
    shards_summary = run_ingest(config)  # cold: includes starting Ray Data's task workers
    # Warm: the same URLs into another prefix, task workers already running (the steady state of a long run).
    warm_summary = run_ingest(config.model_copy(update={"ingest": config.ingest.model_copy(
        update={"out": join(root, "shards-warm")})}))

    # Baseline: same fetch/crop/resize, same concurrency, one object per image.
    single = join(root, "single")
    started = time.perf_counter()

    def one(i: int) -> None:
        r = fetch_one(sample_key(i // args.shard_size, i % args.shard_size, args.shard_size), UrlItem(urls[i]), config.ingest)
        storage.write_bytes(join(single, f"{r.key}.jpg"), r.jpeg)

    with ThreadPoolExecutor(args.tasks * args.threads) as pool:
        list(pool.map(one, range(args.images)))
    single_s = time.perf_counter() - started
    single_rate = args.images / single_s

    # The same JPEG bytes as single objects, for scoring (the baseline's re-encode may differ by a bit).
    addresses = list(list_images(join(root, "shards"), storage))
    extracted = join(root, "extracted")
    blobs = read_samples(addresses, storage)
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda i: storage.write_bytes(join(extracted, f"{parse_address(addresses[i]).key}.jpg"), blobs[i]),
                      range(len(addresses))))

    # Read + decode alone (the scoring pipeline's CPU stage, load_batch), batches of 32, the I/O shards change.
    from sdsg_ray.imaging import load_batch

    def decode_rate(keys: list[str]) -> float:
        started = time.perf_counter()
        for i in range(0, len(keys), 32):
            assert (load_batch(keys[i:i + 32], storage, 32)["status"] == "ok").all()
        return len(keys) / (time.perf_counter() - started)

    singles = sorted(storage.list(extracted))
    decode = {"shards_images_per_s": [], "single_images_per_s": []}
    for _ in range(3):  # alternating, to spread the load's noise over both
        decode["shards_images_per_s"].append(round(decode_rate(addresses), 1))
        decode["single_images_per_s"].append(round(decode_rate(singles), 1))
    decode["ratio_median"] = round(float(np.median(decode["shards_images_per_s"]) / np.median(decode["single_images_per_s"])), 2)

    torch.manual_seed(0)
    model = ModelConfig()
    G, _, E = build_networks(model)
    checkpoint = join(root, "stage1", "inference.pt")
    export_inference(G, E, model, {"stage": "random-weights-bench"}, checkpoint, storage)

    def score(data: str, name: str) -> dict:
        started = time.perf_counter()
        s = run_scoring(load_config(None, {"score.data": data, "score.checkpoint": checkpoint,
                                           "score.out": join(root, name), "score.batch_size": 32, "score.actors": 1}))
        return {"images": s["images"], "failed": s["failed"], "wall_s": round(time.perf_counter() - started, 2),
                "images_per_s": s["images_per_s"], "images_per_s_steady": s["images_per_s_steady"]}

    from_shards = score(join(root, "shards"), "scores-shards")
    from_single = score(extracted, "scores-single")
    ray.shutdown()
    return {
        "store": args.store, "images": args.images, "shard_size": args.shard_size,
        "concurrency": f"{args.tasks} tasks x {args.threads} threads",
        "ingest_shards": {"urls_per_s": shards_summary["urls_per_s"], "seconds": shards_summary["seconds_this_run"],
                          "successes": shards_summary["successes"]},
        "ingest_shards_warm": {"urls_per_s": warm_summary["urls_per_s"], "seconds": warm_summary["seconds_this_run"]},
        "ingest_ratio_warm_shards_vs_single": round(warm_summary["urls_per_s"] / single_rate, 2),
        "ingest_single_objects": {"urls_per_s": round(single_rate, 2), "seconds": round(single_s, 2)},
        "ingest_ratio_shards_vs_single": round(shards_summary["urls_per_s"] / single_rate, 2),
        "read_decode_only": decode,
        "score_from_shards": from_shards,
        "score_from_single_objects": from_single,
        "score_ratio_shards_vs_single": round(from_shards["images_per_s"] / from_single["images_per_s"], 2),
        "score_ratio_steady": (round(from_shards["images_per_s_steady"] / from_single["images_per_s_steady"], 2)
                               if from_shards["images_per_s_steady"] and from_single["images_per_s_steady"] else None),
    }


if __name__ == "__main__":
    main()
