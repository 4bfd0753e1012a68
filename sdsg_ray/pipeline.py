"""The whole method as one resumable job: stage-1 training -> scoring -> selection -> stage-2 training
(+ baselines) -> clustering -> evaluation.

`plan(config)` turns one config into the ordered list of stages, each with its own config whose URIs are
derived from ``pipeline.root`` (a URI no config layer set is derived; one set explicitly is kept, even when
it equals the default), so the stages only meet through storage. `run_pipeline` runs that plan and skips every stage that already
finished: a stage counts as finished when its marker ``<root>/_stages/<name>.json`` (written after it
returned) and its outputs exist. Re-submitting a failed pipeline therefore continues it, and an
interrupted training run resumes from its own Ray Train checkpoints.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from sdsg_ray.config import EvalModel, SDSGConfig, dump_config
from sdsg_ray.stages import STAGES, Stage as StageFunction
from sdsg_ray.storage import Storage, get_storage, join

log = logging.getLogger(__name__)

STAGES_DIR = "_stages"
SUMMARY_FILE = "pipeline.json"
RANDOM_SUBSET_FILE = "baselines/random-subset.parquet"


@dataclass(frozen=True)
class Stage:
    """One step of the pipeline: what to call, with which config, and what it leaves in storage."""

    name: str
    run: StageFunction  # called with the stage's own config
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


def _or_derived(config: SDSGConfig, field: str, derived: str) -> str:
    """The field's value if a config layer set it (even to its default), else the URI derived from the root."""
    section, name = field.split(".")
    return getattr(getattr(config, section), name) if config.is_set(field) else derived


@dataclass(frozen=True)
class Layout:
    """Every URI the pipeline reads or writes, derived from one config."""

    root: str
    dataset: str | None  # where the synthetic dataset is written, when the pipeline makes it
    raw: str  # the raw image set X (prefix or manifest)
    labels: str | None  # labels.csv of the synthetic dataset (planted outliers)
    stage1: str
    scores: str
    selection: str
    kept: str  # the filtered set Y (a manifest)
    random_subset: str  # |Y| random images of X (a manifest)
    stage2: str  # generator trained on Y
    stage2_random: str
    stage2_raw: str
    clusters: str
    eval: str

    @classmethod
    def from_config(cls, config: SDSGConfig) -> "Layout":
        root = config.pipeline.root.rstrip("/")
        if config.pipeline.make_dataset:
            # X is the images/ prefix only: the dataset directory also holds labels.csv and preview.png.
            dataset: str | None = _or_derived(config, "dataset.out", join(root, "data"))
            raw, labels = join(dataset, "images"), join(dataset, "labels.csv")
        else:
            dataset, raw, labels = None, config.train.data, config.evaluate.labels
        selection = _or_derived(config, "select.out", join(root, "selection"))
        return cls(
            root=root,
            dataset=dataset,
            raw=raw,
            labels=labels,
            stage1=_or_derived(config, "train.out", join(root, "stage1")),
            scores=_or_derived(config, "score.out", join(root, "scores")),
            selection=selection,
            kept=join(selection, "kept.parquet"),
            random_subset=join(root, RANDOM_SUBSET_FILE),
            stage2=join(root, "stage2"),
            stage2_random=join(root, "stage2-random"),
            stage2_raw=join(root, "stage2-raw"),
            clusters=_or_derived(config, "cluster.out", join(root, "clusters")),
            eval=_or_derived(config, "evaluate.out", join(root, "eval")),
        )


def _with(config: SDSGConfig, section: str, **values: Any) -> SDSGConfig:
    """A copy of the config with some fields of one section replaced (validated)."""
    updated = getattr(config, section).model_copy(update=values)
    type(updated).model_validate(updated.model_dump())  # fail here, naming the field, not inside a stage
    return config.model_copy(update={section: updated})


def plan(config: SDSGConfig) -> list[Stage]:
    """The ordered stages of the pipeline, each with its own config."""
    lay = Layout.from_config(config)
    stage2_kimg = config.pipeline.stage2_kimg or config.train.kimg
    stages: list[Stage] = []
    if config.pipeline.make_dataset:
        stages.append(
            Stage("dataset", STAGES["make-dataset"], _with(config, "dataset", out=lay.dataset),
                  (lay.labels,), "dataset")
        )

    def train(name: str, stage: str, data: str, out: str, kimg: float) -> Stage:
        return Stage(name, STAGES["train"],
                     _with(config, "train", stage=stage, data=data, out=out, kimg=kimg),
                     (join(out, "inference.pt"),), "train")

    stages.append(train("stage1", "joint", lay.raw, lay.stage1, config.train.kimg))
    stages.append(
        Stage("score", STAGES["score"],
              _with(config, "score", data=lay.raw, checkpoint=lay.stage1, out=lay.scores),
              (join(lay.scores, "summary.json"),), "score")
    )
    stages.append(
        Stage("select", STAGES["select"],
              _with(config, "select", scores=lay.scores, out=lay.selection, labels=lay.labels),
              (lay.kept, join(lay.selection, "report.json")), "select")
    )
    stages.append(train("stage2", "generator", lay.kept, lay.stage2, stage2_kimg))
    models = [EvalModel(name="filtered", checkpoint=lay.stage2, train_data=lay.kept)]
    if config.pipeline.baselines:
        stages.append(
            Stage("random_subset", run_random_subset, config, (lay.random_subset,), "pipeline")
        )
        stages.append(train("stage2_random", "generator", lay.random_subset, lay.stage2_random, stage2_kimg))
        stages.append(train("stage2_raw", "generator", lay.raw, lay.stage2_raw, stage2_kimg))
        models += [
            EvalModel(name="random", checkpoint=lay.stage2_random, train_data=lay.random_subset),
            EvalModel(name="raw", checkpoint=lay.stage2_raw, train_data=lay.raw),
        ]
    stages.append(
        Stage("cluster", STAGES["cluster"],
              _with(config, "cluster", checkpoint=lay.stage2, out=lay.clusters),
              (join(lay.clusters, "clusters.pt"),), "cluster")
    )
    if config.pipeline.evaluate:
        eval_config = _with(
            config, "evaluate", out=lay.eval, data=lay.raw, checkpoint=lay.stage2, clusters=lay.clusters,
            models=models, scores=lay.scores, selection=lay.selection, labels=lay.labels,
        )
        stages.append(
            Stage("evaluate", STAGES["evaluate"], eval_config, (join(lay.eval, "results.json"),),
                  "evaluate")
        )
    return stages


def run_random_subset(config: SDSGConfig) -> str:
    """Table 3's control: as many images as the filtered set Y, drawn uniformly from the readable part of X."""
    from sdsg_ray.artifacts.scores import iter_score_batches
    from sdsg_ray.manifest import read_manifest, write_manifest

    lay = Layout.from_config(config)
    storage = get_storage(config.storage)
    n_kept = len(read_manifest(lay.kept, storage))
    readable = sorted(
        str(key)
        for batch in iter_score_batches(lay.scores, storage, ["key", "status"])
        for key, status in zip(batch["key"], batch["status"]) if status == "ok"
    )
    if n_kept > len(readable):
        raise ValueError(f"{lay.kept} holds {n_kept} images but only {len(readable)} of X were readable")
    subset = sorted(random.Random(config.train.seed).sample(readable, n_kept))
    write_manifest(subset, lay.random_subset, storage)
    log.info("random subset: %d of %d readable images -> %s", n_kept, len(readable), lay.random_subset)
    return lay.random_subset


def _marker(root: str, name: str) -> str:
    return join(root, STAGES_DIR, f"{name}.json")


def _finished(stage: Stage, root: str, storage: Storage) -> dict | None:
    """The stage's marker if it finished and its outputs are still there, else None."""
    marker = _marker(root, stage.name)
    if not storage.exists(marker) or not all(storage.exists(u) for u in stage.outputs):
        return None
    record = json.loads(storage.read_text(marker))
    current = getattr(stage.config, stage.section).model_dump(mode="json")
    if record.get("config") != current:
        log.warning("stage %s finished with a different %s config; delete %s to run it again",
                    stage.name, stage.section, marker)
    return record


def run_stages(stages: list[Stage], root: str, storage: Storage) -> list[StageResult]:
    """Run the stages in order, skipping finished ones; a failure stops the pipeline (and is re-raised)."""
    results: list[StageResult] = []
    for i, stage in enumerate(stages, 1):
        done = _finished(stage, root, storage)
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
        storage.write_text(_marker(root, stage.name), json.dumps(record, indent=2))
        log.info("[%d/%d] %s: done in %.1f s", i, len(stages), stage.name, seconds)
        results.append(StageResult(stage.name, "ran", seconds, stage.outputs))
    return results


def run_pipeline(config: SDSGConfig) -> dict[str, Any]:
    """Run (or continue) the whole pipeline under ``pipeline.root``; writes and returns ``<root>/pipeline.json``
    (every stage with its status and seconds, and the layout). Serves the result when ``pipeline.serve``.

    Each stage joins (or starts) Ray itself when it needs it, so a finished pipeline re-runs in seconds.
    """
    storage = get_storage(config.storage)
    root = config.pipeline.root.rstrip("/")
    stages = plan(config)
    storage.write_text(join(root, "config.yaml"), dump_config(config))
    results = run_stages(stages, root, storage)
    summary = {
        "root": root,
        "stages": [{"name": r.name, "status": r.status, "seconds": r.seconds, "outputs": list(r.outputs)}
                   for r in results],
        "layout": Layout.from_config(config).__dict__,
    }
    storage.write_text(join(root, SUMMARY_FILE), json.dumps(summary, indent=2))
    if config.pipeline.serve:
        serve_stage2(config)
    return summary


def serve_stage2(config: SDSGConfig) -> int:
    """Serve the pipeline's stage-2 generator with its clusters until Ctrl-C."""
    lay = Layout.from_config(config)
    serve = config.serve.model_copy(update={"checkpoint": lay.stage2, "clusters": lay.clusters})
    return STAGES["serve"](config.model_copy(update={"serve": serve}))
