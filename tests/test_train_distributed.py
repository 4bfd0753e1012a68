"""Ray Train on the session's multi-node cluster: DDP replicas, failure recovery, re-submission, S3.

Two runs of a tiny joint model (2 CPU workers, global batch 4, checkpoint every 2 steps), both reading
the synthetic dataset from S3 and writing their run under S3:
  * ``reference``: 3 uninterrupted steps, then re-submitted (same --out) for a 4th;
  * ``recovered``: 4 steps; the test SIGKILLs one training worker's process as soon as the step-2
    checkpoint reaches storage (a real fault, injected from outside: no hook in the training code), Ray
    restarts the group from its latest registered checkpoint and recomputes the steps after it.
Step 3 of ``recovered`` (after a restart) must equal step 3 of ``reference`` (never interrupted).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest
from conftest import cluster_worker_pids

from sdsg_ray.config import load_config
from sdsg_ray.storage import get_storage, join

pytestmark = pytest.mark.slow

STEPS, BATCH = 4, 4


def _config(data: str, out: str, steps: int = STEPS, **extra):
    kimg = steps * BATCH / 1000
    return load_config(None, {
        "model.resolution": 16, "model.channel_max": 32, "model.z_dim": 32, "model.w_dim": 32,
        "train.stage": "joint", "train.metric": "stlpips-alex", "train.data": data, "train.out": out,
        "train.workers": 2, "train.cpus_per_worker": 1, "train.threads_per_worker": 1,
        "train.batch_size": BATCH, "train.kimg": kimg, "train.checkpoint_every_kimg": 2 * BATCH / 1000,
        "train.log_every": 1, "train.max_failures": 1, "train.pl_interval": 2, "train.r1_interval": 2,
        **extra,
    })


def _metrics(out: str) -> dict[int, dict]:
    lines = get_storage().read_text(join(out, "metrics.jsonl")).splitlines()
    rows = [json.loads(line) for line in lines if line.strip()]
    steps = [row["step"] for row in rows]
    assert steps == sorted(set(steps)), f"metrics.jsonl steps repeated or out of order: {steps}"
    return {row["step"]: row for row in rows}


@pytest.fixture(scope="module")
def s3_data(ray_cluster, s3_endpoint):
    """A bucket for the module (``s3_bucket`` is per test) holding a small synthetic dataset."""
    import boto3

    from sdsg_ray.dataset.synthetic import make_dataset

    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="train-distributed")
    bucket = "s3://train-distributed"
    make_dataset(join(bucket, "raw"), n=24, resolution=16, outlier_fraction=0.1, seed=0, storage=get_storage())
    return bucket, join(bucket, "raw", "images")


def _run_killing_a_worker_after_checkpoint(config, checkpoint_name: str) -> tuple[dict, int]:
    """run_training(config) while a watcher SIGKILLs one worker process once ``checkpoint_name`` exists
    under the run; returns (summary, the step the run had checkpointed when the kill landed)."""
    from sdsg_ray.distributed.train import RUN_NAME, run_training

    storage = get_storage()
    run_dir = join(config.train.out, RUN_NAME)
    killed: list[int] = []
    problems: list[BaseException] = []
    done = threading.Event()

    def watch() -> None:
        pids: list[int] = []
        deadline = time.monotonic() + 600
        try:
            while not done.is_set() and time.monotonic() < deadline:
                if len(pids) < 2:  # learnt before the checkpoint, so the kill is not delayed by it
                    pids = cluster_worker_pids("RayTrainWorker")  # in this session's cluster only
                if pids and any(checkpoint_name in uri for uri in storage.list(run_dir)):
                    os.kill(pids[-1], signal.SIGKILL)
                    checkpoints = {u.split("/")[-2] for u in storage.list(run_dir) if "/checkpoint-" in u}
                    killed.append(max(int(c.rsplit("-", 1)[1]) for c in checkpoints))
                    return
                time.sleep(0.05)
        except BaseException as err:  # reported by the test instead of dying silently with the thread
            problems.append(err)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        summary = run_training(config)
    finally:
        done.set()
        watcher.join(timeout=30)
    assert not problems, problems
    assert killed, f"the run finished before {checkpoint_name} was seen: no failure was injected"
    return summary, killed[0]


@pytest.fixture(scope="module")
def runs(s3_data):
    from sdsg_ray.distributed.train import run_training

    bucket, data = s3_data
    reference_out, recovered_out = join(bucket, "reference"), join(bucket, "recovered")
    sigint_before = signal.getsignal(signal.SIGINT)
    first_leg = run_training(_config(data, reference_out, steps=STEPS - 1))
    sigint_after = signal.getsignal(signal.SIGINT)
    reference = run_training(_config(data, reference_out))  # re-submitted: resumes at step 3
    recovered, killed_after = _run_killing_a_worker_after_checkpoint(
        _config(data, recovered_out), "checkpoint-000000002")
    return {"reference": (reference, reference_out), "recovered": (recovered, recovered_out),
            "first_leg": first_leg, "killed_after": killed_after, "sigint": (sigint_before, sigint_after)}


def test_ctrl_c_is_the_callers_again_after_training(runs):
    """Ray Train's fit() installs its own SIGINT handler and leaves it installed; the demo trains in the
    process that then serves the sampler, where Ctrl-C must stop the server, not "abort" a finished run."""
    before, after = runs["sigint"]
    assert after is before, (before, after)


def test_ddp_replicas_hold_identical_parameters(runs):
    _, out = runs["recovered"]
    metrics = _metrics(out)
    for step in range(1, STEPS + 1):
        checksums = metrics[step]["replica_checksums"]
        assert len(checksums) == 2 and checksums[0] == checksums[1], (step, checksums)
    assert metrics[1]["replica_checksums"] != metrics[STEPS]["replica_checksums"]  # and they do train


def test_a_run_writes_its_outputs_under_s3(runs):
    from sdsg_ray.artifacts.checkpoint import load_inference

    summary, out = runs["recovered"]
    storage = get_storage()
    assert summary["step"] == STEPS and summary["inference"] == join(out, "inference.pt")
    assert len(list(storage.list(join(out, "samples"), (".png",)))) == 2  # one grid per checkpoint
    assert len(list(storage.list(join(out, "recon"), (".png",)))) == 2
    assert summary["checkpoint"].endswith("checkpoint-000000004")
    bundle = load_inference(out)
    assert bundle.E is not None and bundle.meta["step"] == STEPS


def test_a_worker_failure_resumes_from_the_checkpoint_with_the_same_losses(runs):
    (_, reference_out), (recovered, recovered_out) = runs["reference"], runs["recovered"]
    assert runs["killed_after"] < STEPS  # the kill landed mid-run, before the last checkpoint
    assert recovered["step"] == STEPS
    reference, resumed = _metrics(reference_out), _metrics(recovered_out)
    assert sorted(resumed) == list(range(STEPS + 1))  # each step once: the replayed step 3 replaced
    for step in (3, 4):  # 3: restarted vs never interrupted; 4: both resumed (re-submission vs failure)
        for key in ("loss/G_adv", "loss/D_real", "loss/D_fake", "loss/rec_lpips", "loss/E_w", "loss/rec_l1"):
            assert resumed[step][key] == reference[step][key], (step, key)


def test_resubmitting_the_same_out_continues_the_run(runs):
    first_leg, (reference, out) = runs["first_leg"], runs["reference"]
    assert first_leg["step"] == STEPS - 1 and reference["step"] == STEPS
    metrics = _metrics(out)
    assert sorted(metrics) == list(range(STEPS + 1))  # step 4 appended; no restart from 0
    assert metrics[STEPS]["kimg"] == pytest.approx(STEPS * BATCH / 1000)
    assert reference["checkpoint"].endswith("checkpoint-000000004")
