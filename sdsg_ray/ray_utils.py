"""Connecting to Ray the same way from the CLI, from ``ray job submit`` and from tests."""

from __future__ import annotations

import logging
import os

import ray

from sdsg_ray.config import StorageConfig

log = logging.getLogger(__name__)

# Variables the workers need to reach the same object store and pretrained weights as the driver.
# Never credentials: a runtime_env is recorded in Ray's logs, its job table and the dashboard, so keys
# forwarded through it would be written down in plain text. Workers take credentials from their own
# environment (inherited from the node that started them), a profile or an instance role.
_FORWARDED_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_DEFAULT_REGION",
    "AWS_PROFILE",
    "TORCH_HOME",
    "SDSG_INCEPTION_PATH",
)


def worker_env(storage: StorageConfig | None = None) -> dict[str, str]:
    """Environment for Ray workers: storage endpoint and region, pretrained-weight locations (no secrets)."""
    env = {k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ}
    if storage is not None and storage.endpoint_url:
        env["AWS_ENDPOINT_URL"] = storage.endpoint_url
    if storage is not None and storage.region:
        env["AWS_DEFAULT_REGION"] = storage.region
    return env


def ensure_ray(storage: StorageConfig | None = None, num_cpus: int | None = None) -> None:
    """Join the cluster in $RAY_ADDRESS (as under ``ray job submit``) or start a local one.

    Does nothing if Ray is already initialised (tests and the demo start it themselves).
    """
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    env = worker_env(storage)
    kwargs: dict = {"runtime_env": {"env_vars": env}} if env else {}
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, **kwargs)
    log.info("Ray resources: %s", ray.cluster_resources())
