"""Self-filtering on the multi-node test cluster: Ray Data scoring with data in and results out through
the S3 test server, corrupt images recorded per row, actors scheduled on the GPU nodes, exactly-once
resume after a hard crash, and (with a briefly trained stage-1 model) planted-outlier detection.

Random-weight checkpoints are used where only plumbing is tested (placement, corrupt rows, resume);
the outlier-detection test trains stage 1 for real."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
from PIL import Image

from sdsg_ray.artifacts.checkpoint import export_inference
from sdsg_ray.config import ModelConfig, load_config
from sdsg_ray.filtering.score import footer_actors, run_scoring
from sdsg_ray.artifacts.scores import SCORE_COLUMN, SCORE_COLUMNS, ScoreSet
from sdsg_ray.filtering.select import run_selection
from sdsg_ray.models.networks import build_networks
from sdsg_ray.storage import get_storage, join

from conftest import REPO, create_bucket

N_GOOD = 30
AUROC_IMAGES = 200
# Tiny stage 1 (32 px, the default small model) for about a minute of CPU: enough for G(E(x)) to learn the
# inlier modes, not the rare outliers.
AUROC_TRAIN = {
    "train.kimg": 1.6, "train.batch_size": 8, "train.workers": 1, "train.cpus_per_worker": 2,
    "train.checkpoint_every_kimg": 1.6, "train.log_every": 50, "train.metric": "stlpips-alex", "train.seed": 0,
}
CORRUPT = {
    "bad-truncated.png": None,  # filled below: a real PNG cut in half
    "bad-html.jpg": b"<html><body>404 Not Found</body></html>",
    "bad-empty.png": b"",
}


def _png(rng: np.random.Generator, size: int = 40) -> bytes:
    """A smooth random image (a colour gradient plus a blob), saved as PNG at a non-model size."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = rng.uniform(0, 255, 3)
    slope = rng.uniform(-120, 120, (2, 3))
    img = base + xx[..., None] * slope[0] + yy[..., None] * slope[1]
    cy, cx = rng.uniform(0.2, 0.8, 2)
    img[(yy - cy) ** 2 + (xx - cx) ** 2 < 0.03] = rng.uniform(0, 255, 3)
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def footer_readers_started() -> int:
    """read_parquet's FooterReader actors ever created on the cluster, dead or alive (from the GCS actor
    table: the public ray.util.state API needs the dashboard, which the test cluster does not run)."""
    from ray._private.state import actors

    return sum(a.get("ActorClassName") == "FooterReader" for a in actors().values())


def score_config(**score):
    return load_config(None, {f"score.{k}": v for k, v in score.items()})


def read_scores(out: str) -> dict[str, dict]:
    """key -> row of every score shard under out; asserts each key appears once."""
    rows: dict[str, dict] = {}
    cols = list(SCORE_COLUMNS)
    for batch in ScoreSet(out).iter_batches(get_storage(), cols):
        for i, key in enumerate(batch["key"]):
            assert key not in rows, f"{key} scored twice"
            rows[key] = {c: batch[c][i] for c in cols}
    return rows


@pytest.fixture(scope="module")
def module_bucket(s3_endpoint) -> str:
    """Like conftest's s3_bucket, but shared by this module's tests (the scoring runs build on each other)."""
    return create_bucket(s3_endpoint, "test-scoring")


@pytest.fixture(scope="module")
def corpus(module_bucket):
    """30 images + 3 corrupt files in S3, and a random-weight stage-1 bundle next to them."""
    s3_bucket = module_bucket
    storage = get_storage()
    rng = np.random.default_rng(0)
    prefix = join(s3_bucket, "raw")
    for i in range(N_GOOD):
        storage.write_bytes(join(prefix, f"img-{i:03d}.png"), _png(rng))
    CORRUPT["bad-truncated.png"] = _png(rng)[:150]
    for name, data in CORRUPT.items():
        storage.write_bytes(join(prefix, name), data)
    storage.write_bytes(join(prefix, "notes.txt"), b"not an image suffix: never listed")

    import torch

    torch.manual_seed(0)
    model = ModelConfig()
    G, _, E = build_networks(model)
    checkpoint = join(s3_bucket, "stage1", "inference.pt")
    export_inference(G, E, model, {"stage": "random-weights-for-plumbing-tests"}, checkpoint, storage)
    return {"bucket": s3_bucket, "data": prefix, "checkpoint": checkpoint}


@pytest.fixture(scope="module")
def reference(ray_cluster, corpus):
    """One uninterrupted run: 2 actors with half a (logical) GPU each, out to S3."""
    out = join(corpus["bucket"], "scores-reference")
    footer_readers_before = footer_readers_started()
    summary = run_scoring(
        score_config(
            data=corpus["data"], checkpoint=corpus["checkpoint"], out=out, batch_size=8, actors=2,
            gpus_per_actor=0.5, manifest_shard_size=10,
        )
    )
    footer_readers = footer_readers_started() - footer_readers_before
    return {"out": out, "summary": summary, "rows": read_scores(out), "footer_readers": footer_readers}


def test_scoring_on_gpu_nodes_records_corrupt_images(ray_cluster, corpus, reference) -> None:
    summary, rows = reference["summary"], reference["rows"]
    assert summary["images"] == N_GOOD + len(CORRUPT) == len(rows)
    assert summary["scored"] == N_GOOD and summary["failed"] == len(CORRUPT)
    assert summary["shards"] == 4 and summary["metric"] and summary["features"]
    # Scores stream to the driver batch by batch; when the read packed every key into one block (Ray
    # Data's 1 MiB minimum), decoding ran as one task and all rows arrived at once: no steady state.
    assert summary["images_per_s_steady"], summary
    assert summary["actor_busy_s"] > 0 and 0 <= summary["actor_idle_share_steady"] <= 1, summary
    for name in CORRUPT:
        row = rows[join(corpus["data"], name)]
        assert row["status"] == "error" and row["error"], name
        assert np.isnan(row[SCORE_COLUMN]) and row["feat_real"] is None
    good = [r for r in rows.values() if r["status"] == "ok"]
    assert all(np.isfinite(r[SCORE_COLUMN]) and r[SCORE_COLUMN] > 0 and r["error"] is None for r in good)
    assert len({r["feat_real"].shape for r in good}) == 1
    # read_parquet's footer-reader pool is sized to the 4 manifest shards (Ray's default: 32 processes).
    assert 0 < reference["footer_readers"] <= footer_actors(summary["shards"]), reference["footer_readers"]
    # The actors asked for num_gpus=0.5: Ray placed them on the worker nodes that advertise GPUs.
    gpu_nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU", 0) > 0}
    assert summary["scorers"] and sum(s["rows"] for s in summary["scorers"]) == len(rows)
    for scorer in summary["scorers"]:
        assert scorer["node_id"] in gpu_nodes and scorer["gpu_ids"], scorer
        assert scorer["device"] == ("cuda" if __import__("torch").cuda.is_available() else "cpu")


def test_rerun_after_crash_is_exactly_once(ray_cluster, corpus, reference, tmp_path) -> None:
    """A driver killed (SIGKILL) right after its first score shard is durable; the re-run scores only the
    rest, every key ends up once, and the scores equal the uninterrupted run's."""
    out = join(corpus["bucket"], "scores-crashed")
    settings = {
        "score.data": corpus["data"], "score.checkpoint": corpus["checkpoint"], "score.out": out,
        "score.batch_size": 4, "score.manifest_shard_size": 6,
    }
    crash_after_first_shard = textwrap.dedent(
        """
        import json, os, signal, sys
        from sdsg_ray.config import load_config
        from sdsg_ray.artifacts import scores as writer
        from sdsg_ray.filtering import score

        write = writer.ShardAssembler._write
        def write_then_die(self, shard_id):
            write(self, shard_id)
            os.kill(os.getpid(), signal.SIGKILL)  # a hard crash right after one shard is durable
        writer.ShardAssembler._write = write_then_die
        score.run_scoring(load_config(None, json.loads(sys.argv[1])))
        """
    )
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.address}
    log = tmp_path / "crashed-run.log"
    with open(log, "w") as out_file:  # a file, not a pipe: Ray helpers of the killed driver may hold pipes open
        proc = subprocess.Popen(
            [sys.executable, "-c", crash_after_first_shard, json.dumps(settings)],
            env=env, cwd=REPO, stdout=out_file, stderr=subprocess.STDOUT,
        )
        try:
            returncode = proc.wait(timeout=300)
        finally:
            proc.kill()
    assert returncode == -9, log.read_text()[-3000:]
    storage = get_storage()
    written = [i for i in range(6) if storage.exists(ScoreSet(out).shard(i))]
    assert len(written) == 1, written  # interrupted part-way: one complete shard, the rest never started
    assert not storage.exists(join(out, "summary.json"))

    summary = run_scoring(load_config(None, settings))
    # Shards complete in any order (decoding runs ahead in parallel); the last of the 6 holds 3 keys.
    total = N_GOOD + len(CORRUPT)
    durable_rows = min(6, total - 6 * written[0])
    assert summary["shards_resumed"] == 1 and summary["scored_this_run"] == total - durable_rows
    rows, expected = read_scores(out), reference["rows"]
    assert rows.keys() == expected.keys()
    for key, row in rows.items():
        ref = expected[key]
        assert row["status"] == ref["status"], key
        if row["status"] == "ok":
            np.testing.assert_allclose(row[SCORE_COLUMN], ref[SCORE_COLUMN], rtol=1e-4, atol=1e-6)
            np.testing.assert_allclose(row["d_l1"], ref["d_l1"], rtol=1e-4, atol=1e-6)
            np.testing.assert_allclose(row["feat_real"], ref["feat_real"], rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(row["feat_recon"], ref["feat_recon"], rtol=1e-4, atol=1e-5)
    # A third run finds everything done and scores nothing.
    again = run_scoring(load_config(None, settings))
    assert again["scored_this_run"] == 0 and again["shards_resumed"] == 6


def test_actor_pool_that_would_starve_decoding_is_refused(ray_cluster, corpus, tmp_path) -> None:
    """Actors holding every CPU leave none for the read/decode tasks and Ray Data would wait forever; the
    run is refused up front with the numbers and the fix, before anything is written."""
    cpus = ray.cluster_resources()["CPU"]
    out = str(tmp_path / "scores")
    starving = score_config(
        data=corpus["data"], checkpoint=corpus["checkpoint"], out=out, actors=2, cpus_per_actor=cpus / 2
    )
    with pytest.raises(ValueError, match=r"--cpus-per-actor .*e\.g\. " + f"{(cpus - 1) / 2:g}"):
        run_scoring(starving)
    assert not os.path.exists(out)


def test_select_from_s3_scores(ray_cluster, corpus, reference) -> None:
    """score -> select with both ends in S3: kept.parquet is a manifest of the kept keys."""
    out = join(corpus["bucket"], "selection")
    config = load_config(
        None,
        {"select.scores": reference["out"], "select.out": out, "select.min_size": 20, "select.threshold_step": 0.05},
    )
    report = run_selection(config)
    storage = get_storage()
    fs, path = storage.arrow_filesystem(join(out, "kept.parquet"))
    kept = pq.read_table(path, filesystem=fs).column("key").to_pylist()
    ok = {k: r[SCORE_COLUMN] for k, r in reference["rows"].items() if r["status"] == "ok"}
    assert len(kept) == report["size_kept"] >= 20 and set(kept) <= ok.keys()
    assert sorted(kept) == sorted(k for k, d in ok.items() if d <= report["theta"])
    assert report["size_raw"] == N_GOOD and report["failed"] == len(CORRUPT)
    assert report["bound"] in ("target", "diversity", "size")
    for name in ("histogram.png", "fid_vs_threshold.png", "best_worst.png"):
        assert storage.read_bytes(join(out, name))[:4] == b"\x89PNG", name


@pytest.mark.slow
def test_planted_outliers_score_high_after_stage1_training(ray_cluster, tmp_path) -> None:
    """A short stage-1 run on the Internet-like dataset; d(x) = LPIPS(x, G(E(x))) ranks the planted
    outliers above the inliers significantly better than chance.

    The bar is statistical, not tuned: AUROC must exceed 0.5 by two standard errors of the AUROC of a
    random score (Mann-Whitney null). It fails when scores are attached to the wrong keys or d(x) stops
    measuring reconstruction error. It does not show that training improved the ranking: on this set
    the untrained initialisation (same seed) already gives 0.64 and 1.6 kimg give 0.60-0.62, because at
    this length d(x) mostly measures how much detail an image has (docs/benchmarks.md). The issue's
    target of >= 0.85 needs a far longer stage 1; the demo reports its AUROC per outlier kind.
    """
    from sklearn.metrics import roc_auc_score

    from sdsg_ray.artifacts.dataset import read_labels
    from sdsg_ray.dataset.synthetic import make_dataset
    from sdsg_ray.distributed.train import run_training

    storage = get_storage()
    dataset = str(tmp_path / "dataset")
    make_dataset(dataset, n=AUROC_IMAGES, resolution=32, outlier_fraction=0.2, seed=0, storage=storage)
    stage1 = str(tmp_path / "stage1")
    run_training(load_config(None, {**AUROC_TRAIN, "train.data": join(dataset, "images"), "train.out": stage1}))

    out = str(tmp_path / "scores")
    run_scoring(score_config(data=join(dataset, "images"), checkpoint=stage1, out=out, batch_size=64, manifest_shard_size=128))
    scores = read_scores(out)
    labels = read_labels(dataset, storage)
    assert {r["key"] for r in labels} == scores.keys()
    y = np.array([r["is_outlier"] for r in labels])
    d = np.array([scores[r["key"]][SCORE_COLUMN] for r in labels])
    auroc = roc_auc_score(y, d)
    print(f"AUROC of d(x) for {y.sum()} planted outliers among {len(y)} images: {auroc:.3f}")
    n_out, n_in = int(y.sum()), int(len(y) - y.sum())
    null_std = np.sqrt((n_out + n_in + 1) / (12 * n_out * n_in))
    assert auroc > 0.5 + 2 * null_std, f"AUROC {auroc:.3f} is within two null standard errors of chance"


def test_the_score_writer_stores_a_row_once_even_when_it_arrives_late(tmp_path) -> None:
    """A retried task can deliver a row again, before or after its shard was written: the shard holds the
    row once, the late copy is dropped (never a KeyError) and both copies are counted; a row of a shard
    the run is not scoring is refused with a message naming it."""
    from sdsg_ray.artifacts.scores import ShardAssembler

    def batch(shard: int, keys: list[str], d: float) -> dict[str, np.ndarray]:
        n = len(keys)
        feats = np.empty(n, dtype=object)
        feats[:] = [np.full(2, d, np.float32) for _ in range(n)]
        return {"shard": np.full(n, shard), "key": np.array(keys, dtype=object),
                "status": np.array(["ok"] * n, dtype=object), "error": np.array([""] * n, dtype=object),
                SCORE_COLUMN: np.full(n, d, np.float32), "d_l1": np.full(n, d, np.float32),
                "feat_real": feats, "feat_recon": feats}

    storage = get_storage()
    out = str(tmp_path / "scores")
    assembler = ShardAssembler(ScoreSet(out), storage, {0: 2, 1: 2})
    assert assembler.add(batch(0, ["a"], 0.1)) == []
    assert assembler.add(batch(0, ["a"], 0.1)) == [] and assembler.duplicates == 1  # early copy: pending
    assert assembler.add(batch(0, ["b"], 0.2)) == [0]  # shard 0 complete: written
    assert assembler.add(batch(0, ["a", "b"], 0.1)) == [] and assembler.duplicates == 3  # late copies: dropped
    assert assembler.add(batch(1, ["c", "d"], 0.3)) == [1] and assembler.incomplete == {}
    keys = [k for b in ScoreSet(out).iter_batches(storage, ["key"]) for k in b["key"].tolist()]
    assert sorted(keys) == ["a", "b", "c", "d"]
    with pytest.raises(ValueError, match="shard 7"):
        assembler.add(batch(7, ["e"], 0.4))
