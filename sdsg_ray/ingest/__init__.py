"""`sdsg ingest`: URL lists -> img2dataset-layout shards (see :mod:`sdsg_ray.ingest.run`)."""

from sdsg_ray.ingest.run import run_ingest

__all__ = ["run_ingest"]
