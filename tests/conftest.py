"""Shared fixtures: a real S3 endpoint on loopback (moto's server, its own process) and one real
multi-node Ray cluster for the whole session (starting clusters dominates test time on 2 cores)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import pytest

# Before anything imports Ray: no token auth for local test clusters, quiet, no usage stats.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# A loaded 2-core machine can take more than Ray's default 30 s to register a node.
os.environ.setdefault("RAY_raylet_start_wait_time_s", "120")
# Fake credentials so boto3 never reaches for real ones; the endpoint is set per fixture.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout_s}s")


def cluster_worker_pids(actor_class: str) -> list[int]:
    """PIDs of the Ray worker processes that run ``actor_class`` (e.g. ``RayTrainWorker``,
    ``ServeReplica:sdsg:SamplerDeployment``) in the Ray cluster this test process started.

    The test cluster (``ray_cluster``, or one a test builds with ``ray.cluster_utils.Cluster``) is started
    by this process, so its raylets are this process's children and every worker is a raylet's child:
    only this process tree is searched, never the machine, so another test run's (or anyone's) Ray
    processes are never found, let alone killed. The state API (``ray.util.state.list_actors``, which
    gives PIDs) needs the dashboard, which test clusters do not start. A worker names itself
    ``ray::<class>`` (``ray::<class>.<method>`` while it runs one)."""
    import psutil

    pids = []
    for proc in psutil.Process().children(recursive=True):
        try:
            title, parent = proc.cmdline(), proc.parent()
            raylet = parent is not None and os.path.basename((parent.cmdline() or [""])[0]) == "raylet"
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue  # ended while we looked
        if raylet and title and title[0].split(".")[0] == f"ray::{actor_class}":
            pids.append(proc.pid)
    return sorted(pids)


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto in server mode as a separate process on 127.0.0.1; yields its endpoint URL."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port)
        endpoint = f"http://127.0.0.1:{port}"
        previous = os.environ.get("AWS_ENDPOINT_URL")
        os.environ["AWS_ENDPOINT_URL"] = endpoint  # so Ray workers started later inherit it
        yield endpoint
        if previous is None:
            os.environ.pop("AWS_ENDPOINT_URL", None)
        else:
            os.environ["AWS_ENDPOINT_URL"] = previous
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def create_bucket(endpoint: str, prefix: str = "test") -> str:
    """A fresh, empty bucket on the endpoint; returns its s3:// URI."""
    import boto3

    name = f"{prefix}-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture
def s3_bucket(s3_endpoint) -> str:
    """A fresh, empty bucket on the test endpoint, per test."""
    return create_bucket(s3_endpoint)


@pytest.fixture(scope="session")
def ray_cluster(s3_endpoint):
    """A head node (2 CPUs) and two worker nodes that each advertise one GPU.

    The GPUs are logical: scheduling with num_gpus is real, the models fall back to CPU without CUDA.
    The S3 endpoint starts first so every Ray worker inherits AWS_ENDPOINT_URL.
    """
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "num_gpus": 0, "include_dashboard": False},
    )
    for _ in range(2):
        cluster.add_node(num_cpus=2, num_gpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@contextmanager
def driver_with_setup_hook(cluster, hook: Callable[[], None]) -> Iterator[None]:
    """Reconnect this driver to ``cluster`` as a job whose every worker process runs ``hook`` first (Ray's
    public ``worker_process_setup_hook``): how a test registers a toy registry entry in the workers too.
    The hook travels by reference (its test module's name), so the workers get tests/ on their path.
    Afterwards the session's plain driver connects again."""
    import ray

    path = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent), os.environ.get("PYTHONPATH")]))
    ray.shutdown()
    ray.init(address=cluster.address, runtime_env={"worker_process_setup_hook": hook, "env_vars": {"PYTHONPATH": path}})
    try:
        yield
    finally:
        ray.shutdown()
        ray.init(address=cluster.address)
