"""Where every artifact of one pipeline run lives, from its root alone."""

from __future__ import annotations

from dataclasses import dataclass

from sdsg_ray.artifacts.base import Artifact, Member
from sdsg_ray.artifacts.checkpoint import ModelDir
from sdsg_ray.artifacts.clusters import ClusterFile
from sdsg_ray.artifacts.dataset import SyntheticDataset
from sdsg_ray.artifacts.evaluation import EvaluationResults
from sdsg_ray.artifacts.report import Report
from sdsg_ray.artifacts.scores import ScoreSet
from sdsg_ray.artifacts.selection import FilteredSet
from sdsg_ray.storage import join


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
