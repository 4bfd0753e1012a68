"""Where every artifact of one pipeline run lives, from its root alone."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from sdsg_ray.artifacts.checkpoint import ModelDir
from sdsg_ray.artifacts.clusters import ClusterFile
from sdsg_ray.artifacts.dataset import SyntheticDataset
from sdsg_ray.artifacts.evaluation import EvaluationResults
from sdsg_ray.artifacts.report import Report
from sdsg_ray.artifacts.scores import ScoreSet
from sdsg_ray.artifacts.selection import FilteredSet
from sdsg_ray.storage import join


@dataclass(frozen=True)
class RunLayout:
    """The handles of a run under ``root``: the stages meet only through these."""

    root: str
    STAGES_DIR: ClassVar[str] = "_stages"
    SUMMARY_FILE: ClassVar[str] = "pipeline.json"
    CONFIG_FILE: ClassVar[str] = "config.yaml"
    RANDOM_SUBSET_FILE: ClassVar[str] = "baselines/random-subset.parquet"

    @property
    def dataset(self) -> SyntheticDataset:
        return SyntheticDataset(join(self.root, "data"))

    @property
    def stage1(self) -> ModelDir:
        return ModelDir(join(self.root, "stage1"))

    @property
    def scores(self) -> ScoreSet:
        return ScoreSet(join(self.root, "scores"))

    @property
    def selection(self) -> FilteredSet:
        return FilteredSet(join(self.root, "selection"))

    @property
    def random_subset(self) -> str:
        """|Y| images of X drawn uniformly (a manifest): Table 3's control."""
        return join(self.root, self.RANDOM_SUBSET_FILE)

    @property
    def stage2(self) -> ModelDir:
        return ModelDir(join(self.root, "stage2"))

    @property
    def stage2_random(self) -> ModelDir:
        return ModelDir(join(self.root, "stage2-random"))

    @property
    def stage2_raw(self) -> ModelDir:
        return ModelDir(join(self.root, "stage2-raw"))

    @property
    def clusters(self) -> ClusterFile:
        return ClusterFile(join(self.root, "clusters"))

    @property
    def evaluation(self) -> EvaluationResults:
        return EvaluationResults(join(self.root, "eval"))

    @property
    def report(self) -> Report:
        return Report(join(self.root, "report"))

    @property
    def summary(self) -> str:
        return join(self.root, self.SUMMARY_FILE)

    @property
    def config_file(self) -> str:
        return join(self.root, self.CONFIG_FILE)

    def stage_marker(self, stage: str) -> str:
        return join(self.root, self.STAGES_DIR, f"{stage}.json")
