"""One typed configuration shared by the CLI, the Ray jobs and the Serve application.

Every stage reads its own section; a YAML file supplies any subset of fields and the command line
overrides single fields with dotted names (``train.kimg=2``). Validation errors name the bad field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

MetricName = Literal["auto", "lpips-vgg", "lpips-alex", "stlpips-alex", "stlpips-vgg"]
FeatureName = Literal["auto", "inception", "stlpips-alex-pool"]


class ConfigError(ValueError):
    """A configuration value is missing or invalid; the message names the field."""


class Section(BaseModel):
    # extra="forbid" turns a typo in YAML (``lpips_treshold``) into an error that names it.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class StorageConfig(Section):
    """Where object storage lives. Credentials always come from the standard AWS chain."""

    endpoint_url: str | None = Field(
        None, description="S3-compatible endpoint; falls back to $AWS_ENDPOINT_URL, then AWS itself."
    )
    region: str | None = Field(None, description="AWS region; falls back to $AWS_DEFAULT_REGION.")
    retry_mode: Literal["standard", "adaptive"] = Field(
        "adaptive", description="botocore retry mode: 'standard' (exponential backoff with jitter) or "
        "'adaptive' (standard plus client-side rate limiting when the store answers SlowDown / 503).",
    )
    max_attempts: int = Field(
        8, ge=1, le=50, description="Attempts per S3 request, the first included, before an error is raised.",
    )
    connect_timeout_s: float = Field(10.0, gt=0, description="Seconds to open a connection to the store.")
    read_timeout_s: float = Field(60.0, gt=0, description="Seconds to wait for bytes on an open connection.")


class ModelConfig(Section):
    """StyleGAN2 architecture. Defaults are the tiny CPU config; paper scale is 256+/512/512/8."""

    resolution: int = Field(32, description="Output side in pixels, a power of two in 16..1024.")
    z_dim: int = Field(64, gt=0)
    w_dim: int = Field(64, gt=0)
    mapping_layers: int = Field(2, ge=1, description="Fully-connected layers in the mapping network (8 in the paper).")
    channel_base: int = Field(2048, gt=0, description="Channels at resolution r are min(channel_base // r, channel_max).")
    channel_max: int = Field(64, gt=0)
    encoder_w_plus: bool = Field(False, description="Encoder predicts one w per layer (W+) instead of one w.")

    @field_validator("resolution")
    @classmethod
    def _power_of_two(cls, r: int) -> int:
        if r < 16 or r > 1024 or r & (r - 1):
            raise ValueError("must be a power of two in 16..1024")
        return r


class DatasetConfig(Section):
    """The Internet-like synthetic dataset (inliers in several modes plus planted outliers)."""

    out: str = "data/raw"
    n: int = Field(2000, gt=0, description="Number of images.")
    resolution: int = Field(32, ge=8)
    outlier_fraction: float = Field(0.1, ge=0.0, le=1.0)
    seed: int = 0


class TrainConfig(Section):
    """Stage-1 (joint G+E) and stage-2 (generator only) training."""

    stage: Literal["joint", "generator"] = "joint"
    data: str = Field("data/raw/images", description="Image prefix URI or a manifest (.parquet) of image URIs.")
    out: str = Field("runs/stage1", description="Checkpoints, sample grids and inference.pt go here.")
    workers: int = Field(1, ge=1)
    gpus_per_worker: float = Field(0.0, ge=0.0, description="0 trains on CPU with gloo.")
    cpus_per_worker: int = Field(1, ge=1)
    batch_size: int = Field(8, gt=0, description="Global batch, split evenly across workers.")
    kimg: float = Field(2.0, gt=0, description="Training length in thousands of real images shown.")
    lr_g: float = Field(0.002, gt=0)
    lr_d: float = Field(0.002, gt=0)
    lr_e: float = Field(0.002, gt=0)
    lambda_w: float = Field(0.1, ge=0)
    lambda_l1: float = Field(0.1, ge=0)
    lambda_lpips: float = Field(0.1, ge=0)
    r1_gamma: float = Field(0.1, ge=0, description="R1 weight (10 for 256 px FFHQ; small for tiny images).")
    r1_interval: int = Field(16, ge=1)
    pl_weight: float = Field(2.0, ge=0)
    pl_interval: int = Field(4, ge=1)
    style_mixing_prob: float = Field(0.9, ge=0, le=1)
    ema_kimg: float = Field(0.5, gt=0, description="EMA half-life of G_ema in kimg (10 at paper scale).")
    metric: MetricName = Field("auto", description="Perceptual metric for the LPIPS reconstruction loss.")
    checkpoint_every_kimg: float = Field(0.5, gt=0)
    num_to_keep: int = Field(2, ge=1)
    max_failures: int = Field(2, ge=0, description="Worker-group restarts from the last checkpoint.")
    log_every: int = Field(10, ge=1, description="Report metrics every N steps.")
    mixed_precision: bool = Field(True, description="bf16 autocast and channels_last on CUDA; ignored on CPU.")
    threads_per_worker: int | None = Field(None, ge=1, description="torch intra-op threads per worker.")
    seed: int = 0
    cache_max_mb: float = Field(1024.0, ge=0, description="Decode the whole set into memory when it fits in this many MB.")
    data_workers: int = Field(2, ge=0, description="DataLoader processes per worker when images are read lazily.")
    fail_at_step: int | None = Field(
        None, ge=1, description="Testing: the last rank raises once after this many steps (a marker under --out)."
    )


class ScoreConfig(Section):
    """Self-filtering step 1: d(x) = LPIPS(x, G(E(x))) for every image, with Ray Data."""

    data: str = Field("data/raw/images", description="Image prefix URI or a manifest (.parquet).")
    checkpoint: str = Field("runs/stage1", description="Training --out directory or an inference.pt.")
    out: str = "runs/scores"
    metric: MetricName = "auto"
    fid_features: FeatureName = "auto"
    batch_size: int = Field(32, gt=0)
    actors: int = Field(1, ge=1, description="Scoring actors (each holds G, E and the metric).")
    min_actors: int = Field(1, ge=1, description="The actor pool autoscales between min_actors and actors.")
    gpus_per_actor: float = Field(0.0, ge=0.0, description="Fractional GPUs allowed.")
    cpus_per_actor: float = Field(1.0, gt=0.0)
    manifest_shard_size: int = Field(
        10_000,
        gt=0,
        description="Keys per manifest shard = rows per score shard, the unit of resume; the driver buffers "
        "the scores (with both FID feature vectors) of the shards in flight.",
    )


class SelectConfig(Section):
    """Self-filtering step 2: choose theta with the paper's diversity and size bounds."""

    scores: str = "runs/scores"
    out: str = "runs/selection"
    target_threshold: float = Field(0.36, gt=0, description="The lowest theta to aim for.")
    start_threshold: float | None = Field(None, gt=0, description="Default: the largest score (keep all).")
    threshold_step: float = Field(0.005, gt=0, description="Grid spacing of theta.")
    min_size: int = Field(70_000, ge=1, description="|Y| must stay at or above this (FFHQ's size).")
    checkpoint: str | None = Field(
        None, description="For best_worst.png only; default: the checkpoint recorded in the scores' summary.json."
    )
    examples: int = Field(8, ge=1, description="Best and worst reconstructions shown in best_worst.png.")

    @model_validator(mode="after")
    def _ordered(self) -> "SelectConfig":
        if self.start_threshold is not None and self.start_threshold < self.target_threshold:
            raise ValueError("start_threshold must be >= target_threshold")
        return self


class ClusterConfig(Section):
    """Multi-modal truncation: KMeans on mapped latents."""

    checkpoint: str = "runs/stage2"
    out: str = "runs/clusters"
    n_latents: int = Field(60_000, gt=0)
    clusters: int = Field(64, gt=0)
    metric: MetricName = "auto"
    seed: int = 0

    @model_validator(mode="after")
    def _enough_latents(self) -> "ClusterConfig":
        if self.n_latents < self.clusters:
            raise ValueError("n_latents must be >= clusters")
        return self


class ServeConfig(Section):
    """The HTTP sampler (Ray Serve)."""

    checkpoint: str = "runs/stage2"
    clusters: str = "runs/clusters"
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    route_prefix: str = "/"
    max_batch_size: int = Field(16, ge=1)
    batch_wait_timeout_s: float = Field(
        0.05, ge=0, description="How long a batch waits to fill. 50 ms measured best on a 2-core CPU (10 ms made "
        "batching slower than none there); GPU configs use 10 ms.",
    )
    max_ongoing_requests: int = Field(32, ge=1)
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(4, ge=1)
    target_ongoing_requests: float = Field(8.0, gt=0)
    upscale_delay_s: float = Field(5.0, ge=0)
    downscale_delay_s: float = Field(30.0, ge=0)
    look_back_period_s: float = Field(30.0, gt=0, description="Window the autoscaler averages load over.")
    metrics_interval_s: float = Field(10.0, gt=0, description="How often replicas report load to the autoscaler.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per sampler replica (0 on CPU).")
    num_cpus: float = Field(1.0, ge=0)
    ingress_num_cpus: float = Field(0.1, ge=0, description="CPUs reserved by each HTTP ingress replica.")
    assign_by: Literal["lpips", "w"] = Field(
        "lpips", description="Nearest center by LPIPS between G(w) and G(c) (paper) or by distance in W."
    )
    assign_resolution: int | None = Field(
        None, ge=4, description="LPIPS assignment on G's coarse image at this resolution, drawn only up to "
        "that block (None: full images, as in the paper). Cheaper on large generators; see docs/benchmarks.md.",
    )
    max_samples_per_request: int = Field(64, ge=1)
    default_psi: float = Field(0.7, ge=0, le=1)

    @field_validator("assign_resolution")
    @classmethod
    def _block_resolution(cls, r: int | None) -> int | None:
        """Blocks are powers of two; whether the loaded generator has this one is checked by the Sampler."""
        if r is not None and r & (r - 1):
            raise ValueError("must be a power of two (one of the generator's block resolutions)")
        return r

    @model_validator(mode="after")
    def _replicas(self) -> "ServeConfig":
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must be <= max_replicas")
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError("max_ongoing_requests must be >= max_batch_size so a batch can fill")
        return self


class EvalModel(Section):
    """One row of the paper's Tables 1/3: a generator and the set it was trained on."""

    name: str = Field(..., description="Row label, e.g. 'filtered', 'random', 'raw'.")
    checkpoint: str = Field(..., description="Training --out directory or an inference.pt.")
    train_data: str = Field(..., description="Its training set: image prefix or manifest URI.")


class EvaluateConfig(Section):
    """FID/KID and the paper's comparisons."""

    out: str = "runs/eval"
    fid_features: FeatureName = "auto"
    num_samples: int = Field(1000, gt=0, description="Generated images per FID/KID estimate.")
    max_real: int | None = Field(None, gt=0, description="Cap on real images per reference set (None: all).")
    psis: list[float] = Field(default_factory=lambda: [0.3, 0.5, 0.7, 0.9, 1.0])
    seed: int = 0
    data: str = Field("data/raw/images", description="The raw set X: every model's FID is also measured against it.")
    checkpoint: str = Field("runs/stage2", description="Model for FID-vs-psi (Fig. 7) and the sample grids (Fig. 4).")
    clusters: str = Field("runs/clusters", description="clustering --out of that model (multi-modal truncation).")
    models: list[EvalModel] = Field(
        default_factory=list, description="Tables 1/3 rows; empty: `checkpoint` trained on `data`."
    )
    grid_seeds: int = Field(8, ge=1, description="Seeds per row of the truncation sample grids.")
    grid_psi: float = Field(0.5, ge=0, le=1, description="psi of the mean/multimodal sample grids.")
    batch_size: int = Field(32, gt=0, description="Generation and feature-extraction batch.")
    scores: str | None = Field(None, description="scoring --out; with `labels`, outlier precision/recall/AUROC.")
    selection: str | None = Field(None, description="selection --out (kept.parquet, report.json).")
    labels: str | None = Field(None, description="labels.csv of a synthetic dataset (planted outliers).")


class PipelineConfig(Section):
    """The whole pipeline's working area; stage URIs default to sub-directories of ``root``."""

    root: str = "runs/pipeline"
    baselines: bool = Field(True, description="Also train stage 2 on a random subset and on the raw set.")
    stage2_kimg: float | None = Field(None, gt=0, description="Default: train.kimg.")
    make_dataset: bool = Field(False, description="First write the synthetic dataset to dataset.out (demo, tests).")
    evaluate: bool = Field(True, description="Finish with the evaluation stage (FID tables, figures).")


class SDSGConfig(Section):
    storage: StorageConfig = Field(default_factory=StorageConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    dataset: DatasetConfig = Field(default_factory=DatasetConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    score: ScoreConfig = Field(default_factory=ScoreConfig)
    select: SelectConfig = Field(default_factory=SelectConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)


def _format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "<root>"
        lines.append(f"{field}: {e['msg']} (got {e.get('input')!r})")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.field=value")
    key, raw = item.split("=", 1)
    path = key.strip().split(".")
    # YAML parsing gives ints, floats, bools, null and lists their natural types.
    return path, yaml.safe_load(raw) if raw != "" else ""


def _set_dotted(tree: dict, path: Sequence[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(path)}: {part} is not a section")
        node = child
    node[path[-1]] = value


def load_config(
    path: str | Path | None = None,
    overrides: Sequence[str] | Mapping[str, Any] = (),
) -> SDSGConfig:
    """Build the config from defaults, then an optional YAML file, then dotted overrides.

    ``overrides`` is either ``["train.kimg=2", ...]`` (CLI style) or ``{"train.kimg": 2}``.
    Raises ConfigError naming each bad field.
    """
    tree: dict[str, Any] = {}
    if path is not None:
        text = Path(path).read_text()
        loaded = yaml.safe_load(text) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
        tree = loaded
    items = overrides.items() if isinstance(overrides, Mapping) else (_parse_override(o) for o in overrides)
    for key, value in items:
        _set_dotted(tree, key.split(".") if isinstance(key, str) else key, value)
    try:
        return SDSGConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err)) from None


def dump_config(config: SDSGConfig) -> str:
    """YAML text of the full config (what a job actually ran with)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
