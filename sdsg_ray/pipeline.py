"""The whole method as one resumable job: stage-1 training -> scoring -> selection -> stage-2 training
(+ baselines) -> clustering -> evaluation.

`plan(config)` turns one config into the ordered list of stages, each with its own config: every output is
the member of ``RunLayout(pipeline.root)`` unless a config layer set that path (even to the default's value),
and every input is an earlier stage's output, so the stages only meet through storage. `run_pipeline` runs
that plan and skips every stage that already finished: a stage counts as finished when its marker
(``RunLayout.stage_marker``, written after it returned) and its outputs exist. Re-submitting a failed
pipeline therefore continues it, and an interrupted training run resumes from its own Ray Train checkpoints."""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

from sdsg_ray.artifacts.clusters import ClusterFile
from sdsg_ray.artifacts.dataset import SyntheticDataset
from sdsg_ray.artifacts.evaluation import EvaluationResults
from sdsg_ray.artifacts.json_file import read_json, write_json
from sdsg_ray.artifacts.layout import RunLayout, with_layout_defaults
from sdsg_ray.artifacts.checkpoint import ModelDir
from sdsg_ray.artifacts.scores import ScoreSet
from sdsg_ray.artifacts.selection import FilteredSet
from sdsg_ray.config import EvalModel, SDSGConfig, dump_config
from sdsg_ray.dataset.synthetic import run_make_dataset
from sdsg_ray.distributed.train import run_training
from sdsg_ray.evaluation.evaluate import run_evaluation
from sdsg_ray.filtering.score import run_scoring
from sdsg_ray.filtering.select import run_selection
from sdsg_ray.manifest import read_manifest, write_manifest
from sdsg_ray.storage import Storage, get_storage
from sdsg_ray.truncation.clusters import run_clustering

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stage:
    """One step of the pipeline: what to call, with which config, and what it leaves in storage."""

    name: str
    run: Callable[[SDSGConfig], Any]  # called with the stage's own config
    config: SDSGConfig
    outputs: tuple[str, ...]  # URIs that exist once the stage has finished
    section: str  # the config section this stage reads (recorded in its marker)

    def call(self) -> Any:
        return self.run(self.config)


@dataclass
class StageResult:
    name: str
    status: str  # "ran" | "skipped"
    seconds: float  # wall time of the run that produced the outputs (also for skipped stages)
    outputs: tuple[str, ...] = field(default_factory=tuple)


def _with(config: SDSGConfig, section: str, **values: Any) -> SDSGConfig:
    """A copy of the config with some fields of one section replaced (validated)."""
    updated = getattr(config, section).model_copy(update=values)
    type(updated).model_validate(updated.model_dump())  # fail here, naming the field, not inside a stage
    return config.model_copy(update={section: updated})


def _inputs(config: SDSGConfig) -> tuple[str, str | None]:
    """The raw image set X (prefix or manifest) and its planted-outlier labels: the synthetic dataset's when
    the pipeline makes it, else ``train.data`` and ``evaluate.labels``."""
    if config.pipeline.make_dataset:
        dataset = SyntheticDataset(config.dataset.out)
        return dataset.images, dataset.labels
    return config.train.data, config.evaluate.labels


def plan(config: SDSGConfig) -> list[Stage]:
    """The ordered stages of the pipeline, each with its own config (see the module docstring)."""
    config = with_layout_defaults(config)
    layout = RunLayout(config.pipeline.root.rstrip("/"))
    raw, labels = _inputs(config)
    stage1, stage2 = ModelDir(config.train.out), layout.stage2
    scores, selection = ScoreSet(config.score.out), FilteredSet(config.select.out)
    clusters, evaluation = ClusterFile(config.cluster.out), EvaluationResults(config.evaluate.out)
    stage2_kimg = config.pipeline.stage2_kimg or config.train.kimg
    stages: list[Stage] = []
    if config.pipeline.make_dataset:
        stages.append(Stage("dataset", run_make_dataset, config, (labels,), "dataset"))

    def train(name: str, stage: str, data: str, out: ModelDir, kimg: float) -> Stage:
        return Stage(name, run_training, _with(config, "train", stage=stage, data=data, out=out.uri, kimg=kimg),
                     (out.inference,), "train")

    stages.append(train("stage1", "joint", raw, stage1, config.train.kimg))
    stages.append(Stage("score", run_scoring, _with(config, "score", data=raw, checkpoint=stage1.uri),
                        (scores.summary,), "score"))
    stages.append(Stage("select", run_selection, _with(config, "select", scores=scores.uri, labels=labels),
                        (selection.kept, selection.report), "select"))
    stages.append(train("stage2", "generator", selection.kept, stage2, stage2_kimg))
    models = [EvalModel(name="filtered", checkpoint=stage2.uri, train_data=selection.kept)]
    if config.pipeline.baselines:
        stages.append(Stage("random_subset", run_random_subset, config, (layout.random_subset,), "pipeline"))
        stages.append(train("stage2_random", "generator", layout.random_subset, layout.stage2_random, stage2_kimg))
        stages.append(train("stage2_raw", "generator", raw, layout.stage2_raw, stage2_kimg))
        models += [
            EvalModel(name="random", checkpoint=layout.stage2_random.uri, train_data=layout.random_subset),
            EvalModel(name="raw", checkpoint=layout.stage2_raw.uri, train_data=raw),
        ]
    stages.append(Stage("cluster", run_clustering, _with(config, "cluster", checkpoint=stage2.uri),
                        (clusters.file,), "cluster"))
    if config.pipeline.evaluate:
        eval_config = _with(config, "evaluate", data=raw, checkpoint=stage2.uri, clusters=clusters.uri,
                            models=models, scores=scores.uri, selection=selection.uri, labels=labels)
        stages.append(Stage("evaluate", run_evaluation, eval_config, (evaluation.results,), "evaluate"))
    return stages


def layout_record(config: SDSGConfig) -> dict[str, str | None]:
    """Every URI the pipeline reads or writes (``pipeline.json``'s "layout")."""
    config = with_layout_defaults(config)
    layout = RunLayout(config.pipeline.root.rstrip("/"))
    raw, labels = _inputs(config)
    return {
        "root": layout.uri, "dataset": config.dataset.out if config.pipeline.make_dataset else None, "raw": raw,
        "labels": labels, "stage1": config.train.out, "scores": config.score.out, "selection": config.select.out,
        "kept": FilteredSet(config.select.out).kept, "random_subset": layout.random_subset,
        "stage2": layout.stage2.uri, "stage2_random": layout.stage2_random.uri, "stage2_raw": layout.stage2_raw.uri,
        "clusters": config.cluster.out, "eval": config.evaluate.out,
    }


def run_random_subset(config: SDSGConfig) -> str:
    """Table 3's control: as many images as the filtered set Y, drawn uniformly from the readable part of X."""
    config = with_layout_defaults(config)
    kept, target = FilteredSet(config.select.out).kept, RunLayout(config.pipeline.root.rstrip("/")).random_subset
    storage = get_storage(config.storage)
    n_kept = len(read_manifest(kept, storage))
    readable = sorted(
        str(key)
        for batch in ScoreSet(config.score.out).iter_batches(storage, ["key", "status"])
        for key, status in zip(batch["key"], batch["status"]) if status == "ok"
    )
    if n_kept > len(readable):
        raise ValueError(f"{kept} holds {n_kept} images but only {len(readable)} of X were readable")
    subset = sorted(random.Random(config.train.seed).sample(readable, n_kept))
    write_manifest(subset, target, storage)
    log.info("random subset: %d of %d readable images -> %s", n_kept, len(readable), target)
    return target


def _finished(stage: Stage, layout: RunLayout, storage: Storage) -> dict | None:
    """The stage's marker if it finished and its outputs are still there, else None."""
    marker = layout.stage_marker(stage.name)
    if not storage.exists(marker) or not all(storage.exists(u) for u in stage.outputs):
        return None
    record = read_json(marker, storage)
    current = getattr(stage.config, stage.section).model_dump(mode="json")
    if record.get("config") != current:
        log.warning("stage %s finished with a different %s config; delete %s to run it again",
                    stage.name, stage.section, marker)
    return record


def run_stages(stages: list[Stage], root: str, storage: Storage) -> list[StageResult]:
    """Run the stages in order, skipping finished ones; a failure stops the pipeline (and is re-raised)."""
    layout = RunLayout(root)
    results: list[StageResult] = []
    for i, stage in enumerate(stages, 1):
        done = _finished(stage, layout, storage)
        if done is not None:
            log.info("[%d/%d] %s: already finished (%.1f s), skipping", i, len(stages), stage.name, done["seconds"])
            results.append(StageResult(stage.name, "skipped", float(done["seconds"]), stage.outputs))
            continue
        log.info("[%d/%d] %s: running", i, len(stages), stage.name)
        start = time.perf_counter()
        stage.call()
        seconds = time.perf_counter() - start
        missing = [u for u in stage.outputs if not storage.exists(u)]
        if missing:
            raise RuntimeError(f"stage {stage.name} returned but did not write {missing}")
        record = {
            "stage": stage.name,
            "seconds": seconds,
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "outputs": list(stage.outputs),
            "config": getattr(stage.config, stage.section).model_dump(mode="json"),
        }
        write_json(layout.stage_marker(stage.name), record, storage)
        log.info("[%d/%d] %s: done in %.1f s", i, len(stages), stage.name, seconds)
        results.append(StageResult(stage.name, "ran", seconds, stage.outputs))
    return results


def run_pipeline(config: SDSGConfig) -> dict[str, Any]:
    """Run (or continue) the whole pipeline under ``pipeline.root``; writes and returns its summary (every
    stage's status and seconds, and the layout). Each stage joins (or starts) Ray itself when it needs it,
    so a finished pipeline re-runs in seconds. Serving afterwards is jobs.cli's composition."""
    config = with_layout_defaults(config)
    storage = get_storage(config.storage)
    layout = RunLayout(config.pipeline.root.rstrip("/"))
    stages = plan(config)
    storage.write_text(layout.config_file, dump_config(config))
    results = run_stages(stages, layout.uri, storage)
    summary = {
        "root": layout.uri,
        "stages": [{"name": r.name, "status": r.status, "seconds": r.seconds, "outputs": list(r.outputs)}
                   for r in results],
        "layout": layout_record(config),
    }
    write_json(layout.summary, summary, storage)
    return summary
