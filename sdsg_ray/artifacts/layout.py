"""Where every artifact of one pipeline run lives, from its root alone, and the config's paths it fills in.

A stage's input and output paths are config fields (``train.out``, ``score.checkpoint`` ...) so that a flag
can point a stage anywhere; left unset, each is a member of ``RunLayout(pipeline.root)``. :data:`PATH_DEFAULTS`
is the one table of those defaults, so the standalone commands chain exactly as the pipeline does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from sdsg_ray.artifacts.base import Artifact, Member
from sdsg_ray.artifacts.clusters import ClusterFile
from sdsg_ray.artifacts.dataset import SyntheticDataset
from sdsg_ray.artifacts.evaluation import EvaluationResults
from sdsg_ray.artifacts.json_file import read_json_or_none
from sdsg_ray.artifacts.checkpoint import ModelDir
from sdsg_ray.artifacts.report import Report
from sdsg_ray.artifacts.scores import ScoreSet
from sdsg_ray.artifacts.selection import FilteredSet
from sdsg_ray.config import SDSGConfig
from sdsg_ray.storage import Storage, join


@dataclass(frozen=True)
class RunLayout(Artifact):
    """The handles of a run under its root (``uri``): the stages meet only through these."""

    dataset = Member("data", "the synthetic dataset, when the pipeline makes it", SyntheticDataset)
    stage1 = Member("stage1", "stage 1: G, D and E trained jointly on X", ModelDir)
    scores = Member("scores", "d(x) for every image of X", ScoreSet)
    selection = Member("selection", "the filtered set Y", FilteredSet)
    random_subset = Member("baselines/random-subset.parquet", "|Y| images of X drawn uniformly (Table 3's control)")
    stage2 = Member("stage2", "stage 2: G alone, from scratch, on Y", ModelDir)
    stage2_random = Member("stage2-random", "the same on the random subset", ModelDir)
    stage2_raw = Member("stage2-raw", "the same on all of X", ModelDir)
    clusters = Member("clusters", "stage 2's multi-modal truncation centers", ClusterFile)
    evaluation = Member("eval", "FD/KID tables and the paper's figures", EvaluationResults)
    report = Member("report", "the HTML report", Report)
    summary = Member("pipeline.json", "every stage's status and seconds, and this layout")
    config_file = Member("config.yaml", "the config the pipeline ran with")
    stages = Member("_stages", "one marker per finished stage")

    def stage_marker(self, stage: str) -> str:
        return join(self.stages, f"{stage}.json")

    def read_summary_or_none(self, storage: Storage) -> dict[str, Any] | None:
        return read_json_or_none(self.summary, storage)


# config field -> the member of RunLayout(pipeline.root) it defaults to (only while no config layer set it).
PATH_DEFAULTS: dict[str, Callable[[RunLayout], str]] = {
    "dataset.out": lambda run: run.dataset.uri,
    "train.data": lambda run: run.dataset.images,
    "train.out": lambda run: run.stage1.uri,
    "score.data": lambda run: run.dataset.images,
    "score.checkpoint": lambda run: run.stage1.uri,
    "score.out": lambda run: run.scores.uri,
    "select.scores": lambda run: run.scores.uri,
    "select.out": lambda run: run.selection.uri,
    "cluster.checkpoint": lambda run: run.stage2.uri,
    "cluster.out": lambda run: run.clusters.uri,
    "serve.checkpoint": lambda run: run.stage2.uri,
    "serve.clusters": lambda run: run.clusters.uri,
    "evaluate.out": lambda run: run.evaluation.uri,
    "evaluate.data": lambda run: run.dataset.images,
    "evaluate.checkpoint": lambda run: run.stage2.uri,
    "evaluate.clusters": lambda run: run.clusters.uri,
    "export.checkpoint": lambda run: run.stage2.uri,
    "generate.checkpoint": lambda run: run.stage2.uri,
}


def with_layout_defaults(config: SDSGConfig) -> SDSGConfig:
    """``config`` with every path field no layer set taken from ``RunLayout(pipeline.root)`` (marked as derived
    in ``--print-config``); a path set explicitly, even to the derived value, stays the user's."""
    run = RunLayout(config.pipeline.root.rstrip("/"))
    return config.derive({field: uri(run) for field, uri in PATH_DEFAULTS.items() if not config.is_set(field)})
