"""`sdsg score`: the Ray Data scoring pipeline, resumable and exactly-once.

    manifest shards (listed once) --read_parquet--> keys --CPU tasks: read + decode--> uint8 images
        --actor pool (GPU if any): G(E(x)), d(x), L1, FID features--> driver --> score shard i, atomically

Score shard i holds exactly the keys of manifest shard i and is written in one atomic put when its last
row reaches the driver. A re-run (after a crash, a kill, a lost node) reads only the manifest shards
whose score shard does not exist yet, so every key ends up in the output exactly once. Ray Data's own
checkpointing is not used: it deadlocked a resumed run on a small cluster (docs/benchmarks.md).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter

import ray
from tqdm import tqdm

from sdsg_ray.artifacts.checkpoint import load_inference, scoring_pair
from sdsg_ray.artifacts.scores import ScoreSet, ShardAssembler
from sdsg_ray.config import ScoreConfig, SDSGConfig
from sdsg_ray.errors import InvalidRequest
from sdsg_ray.filtering.decode import read_and_decode
from sdsg_ray.filtering.scorer import ScoreActor
from sdsg_ray.manifest import ManifestShard, ensure_manifest
from sdsg_ray.pretrained import build_fid_features, judge_label, resolve_metric
from sdsg_ray.ray_utils import ensure_ray
from sdsg_ray.storage import Storage, get_storage, normalize

log = logging.getLogger(__name__)

DECODE_WORKER_BYTES = 160 * 1024**2  # a decode task's process: Python, pyarrow, PIL (measured ~130 MiB)
ENCODED_IMAGE_BYTES = 64 * 1024  # budget per encoded web image held while decoding
FOOTER_ACTORS_ENV = "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"
_USER_FOOTER_ACTORS = os.environ.get(FOOTER_ACTORS_ENV)


def footer_actors(manifest_shards: int) -> int:
    """One footer-reading actor per 64 manifest shards (10k keys each by default), 1 to Ray's default 32."""
    return max(1, min(32, manifest_shards // 64))


def build_dataset(pending: list[ManifestShard], storage: Storage, config: SDSGConfig, resolution: int) -> "ray.data.Dataset":
    """The lazy Ray Data plan over the pending manifest shards (nothing runs until iterated)."""
    cfg = config.score
    fs, _ = storage.arrow_filesystem(pending[0].uri)
    paths = [storage.arrow_filesystem(s.uri)[1] for s in pending]
    # read_parquet starts a pool of footer-reading actors per read, 32 by default: far more processes than
    # a few small manifest footers need, and slow to start on a small node (docs/benchmarks.md). The pool
    # is sized from this variable, read on the driver when the plan is built; a user's value wins.
    os.environ[FOOTER_ACTORS_ENV] = _USER_FOOTER_ACTORS or str(footer_actors(len(paths)))
    ds = ray.data.read_parquet(paths, filesystem=fs, columns=["key"], include_paths=True)
    # Keys are ~100 bytes, so Ray Data's 1 MiB minimum block size would pack ~10,000 of them into one
    # read block, and decoding would run as one task per block, in series with scoring. Batch-sized
    # blocks let decode tasks run side by side and stream into the actors (streaming split, no shuffle).
    ds = ds.repartition(target_num_rows_per_block=cfg.batch_size)
    # Decode tasks reserve their worker's footprint (Python, pyarrow, PIL: DECODE_WORKER_BYTES) plus a
    # batch of decoded images and encoded bytes. The distinct resource request also keeps Ray Data from
    # fusing decoding into the scoring actors: decoding stays a CPU task pool that runs alongside the
    # (GPU) actors instead of in series with them.
    decode_memory = DECODE_WORKER_BYTES + cfg.batch_size * (resolution * resolution * 3 + ENCODED_IMAGE_BYTES)
    ds = ds.map_batches(
        read_and_decode,
        fn_kwargs={"storage": storage, "resolution": resolution},
        batch_size=cfg.batch_size,
        batch_format="numpy",
        num_cpus=1,
        memory=decode_memory,
    )
    return ds.map_batches(
        ScoreActor,
        fn_constructor_kwargs={
            "checkpoint": cfg.checkpoint,
            "metric": cfg.metric,
            "judge_resolution": cfg.judge_resolution,
            "fid_features": cfg.fid_features,
            "storage": config.storage,
            "pair": cfg.pair,
        },
        compute=ray.data.ActorPoolStrategy(min_size=min(cfg.min_actors, cfg.actors), max_size=cfg.actors),
        num_gpus=cfg.gpus_per_actor,
        num_cpus=cfg.cpus_per_actor,
        batch_size=cfg.batch_size,
        batch_format="numpy",
    )


def check_cpu_budget(cfg: ScoreConfig, cluster_cpus: float) -> None:
    """Refuse a pool that would hold every CPU: the actors keep theirs for the whole run, and the read and
    decode tasks (num_cpus=1 each) would then never be scheduled; Ray Data waits on them forever."""
    held = cfg.actors * cfg.cpus_per_actor
    if held > cluster_cpus - 1:
        raise InvalidRequest(
            f"score.actors={cfg.actors} x score.cpus_per_actor={cfg.cpus_per_actor} = {held:g} CPUs leaves less "
            f"than the 1 CPU that reading and decoding need on this cluster of {cluster_cpus:g} CPUs; lower "
            f"--actors, or --cpus-per-actor (fractions are allowed, e.g. "
            f"{max(cluster_cpus - 1, 0) / cfg.actors:g}), or add CPUs"
        )


def _check_run(scores: ScoreSet, storage: Storage, run: dict) -> None:
    """Refuse to mix scores of different checkpoints, metrics or feature networks in one --out."""
    changed = storage.pin_settings(scores.run_record, run)
    if changed:
        raise InvalidRequest(f"{scores.uri} holds scores computed with different settings {changed}; use another --out")


def count_status(scores: ScoreSet, storage: Storage) -> Counter:
    counts: Counter = Counter()
    for batch in scores.iter_batches(storage, ["status"]):
        counts.update(batch["status"].tolist())
    return counts


def run_scoring(config: SDSGConfig) -> dict:
    """Score every image of score.data with the stage-1 checkpoint; write the score shards and the summary."""
    # Ray workers run in other working directories: local paths are made absolute here on the driver.
    cfg = config.score.model_copy(update={"checkpoint": normalize(config.score.checkpoint)})
    scores = ScoreSet(cfg.out)
    storage = get_storage(config.storage)
    bundle = load_inference(cfg.checkpoint, storage, device="cpu")  # identity and resolution; the actors load their own
    scoring_pair(bundle, cfg.pair)  # fail here, not in every actor, when the bundle lacks the pair
    ensure_ray(config.storage)
    check_cpu_budget(cfg, ray.cluster_resources().get("CPU", 0.0))

    resolution = bundle.model.resolution
    features = build_fid_features(cfg.fid_features, device="cpu")  # resolves "auto" to the network actually used
    metric = resolve_metric(cfg.metric)
    run = {
        "checkpoint": cfg.checkpoint,
        "checkpoint_identity": bundle.identity,
        "metric": metric,
        # The side the metric judged x and G(E(x)) at (null: the image's own); metric and size say what d(x) is.
        "judge_resolution": cfg.judge_resolution,
        "pair": cfg.pair,
        "features": features.name,
        "features_is_inception": features.is_inception,
        "resolution": resolution,
    }
    _check_run(scores, storage, run)

    shards = ensure_manifest(cfg.data, cfg.out, storage, cfg.manifest_shard_size)
    done = scores.written_shards(storage)
    pending = [s for s in shards if s.shard_id not in done]
    total = sum(s.rows for s in shards)
    todo = sum(s.rows for s in pending)
    log.info("%d images in %d shards; %d shards already scored, %d images to score", total, len(shards), len(done), todo)

    placements: Counter = Counter()
    first_batch_at, rows_after_first = None, 0
    busy_s = busy_after_first_s = 0.0
    started = time.perf_counter()
    duplicates = 0
    if pending:
        scored_config = config.model_copy(update={"score": cfg.model_copy(update={"metric": metric, "fid_features": features.name})})
        ds = build_dataset(pending, storage, scored_config, resolution)
        assembler = ShardAssembler(scores, storage, {s.shard_id: s.rows for s in pending})
        with tqdm(total=todo, desc="scoring", unit=" img", mininterval=2) as bar:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                assembler.add(batch)
                placements.update(batch["scorer"].tolist())
                batch_busy = float(batch["busy_s"].sum())
                busy_s += batch_busy
                bar.update(len(batch["key"]))
                if first_batch_at is None:
                    first_batch_at = time.perf_counter()
                else:
                    rows_after_first += len(batch["key"])
                    busy_after_first_s += batch_busy
        if assembler.incomplete:
            raise RuntimeError(f"scoring stream ended with incomplete shards (shard: rows received) {assembler.incomplete}")
        duplicates = assembler.duplicates
    finished = time.perf_counter()
    elapsed = finished - started
    # Steady state: from the first scored batch on, i.e. without listing, plan and actor start-up.
    steady = rows_after_first / (finished - first_batch_at) if first_batch_at and finished > first_batch_at else None
    # Share of the actors' steady-state time spent waiting for input rather than scoring (an upper bound
    # when the pool ran below score.actors for part of the run).
    idle = (1.0 - busy_after_first_s / (cfg.actors * (finished - first_batch_at))
            if first_batch_at and finished > first_batch_at else None)

    counts = count_status(scores, storage)
    summary = {
        **run,
        "judge": judge_label(metric, cfg.judge_resolution, resolution),  # metric and size, as reports name them
        "data": cfg.data,
        "images": total,
        "scored": counts.get("ok", 0),
        "failed": sum(v for k, v in counts.items() if k != "ok"),
        "scored_this_run": todo,
        "duplicate_rows_dropped": duplicates,  # rows delivered twice (e.g. a restarted actor), stored once
        "seconds_this_run": round(elapsed, 3),
        "images_per_s": round(todo / elapsed, 2) if todo and elapsed > 0 else None,
        "images_per_s_steady": round(steady, 2) if steady else None,
        "shards": len(shards),
        "shards_resumed": len(done),
        "actors": cfg.actors,
        "gpus_per_actor": cfg.gpus_per_actor,
        "batch_size": cfg.batch_size,
        "scorers": [{**json.loads(p), "rows": n} for p, n in sorted(placements.items())],
        "actor_busy_s": round(busy_s, 3),
        "actor_idle_share_steady": round(max(idle, 0.0), 4) if idle is not None else None,
        "scores": scores.shards,
    }
    assert summary["scored"] + summary["failed"] == total, (counts, total)
    scores.write_summary(summary, storage)
    rate = f"{summary['images_per_s']} images/s" if summary["images_per_s"] else "nothing left to score"
    log.info("scored %d images, %d failed (%s); summary in %s", summary["scored"], summary["failed"], rate,
             scores.summary)
    return summary
