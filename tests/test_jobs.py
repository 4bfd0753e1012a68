"""The pipeline as a cluster job: stage URIs derived from one root, finished stages skipped, a failed run
continued, and a real tiny pipeline submitted through the Ray Jobs API to a real head node."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from sdsg_ray.config import load_config
from sdsg_ray.artifacts.dataset import SyntheticDataset
from sdsg_ray.pipeline import Stage, plan, run_pipeline, run_stages
from sdsg_ray.storage import get_storage, join

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from conftest import free_port, wait_for_port  # noqa: E402

CALLS: list[str] = []


def toy_stage(config) -> None:
    """A stage that writes its output file, or fails when the config says so (pipeline.root names it)."""
    out = config.evaluate.out
    CALLS.append(out)
    if out.endswith("fail"):
        raise RuntimeError("boom")
    get_storage().write_text(join(out, "done.txt"), "ok")


def toy_stages(root: str, failing: str | None = None) -> list[Stage]:
    stages = []
    for name in ("a", "b", "c"):
        out = join(root, name + ("-fail" if name == failing else ""))
        config = load_config(None, {"evaluate.out": out})
        stages.append(Stage(name, toy_stage, config, (join(out, "done.txt"),), "evaluate"))
    return stages


def test_stage_uris_derive_from_the_root_unless_set(tmp_path):
    config = load_config(None, {"pipeline.root": "s3://bucket/run", "train.data": "s3://bucket/raw/",
                                "score.out": "s3://other/scores"})
    stages = {s.name: s for s in plan(config)}
    assert list(stages) == ["stage1", "score", "select", "stage2", "random_subset", "stage2_random", "stage2_raw",
                            "cluster", "evaluate"]
    assert stages["stage1"].config.train.stage == "joint"
    assert stages["stage1"].config.train.out == "s3://bucket/run/stage1"
    assert stages["score"].config.score.out == "s3://other/scores"  # explicit: kept
    assert stages["score"].config.score.checkpoint == "s3://bucket/run/stage1"
    assert stages["select"].config.select.scores == "s3://other/scores"
    stage2 = stages["stage2"].config.train
    assert (stage2.stage, stage2.data) == ("generator", "s3://bucket/run/selection/kept.parquet")
    assert stages["stage2_raw"].config.train.data == "s3://bucket/raw/"
    assert stages["stage2_random"].config.train.data == "s3://bucket/run/baselines/random-subset.parquet"
    ev = stages["evaluate"].config.evaluate
    assert [m.name for m in ev.models] == ["filtered", "random", "raw"]
    assert ev.clusters == stages["cluster"].config.cluster.out == "s3://bucket/run/clusters"
    assert ev.labels is None  # real data has no planted labels

    tiny = load_config(None, {"pipeline.root": str(tmp_path), "pipeline.baselines": False,
                              "pipeline.make_dataset": True, "pipeline.stage2_kimg": 0.5})
    stages = {s.name: s for s in plan(tiny)}
    assert list(stages) == ["dataset", "stage1", "score", "select", "stage2", "cluster", "evaluate"]
    data = SyntheticDataset(join(str(tmp_path), "data"))
    assert stages["dataset"].config.dataset.out == data.uri and stages["dataset"].outputs == (data.labels,)
    assert (stages["stage1"].config.train.data, stages["evaluate"].config.evaluate.labels) == (data.images, data.labels)
    assert stages["stage2"].config.train.kimg == 0.5


def test_a_failed_pipeline_continues_where_it_stopped(tmp_path):
    storage = get_storage()
    root = str(tmp_path)
    CALLS.clear()
    with pytest.raises(RuntimeError, match="boom"):
        run_stages(toy_stages(root, failing="b"), root, storage)
    assert [Path(c).name for c in CALLS] == ["a", "b-fail"]  # c never ran
    CALLS.clear()
    results = run_stages(toy_stages(root), root, storage)
    assert [(r.name, r.status) for r in results] == [("a", "skipped"), ("b", "ran"), ("c", "ran")]
    assert [Path(c).name for c in CALLS] == ["b", "c"]
    # A stage whose output disappeared runs again even though its marker exists.
    storage.delete(join(root, "c", "done.txt"))
    CALLS.clear()
    results = run_stages(toy_stages(root), root, storage)
    assert [r.status for r in results] == ["skipped", "skipped", "ran"] and len(CALLS) == 1


TINY = {
    "model": {"resolution": 16, "z_dim": 16, "w_dim": 16, "mapping_layers": 1, "channel_base": 256,
              "channel_max": 16},
    "dataset": {"n": 48, "resolution": 16, "outlier_fraction": 0.25},
    "train": {"batch_size": 8, "kimg": 0.032, "checkpoint_every_kimg": 0.032, "log_every": 2,
              "cpus_per_worker": 1, "metric": "stlpips-alex"},
    "score": {"batch_size": 16, "actors": 1, "manifest_shard_size": 32, "metric": "stlpips-alex"},
    "select": {"min_size": 16, "target_threshold": 0.05, "threshold_step": 0.1},
    "cluster": {"n_latents": 64, "clusters": 4, "metric": "stlpips-alex", "classifier_steps": 50},
    "evaluate": {"num_samples": 24, "psis": [0.5, 1.0], "grid_seeds": 4, "batch_size": 24},
    "pipeline": {"baselines": False, "make_dataset": True, "stage2_kimg": 0.032},
}


def start_head(log_path: Path, temp_dir: str, extra_env: dict[str, str]) -> tuple[subprocess.Popen, int]:
    """`ray start --head --block` with every port explicit: the defaults of the client server (10001) and
    the dashboard agent (52365) are fixed numbers another Ray on the machine may hold, and with --block
    one failed process stops them all. Returns (process, dashboard port) once the runtime is up."""
    gcs_port, dashboard_port, client_port, agent_port = free_port(), free_port(), free_port(), free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", **extra_env}
    env.pop("RAY_ADDRESS", None)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            ["ray", "start", "--head", "--block", f"--port={gcs_port}", "--num-cpus=2", "--num-gpus=0",
             "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
             f"--ray-client-server-port={client_port}", f"--dashboard-agent-listen-port={agent_port}",
             f"--temp-dir={temp_dir}", "--disable-usage-stats"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        if "Ray runtime started" in log_path.read_text():
            wait_for_port(dashboard_port, timeout_s=60)
            return proc, dashboard_port
        time.sleep(1)
    stop_head(proc)
    raise RuntimeError(f"ray start failed:\n{log_path.read_text()[-3000:]}")


def stop_head(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: only this head's processes
        proc.wait(timeout=10)


# Credentials only this test's Ray head knows (moto accepts any): they must never be written anywhere.
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "AKIASDSGJOBTEST" + uuid.uuid4().hex[:8].upper(),
               "AWS_SECRET_ACCESS_KEY": "sdsg-secret-" + uuid.uuid4().hex}


@pytest.fixture
def ray_head(tmp_path, s3_endpoint):
    """A real head node in its own process tree, stopped by terminating that tree.

    Never `ray stop`: it would also stop the session cluster and anyone else's. Its own --temp-dir keeps
    `ray start` from recording it as the machine's "current cluster", which a plain `ray.init()` elsewhere
    would join (and, once it is gone, fail to reach). The directory is short: Ray's socket paths must fit.
    Ray gives a starting node a fixed 30 s to register; on a loaded machine that can fail, so one retry.
    """
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")
    try:
        try:
            proc, dashboard_port = start_head(tmp_path / "ray-head.log", temp_dir, CREDENTIALS)
        except RuntimeError:
            proc, dashboard_port = start_head(tmp_path / "ray-head-retry.log", temp_dir, CREDENTIALS)
        try:
            yield {"address": f"http://127.0.0.1:{dashboard_port}", "temp_dir": temp_dir}
        finally:
            stop_head(proc)
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)


def wait_for_job(client, job_id: str, timeout_s: float) -> str:
    from ray.job_submission import JobStatus

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = client.get_job_status(job_id)
        if status in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
            return status
        time.sleep(2)
    client.stop_job(job_id)
    return "TIMEOUT"


def files_containing(root: Path, secrets: list[str]) -> list[str]:
    found = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            try:
                data = path.read_bytes()
            except OSError:  # sockets and files a live process holds exclusively
                continue
            found += [f"{path}: {secret[:6]}..." for secret in secrets if secret.encode() in data]
    return found


@pytest.mark.slow
def test_tiny_pipeline_runs_as_a_ray_job_on_s3_and_writes_no_credentials(ray_head, tmp_path, s3_bucket, s3_endpoint):
    """The pipeline submitted through the Ray Jobs API to a real head node, reading and writing S3 (the
    endpoint given in the config). The head runs with credentials of its own in its environment: afterwards
    neither key appears in the job's logs, any file of the head's Ray session, or any object it wrote."""
    import yaml
    from ray.job_submission import JobSubmissionClient

    root = join(s3_bucket, "run")
    config_path = tmp_path / "tiny.yaml"
    config_path.write_text(yaml.safe_dump({**TINY, "pipeline": {**TINY["pipeline"], "root": root},
                                           "storage": {"endpoint_url": s3_endpoint}}))
    client = JobSubmissionClient(ray_head["address"])
    job_id = client.submit_job(
        entrypoint=f"{sys.executable} -m jobs.pipeline --config {config_path}",
        runtime_env={
            "working_dir": str(REPO),
            "excludes": [".git", "runs", "sdsg-demo", "*.pt", "*.parquet", "__pycache__", ".pytest_cache"],
            "env_vars": {"OMP_NUM_THREADS": "1"},
        },
    )
    status = wait_for_job(client, job_id, timeout_s=600)  # ~2 min on an idle 2-core machine
    logs = client.get_job_logs(job_id)
    assert status == "SUCCEEDED", logs[-4000:]

    storage = get_storage()
    summary = json.loads(storage.read_text(join(root, "pipeline.json")))
    assert [s["name"] for s in summary["stages"]] == ["dataset", "stage1", "score", "select", "stage2", "cluster",
                                                      "evaluate"]
    assert all(s["status"] == "ran" for s in summary["stages"])
    for rel in ("data/labels.csv", "stage1/inference.pt", "scores/summary.json", "selection/kept.parquet",
                "stage2/inference.pt", "clusters/clusters.pt", "eval/results.json", "eval/fid_vs_psi.png",
                "eval/truncation_grid.png", "stage1/tensorboard"):
        assert any(True for _ in storage.list(join(root, rel))) or storage.exists(join(root, rel)), rel
    results = json.loads(storage.read_text(join(root, "eval", "results.json")))
    assert [m["model"] for m in results["models"]] == ["filtered"]
    assert set(results["truncation"]) >= {"mean", "multimodal", "multimodal_learned", "psis"}
    assert "outliers" in results

    secrets = list(CREDENTIALS.values())
    assert not [s for s in secrets if s in logs], "a credential is in the job's logs"
    assert files_containing(Path(ray_head["temp_dir"]), secrets) == []  # every log of the head's session
    leaked = [uri for uri in storage.list(root) if any(s.encode() in storage.read_bytes(uri) for s in secrets)]
    assert leaked == []
    assert files_containing(tmp_path, secrets) == []  # the head's own stdout/stderr log

    # Submitting the same pipeline again finds every stage finished (no Ray work at all: in-process).
    again = run_pipeline(load_config(config_path))
    assert all(s["status"] == "skipped" for s in again["stages"])
