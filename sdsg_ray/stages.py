"""The stages of the method, by name: each a function of the config alone.

The command line, ``jobs/`` and the pipeline all reach a stage through this table, so there is one
callable per stage and no ``"module:function"`` strings. Compositions of stages (``pipeline``, ``demo``)
live in :mod:`sdsg_ray.pipeline` and :mod:`sdsg_ray.demo`.
"""

from __future__ import annotations

from typing import Any, Callable

from serve_app.app import run_serve
from sdsg_ray.config import SDSGConfig
from sdsg_ray.dataset.synthetic import run_make_dataset
from sdsg_ray.distributed.train import run_training
from sdsg_ray.evaluation.evaluate import run_evaluation
from sdsg_ray.export import run_export, run_import
from sdsg_ray.filtering.score import run_scoring
from sdsg_ray.filtering.select import run_selection
from sdsg_ray.ingest import run_ingest
from sdsg_ray.truncation.clusters import run_clustering
from sdsg_ray.truncation.generate import run_generate

Stage = Callable[[SDSGConfig], Any]

STAGES: dict[str, Stage] = {
    "make-dataset": run_make_dataset,
    "train": run_training,
    "score": run_scoring,
    "select": run_selection,
    "ingest": run_ingest,
    "cluster": run_clustering,
    "evaluate": run_evaluation,
    "serve": run_serve,
    "import": run_import,
    "export": run_export,
    "generate": run_generate,
}
