"""One typed configuration shared by the CLI, the Ray jobs and the Serve application.

Every stage reads its own section; a YAML file supplies any subset of fields and the command line
overrides single fields with dotted names (``train.kimg=2``). Validation errors name the bad field.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping, Sequence

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from sdsg_ray.errors import UserError
from sdsg_ray.perceptual import metric_choice
from sdsg_ray.registry import UnknownEntry
from sdsg_ray.truncation.modes import TRUNCATION_MODES, AssignBy

# "auto" or a registered perceptual metric (sdsg_ray.perceptual.METRICS), checked when the config is validated
MetricName = Annotated[str, AfterValidator(metric_choice)]
FeatureName = Literal["auto", "inception", "stlpips-alex-pool"]


# How a path field left unset is filled in (sdsg_ray.artifacts.layout.PATH_DEFAULTS does it).
DERIVED = "default: a member of the run layout of pipeline.root"
DERIVED_LAYER = "derived from pipeline.root"


class ConfigError(UserError, ValueError):
    """A configuration value is missing or invalid; the message names the field."""


class Section(BaseModel):
    # extra="forbid" turns a typo in YAML (``lpips_treshold``) into an error that names it.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class StorageConfig(Section):
    """Where object storage lives and how hard to try. Credentials always come from the standard AWS chain."""

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
    z_dim: int = Field(64, gt=0, description="Size of the input latent z (512 in the paper).")
    w_dim: int = Field(64, gt=0, description="Size of the intermediate latent w (512 in the paper).")
    mapping_layers: int = Field(2, ge=1, description="Fully-connected layers in the mapping network (8 in the paper).")
    channel_base: int = Field(2048, gt=0, description="Channels at resolution r are min(channel_base // r, channel_max).")
    channel_max: int = Field(64, gt=0, description="Most channels of any layer (512 in the paper).")
    encoder_w_plus: bool = Field(False, description="Encoder predicts one w per layer (W+) instead of one w.")
    mbstd_group: int = Field(4, ge=1, description="D's minibatch-std group size (NVIDIA's mbstd_group_size; 4, or 8 "
                             "in its paper256/512/1024 configs).")
    mbstd_channels: int = Field(1, ge=1, description="Channels D's minibatch-std layer appends (NVIDIA's mbstd_num_channels).")
    num_fp16_res: int = Field(
        4, ge=0, description="Mixed precision (NVIDIA's policy): the N highest-resolution blocks of G, D and E compute in "
        "precision_dtype when train.mixed_precision is on; mapping, 4x4 blocks, losses and regularisers stay fp32. 0 disables.")
    conv_clamp: float | None = Field(
        256.0, gt=0, description="Clamp conv outputs of G, D and E to +-conv_clamp (times the layer's gain), NVIDIA's "
        "guard for reduced precision; null disables.")
    precision_dtype: Literal["bf16", "fp16"] = Field(
        "bf16", description="Reduced dtype of those blocks: bf16 (fp32's range: no overflow, no loss scaling; Ampere+ "
        "GPUs and CPUs) or fp16 (V100 and older tensor cores; relies on conv_clamp).")

    @field_validator("resolution")
    @classmethod
    def _power_of_two(cls, r: int) -> int:
        if r < 16 or r > 1024 or r & (r - 1):
            raise ValueError("must be a power of two in 16..1024")
        return r


def _judge_resolution(r: int | None) -> int | None:
    """None, or a power of two in 32..1024: the AlexNet trunks need 32 px (pretrained.MIN_METRIC_SIDE)."""
    if r is not None and (r < 32 or r > 1024 or r & (r - 1)):
        raise ValueError(f"must be a power of two in 32..1024 (the side the perceptual metric sees), or null; got {r}")
    return r


class DatasetConfig(Section):
    """The Internet-like synthetic dataset (inliers in several modes plus planted outliers)."""

    out: str | None = Field(None, description="Where the dataset (sdsg_ray.artifacts.dataset) is written; "
                            f"{DERIVED}.")
    n: int = Field(2000, gt=0, description="Number of images.")
    resolution: int = Field(32, ge=8, description="Side of the generated images in pixels.")
    outlier_fraction: float = Field(0.1, ge=0.0, le=1.0, description="Share of planted outliers.")
    seed: int = Field(0, description="Every image is a pure function of (seed, index).")


class TrainConfig(Section):
    """Stage-1 (joint G+E), stage-2 (generator only) and encoder-only training."""

    stage: Literal["joint", "generator", "encoder"] = Field(
        "joint", description="'joint': G, D and the encoder E (stage 1); 'generator': G and D only (stage 2); "
        "'encoder': E alone against the frozen G_ema of train.checkpoint (a generator you already have).")
    checkpoint: str | None = Field(
        None, description="Stage 'encoder' only: the frozen generator (training --out directory, imported directory "
        "or its inference file); the model section is taken from it.")
    resume_from: str | None = Field(
        None, description="Stages 'joint'/'generator': start G, G_ema and D from this model directory (inference and "
        "discriminator files, sdsg_ray.artifacts.checkpoint; e.g. an `sdsg import`), E fresh, kimg from 0, no EMA ramp-up (NVIDIA's --resume); "
        "the model section is taken from it.")
    data: str | None = Field(None, description=f"Image prefix URI or a manifest (.parquet) of image URIs; {DERIVED}.")
    out: str | None = Field(None, description=f"Checkpoints, sample grids and the model directory; {DERIVED}.")
    workers: int = Field(1, ge=1, description="Ray Train workers (DDP ranks).")
    gpus_per_worker: float = Field(0.0, ge=0.0, description="0 trains on CPU with gloo.")
    cpus_per_worker: int = Field(1, ge=1, description="CPUs each worker reserves.")
    batch_size: int = Field(8, gt=0, description="Global batch, split evenly across workers.")
    kimg: float = Field(2.0, gt=0, description="Training length in thousands of real images shown.")
    lr_g: float = Field(0.002, gt=0, description="Adam learning rate of G (0.002 in the paper).")
    lr_d: float = Field(0.002, gt=0, description="Adam learning rate of D.")
    lr_e: float = Field(0.002, gt=0, description="Adam learning rate of the encoder E (0.002 in the paper).")
    lambda_w: float = Field(0.1, ge=0, description="Weight of L_w = |w - E(G(w))| (0.1 in the paper).")
    lambda_l1: float = Field(0.1, ge=0, description="Weight of L_rec,L1 = |x - G(E(x))| (0.1 in the paper).")
    lambda_lpips: float = Field(0.1, ge=0, description="Weight of L_rec,LPIPS = LPIPS(x, G(E(x))) (0.1 in the paper).")
    r1_gamma: float = Field(0.1, ge=0, description="R1 weight (10 for 256 px FFHQ; small for tiny images).")
    r1_interval: int = Field(16, ge=1, description="Lazy R1: every this many steps.")
    pl_weight: float = Field(2.0, ge=0, description="Path-length regularisation weight (0 turns it off).")
    pl_interval: int = Field(4, ge=1, description="Lazy path-length regularisation: every this many steps.")
    style_mixing_prob: float = Field(0.9, ge=0, le=1, description="Probability of style mixing per batch.")
    ema_kimg: float = Field(0.5, gt=0, description="EMA half-life of G_ema in kimg (10 at paper scale).")
    ema_rampup: float | None = Field(
        0.05, gt=0, description="Cap the EMA half-life at this fraction of the images shown so far (0.05 in "
        "NVIDIA stylegan2-ada-pytorch's auto config); null: fixed half-life ema_kimg from the start.")
    metric: MetricName = Field("auto", description="Perceptual metric for the LPIPS reconstruction loss.")
    checkpoint_every_kimg: float = Field(0.5, gt=0, description="Checkpoint, grids and the inference file this often.")
    num_to_keep: int = Field(2, ge=1, description="Ray Train checkpoints kept (older ones are deleted).")
    max_failures: int = Field(2, ge=0, description="Worker-group restarts from the last checkpoint.")
    log_every: int = Field(10, ge=1, description="Report metrics every N steps.")
    mixed_precision: bool = Field(True, description="On CUDA: the model section's precision policy (num_fp16_res blocks in "
        "precision_dtype) and channels_last; CPU training stays fp32.")
    threads_per_worker: int | None = Field(None, ge=1, description="torch intra-op threads per worker.")
    seed: int = Field(0, description="Initial weights and data order; step k is a function of (seed, k).")
    cache_max_mb: float = Field(1024.0, ge=0, description="Decode the whole set into memory when it fits in this many MB.")
    data_workers: int = Field(2, ge=0, description="DataLoader processes per worker when images are read lazily.")

    @model_validator(mode="after")
    def _stage_inputs(self) -> "TrainConfig":
        if self.stage == "encoder" and not self.checkpoint:
            raise ValueError("stage 'encoder' trains E against a frozen generator: set train.checkpoint (--checkpoint)")
        if self.stage != "encoder" and self.checkpoint:
            raise ValueError(f"train.checkpoint is the frozen generator of stage 'encoder', not of stage {self.stage!r} "
                             "(to fine-tune G and D from a directory use train.resume_from)")
        if self.stage == "encoder" and self.resume_from:
            raise ValueError("stage 'encoder' keeps G frozen; train.resume_from fine-tunes G and D (stages joint/generator)")
        return self


class ScoreConfig(Section):
    """Self-filtering step 1: d(x) = LPIPS(x, G(E(x))) for every image, with Ray Data."""

    data: str | None = Field(None, description=f"Image prefix URI or a manifest (.parquet); {DERIVED}.")
    checkpoint: str | None = Field(None, description=f"Training --out directory or an inference file; {DERIVED}.")
    out: str | None = Field(None, description=f"The score set (sdsg_ray.artifacts.scores); {DERIVED}.")
    metric: MetricName = Field("auto", description="Perceptual metric of d(x); use the one stage 1 trained with.")
    pair: Literal["ema", "live"] = Field(
        "ema", description="Which (G, E) computes G(E(x)): 'ema' (G_ema, E_ema), 'live' (G, E); both pairs "
        "were trained together, unlike G_ema with the live E.")
    judge_resolution: int | None = Field(
        None, description="Side in px x and G(E(x)) are both resized to before the perceptual metric (area when "
        "shrinking, bilinear when enlarging: pretrained.judge_resize); null: the image's own size. A power of two "
        "in 32..1024 (docs/benchmarks.md, 'The judge's size').")
    fid_features: FeatureName = Field("auto", description="Features for FD(Y, X): Inception when present.")
    batch_size: int = Field(32, gt=0, description="Images per scoring call.")
    actors: int = Field(1, ge=1, description="Scoring actors (each holds G, E and the metric).")
    min_actors: int = Field(1, ge=1, description="The actor pool autoscales between min_actors and actors.")
    gpus_per_actor: float = Field(
        0.0, ge=0.0, description="GPUs each actor reserves; a fraction lets actors share one (0.5: two per GPU).")
    cpus_per_actor: float = Field(1.0, gt=0.0, description="CPUs each actor reserves; leave one for decoding.")
    manifest_shard_size: int = Field(
        10_000,
        gt=0,
        description="Keys per manifest shard = rows per score shard, the unit of resume; the driver buffers "
        "the scores (with both FID feature vectors) of the shards in flight.",
    )

    @field_validator("judge_resolution")
    @classmethod
    def _judge_side(cls, r: int | None) -> int | None:
        return _judge_resolution(r)


class IngestConfig(Section):
    """`sdsg ingest`: a URL list -> webdataset/parquet shards (img2dataset's layout), cropped and resized."""

    urls: str = Field("data/urls.txt", description="URL list: one URL per line, a .csv/.parquet with a 'url' column, "
                      "or the paper's .json list of {image_name, bounding_box: [y0, y1, x0, x1]}.")
    out: str = Field("data/shards", description="Prefix for 00000.tar (or .parquet) + 00000_stats.json per shard.")
    format: Literal["tar", "parquet"] = Field("tar", description="webdataset .tar shards or image-bytes .parquet.")
    resolution: int = Field(256, ge=8, description="Square side the (cropped) image is resized to with LANCZOS.")
    shard_size: int = Field(1000, gt=0, description="URLs per shard = the unit of resume.")
    threads: int = Field(16, ge=1, description="Concurrent downloads per shard task (the paper's script: 16).")
    tasks: int = Field(2, ge=1, description="Shard tasks running at once (Ray Data): at most tasks x threads requests.")
    retries: int = Field(2, ge=0, description="Extra attempts on a timeout, connection error or HTTP 5xx/429.")
    timeout_s: float = Field(10.0, gt=0, description="Total deadline per attempt, in seconds: resolving, connecting, "
                             "headers and the whole body (not per read; a server dripping bytes is cut off).")
    max_bytes: int = Field(32 * 1024 * 1024, gt=0, description="Largest body read; longer ones are cut at the cap "
                           "whatever Content-Length says (status 'failed: too large').")
    max_redirects: int = Field(5, ge=0, description="Redirects followed per URL; each hop's address is checked again.")
    allow_networks: list[str] = Field(default_factory=list, description="CIDRs fetched from although not public "
                                      "(e.g. ['10.1.0.0/16'] for an internal mirror). Default: public addresses only; "
                                      "loopback, private, link-local (cloud metadata), shared, multicast and reserved "
                                      "addresses are refused before connecting (status 'refused: address').")
    jpeg_quality: int = Field(95, ge=1, le=100, description="JPEG quality of the stored images.")

    @field_validator("allow_networks")
    @classmethod
    def _cidrs(cls, value: list[str]) -> list[str]:
        for cidr in value:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError as err:
                raise ValueError(f"not a CIDR network: {cidr!r} ({err})") from None
        return value


class SelectConfig(Section):
    """Self-filtering step 2: choose theta with the paper's diversity and size bounds."""

    scores: str | None = Field(None, description=f"The --out of `sdsg score`; {DERIVED}.")
    out: str | None = Field(None, description=f"The selection (sdsg_ray.artifacts.selection); {DERIVED}.")
    target_threshold: float = Field(0.36, gt=0, description="The lowest theta to aim for (0.36 in the paper).")
    start_threshold: float | None = Field(None, gt=0, description="Default: the largest score (keep all).")
    threshold_step: float = Field(0.005, gt=0, description="Grid spacing of theta.")
    min_size: int = Field(70_000, ge=1, description="|Y| must stay at or above this (FFHQ's size).")
    checkpoint: str | None = Field(
        None, description="For the best/worst figure and the curation page's thumbnails only; default: the checkpoint "
        "recorded in the scores' summary."
    )
    examples: int = Field(8, ge=1, description="Best and worst reconstructions shown in the best/worst figure.")
    labels: str | None = Field(None, description="The labels of planted outliers (synthetic data, "
                               "sdsg_ray.artifacts.dataset): the selection's report then gives the precision and recall of outlier removal beside random removal.")
    page_images: int = Field(2000, ge=0, description="Thumbnails on the curation page, ordered by d(x): every image "
                             "up to this many, a stratified sample (by d(x)) beyond; 0: no thumbnails.")
    page_thumb_size: int = Field(64, ge=8, description="Largest side of a curation page thumbnail, in pixels.")

    @model_validator(mode="after")
    def _ordered(self) -> "SelectConfig":
        if self.start_threshold is not None and self.start_threshold < self.target_threshold:
            raise ValueError("start_threshold must be >= target_threshold")
        return self


class ClusterConfig(Section):
    """Multi-modal truncation: KMeans on mapped latents."""

    checkpoint: str | None = Field(None, description=f"Generator whose latents are clustered; {DERIVED}.")
    out: str | None = Field(None, description=f"The clusters (sdsg_ray.artifacts.clusters); {DERIVED}.")
    n_latents: int = Field(60_000, gt=0, description="Random z mapped to w and clustered (60,000 in the paper).")
    clusters: int = Field(64, gt=0, description="KMeans centers (64 in the paper).")
    metric: MetricName = Field("auto", description="Perceptual metric the sampler assigns centers with.")
    judge_resolution: int | None = Field(
        None, description="Side in px G(w) and the center images are resized to before that metric (as "
        "score.judge_resolution; null: the image's own size). Recorded with the clusters; the sampler uses it.")
    seed: int = Field(0, description="Seed of the z and of KMeans.")
    classifier_latents: int = Field(
        10_000, ge=0, description="Mapped latents labelled with their LPIPS-nearest center to fit the learned "
        "assignment (w -> center MLP saved with the clusters); 0: no classifier.")
    classifier_held_out: float = Field(
        0.2, gt=0, lt=1, description="Share of those latents kept out of fitting; the classifier's agreement "
        "and LPIPS regret are measured on them.")
    classifier_hidden: int = Field(256, ge=1, description="Hidden units of the learned-assignment MLP.")
    classifier_steps: int = Field(500, ge=1, description="Adam steps fitting the learned-assignment MLP.")
    classifier_temperature: float = Field(
        0.01, ge=0, description="Fit the MLP to softmax(-LPIPS distances / temperature) over all centers "
        "(0: to the nearest center alone), so near-ties are learnt as ties (bench/bench_assignment.py).")

    @field_validator("judge_resolution")
    @classmethod
    def _judge_side(cls, r: int | None) -> int | None:
        return _judge_resolution(r)

    @model_validator(mode="after")
    def _enough_latents(self) -> "ClusterConfig":
        if self.n_latents < self.clusters:
            raise ValueError("n_latents must be >= clusters")
        return self


class ServeConfig(Section):
    """The HTTP sampler (Ray Serve)."""

    checkpoint: str | None = Field(None, description=f"Generator to sample from; {DERIVED}.")
    clusters: str | None = Field(None, description=f"Its clusters (multi-modal truncation); empty: none; {DERIVED}.")
    host: str = Field("127.0.0.1", description="Address the HTTP proxy binds.")
    port: int = Field(8000, ge=1, le=65535, description="Port of the HTTP proxy.")
    route_prefix: str = Field("/", description="URL prefix of the application.")
    max_batch_size: int = Field(16, ge=1, description="Most images in one forward pass (@serve.batch).")
    batch_wait_timeout_s: float = Field(
        0.05, ge=0, description="How long a batch waits to fill before it runs (docs/benchmarks.md: CPU vs GPU).",
    )
    max_ongoing_requests: int = Field(32, ge=1, description="Requests in flight per replica.")
    min_replicas: int = Field(1, ge=0, description="Sampler replicas the autoscaler keeps at least.")
    max_replicas: int = Field(4, ge=1, description="Sampler replicas the autoscaler adds at most.")
    target_ongoing_requests: float = Field(8.0, gt=0, description="Load per replica the autoscaler aims for.")
    upscale_delay_s: float = Field(5.0, ge=0, description="Load must stay high this long before a replica is added.")
    downscale_delay_s: float = Field(30.0, ge=0, description="Load must stay low this long before one is removed.")
    look_back_period_s: float = Field(30.0, gt=0, description="Window the autoscaler averages load over.")
    metrics_interval_s: float = Field(10.0, gt=0, description="How often replicas report load to the autoscaler.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per sampler replica (0 on CPU).")
    num_cpus: float = Field(1.0, ge=0, description="CPUs per sampler replica.")
    ingress_num_cpus: float = Field(0.1, ge=0, description="CPUs reserved by each HTTP ingress replica.")
    assign_by: Literal["auto", AssignBy] = Field(
        "auto", description="Default multi-modal assignment: nearest center by LPIPS between G(w) and G(c) "
        "(paper), 'learned' (the clusters file's w -> center classifier, no extra synthesis pass), or distance "
        "in W; 'auto': learned when the clusters file has a classifier, else lpips. Requests may pick another.",
    )
    assign_resolution: int | None = Field(
        None, ge=4, description="LPIPS assignment on G's coarse image at this resolution, drawn only up to "
        "that block (None: full images, as in the paper). Cheaper on large generators; see docs/benchmarks.md.",
    )
    max_samples_per_request: int = Field(64, ge=1, description="Most images one POST /v1/samples may ask for.")
    default_psi: float = Field(0.7, ge=0, le=1, description="psi when a request gives none.")

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
    checkpoint: str = Field(..., description="Training --out directory or an inference file.")
    train_data: str = Field(..., description="Its training set: image prefix or manifest URI.")


class EvaluateConfig(Section):
    """FID/KID and the paper's comparisons."""

    out: str | None = Field(None, description=f"The evaluation results (sdsg_ray.artifacts.evaluation); {DERIVED}.")
    fid_features: FeatureName = Field("auto", description="Inception when present, else a named offline network.")
    num_samples: int = Field(1000, gt=0, description="Generated images per FID/KID estimate.")
    max_real: int | None = Field(None, gt=0, description="Cap on real images per reference set (None: all).")
    psis: list[float] = Field(default_factory=lambda: [0.3, 0.5, 0.7, 0.9, 1.0], description="Fig. 7's x axis.")
    seed: int = Field(0, description="First sample seed; seeds are seed .. seed + num_samples - 1.")
    data: str | None = Field(None, description=f"The raw set X: every model's FID is also measured against it; {DERIVED}.")
    checkpoint: str | None = Field(None, description=f"Model for FID-vs-psi (Fig. 7) and the sample grids (Fig. 4); {DERIVED}.")
    clusters: str | None = Field(None, description=f"clustering --out of that model (multi-modal truncation); {DERIVED}.")
    models: list[EvalModel] = Field(
        default_factory=list, description="Tables 1/3 rows; empty: `checkpoint` trained on `data`."
    )
    grid_seeds: int = Field(8, ge=1, description="Seeds per row of the truncation sample grids.")
    grid_psi: float = Field(0.5, ge=0, le=1, description="psi of the mean/multimodal sample grids.")
    batch_size: int = Field(32, gt=0, description="Generation and feature-extraction batch.")
    scores: str | None = Field(None, description="scoring --out; with `labels`, outlier precision/recall/AUROC.")
    selection: str | None = Field(None, description="selection --out (sdsg_ray.artifacts.selection).")
    labels: str | None = Field(None, description="The labels of a synthetic dataset's planted outliers (sdsg_ray.artifacts.dataset).")


class PipelineConfig(Section):
    """The whole pipeline's working area; stage URIs default to its layout (sdsg_ray.artifacts.layout)."""

    root: str = Field("runs", description="The run layout: every stage path not set explicitly is a member of it.")
    baselines: bool = Field(True, description="Also train stage 2 on a random subset and on the raw set.")
    stage2_kimg: float | None = Field(None, gt=0, description="Default: train.kimg.")
    make_dataset: bool = Field(False, description="First write the synthetic dataset to dataset.out (demo, tests).")
    evaluate: bool = Field(True, description="Finish with the evaluation stage (FID tables, figures).")
    serve: bool = Field(False, description="After the pipeline (and the demo's report), serve the sampler "
                        "until Ctrl-C (the demo's default; --no-serve turns it off).")


class ImportConfig(Section):
    """``sdsg import``: a generator you already have -> an sdsg checkpoint directory (no code from it runs)."""

    source: str | None = Field(None, description="NVIDIA StyleGAN2 snapshot .pkl (stylegan2-ada-pytorch or stylegan3's "
                               "StyleGAN2) or an `sdsg export` .safetensors: local path or s3:// URI.")
    out: str = Field("runs/imported", description="The model directory it writes (sdsg_ray.artifacts.checkpoint).")


class ExportConfig(Section):
    """``sdsg export``: a checkpoint as a pickle-free file."""

    checkpoint: str | None = Field(None, description=f"Training --out directory, import --out, or an inference file; {DERIVED}.")
    format: Literal["safetensors"] = Field("safetensors", description="File format of the export.")
    out: str | None = Field(None, description="A model directory (gets its export file) or a .safetensors path; "
                            "default: the checkpoint's directory.")


class GenerateConfig(Section):
    """``sdsg generate``: PNGs and a grid for a list of seeds, like NVIDIA's gen_images.py."""

    checkpoint: str | None = Field(None, description=f"Generator to sample from (any checkpoint or import --out); {DERIVED}.")
    seeds: str = Field("0-7", description="Seeds: ranges and lists, e.g. '0-31' or '1,5,9-12'.")
    psi: float = Field(0.7, ge=0, le=1, description="Truncation psi.")
    truncation: str = Field("mean", description="A truncation mode (sdsg_ray/truncation/modes.py): "
                            + ", ".join(f"{n} ({m.label})" for n, m in TRUNCATION_MODES.items())
                            + "; modes toward cluster centers need --clusters.")
    clusters: str | None = Field(None, description="`sdsg cluster` --out of this checkpoint (multimodal truncation).")
    assign_by: Literal["auto", AssignBy] = Field(
        "auto", description="How multimodal truncation picks the nearest center ('auto': learned if fitted, else lpips).")
    out: str = Field("runs/generated", description="seedNNNN.png per seed and grid.png go here.")
    batch_size: int = Field(16, ge=1, description="Images per forward pass.")

    @field_validator("truncation")
    @classmethod
    def _registered_mode(cls, name: str) -> str:
        try:  # checked when the config is built, so a mode registered later (a test's toy) is accepted
            return TRUNCATION_MODES[name].name
        except UnknownEntry as err:
            raise ValueError(str(err)) from None


class SDSGConfig(Section):
    """Every section, plus where each value came from (see :func:`build_config`)."""

    storage: StorageConfig = Field(default_factory=StorageConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    dataset: DatasetConfig = Field(default_factory=DatasetConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    score: ScoreConfig = Field(default_factory=ScoreConfig)
    select: SelectConfig = Field(default_factory=SelectConfig)
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)
    importer: ImportConfig = Field(default_factory=ImportConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    generate: GenerateConfig = Field(default_factory=GenerateConfig)

    # "section.field" -> the layer that set it last; absent = the built-in default.
    _sources: dict[str, str] = PrivateAttr(default_factory=dict)
    _derived: frozenset[str] = PrivateAttr(default_factory=frozenset)  # path fields filled from pipeline.root

    def source(self, field: str) -> str:
        """The layer that set ``section.field`` ("default" when none did, DERIVED_LAYER when derived)."""
        return self._sources.get(field, DERIVED_LAYER if field in self._derived else DEFAULT_LAYER)

    def is_set(self, field: str) -> bool:
        """Whether any layer set ``section.field`` (even to the default's value): derived values
        (stage URIs under ``pipeline.root``) fill only the fields for which this is False."""
        return field in self._sources

    def derive(self, values: Mapping[str, Any]) -> "SDSGConfig":
        """A copy with fields no layer set filled in (``{"train.out": uri}``), remembered as derived."""
        sections: dict[str, dict[str, Any]] = {}
        for key, value in values.items():
            section, name = key.split(".")
            sections.setdefault(section, {})[name] = value
        derived = self.model_copy(update={section: getattr(self, section).model_copy(update=fields)
                                          for section, fields in sections.items()})
        derived._sources = dict(self._sources)
        derived._derived = self._derived | set(values)
        return derived

    def __eq__(self, other: object) -> bool:
        """Equal values are equal configs, whichever layers set them."""
        return isinstance(other, SDSGConfig) and self.model_dump() == other.model_dump()

    __hash__ = None  # mutable, like every pydantic model


DEFAULT_LAYER = "default"
# The fixed order of the layers; a later layer wins over an earlier one.
LAYERS = ("default", "command", "file", "set", "flag")


def field_description(field: str) -> str:
    """The description of ``section.field``, for --help and --print-config."""
    section, _, name = field.partition(".")
    info = SDSGConfig.model_fields[section].annotation.model_fields[name]
    return info.description or ""


def _format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "<root>"
        lines.append(f"{field}: {e['msg']} (got {e.get('input')!r})")
    return "invalid configuration:\n  " + "\n  ".join(lines)


Layer = tuple[str, Mapping[str, Any]]  # (layer name, {"section.field": value})


def _fields_of(tree: Mapping[str, Any], origin: str) -> dict[str, Any]:
    """``{"train": {"kimg": 2}}`` -> ``{"train.kimg": 2}``: exactly two levels, section then field."""
    if not isinstance(tree, Mapping):
        raise ConfigError(f"{origin}: top level must be a mapping of sections")
    fields: dict[str, Any] = {}
    for section, values in tree.items():
        if not isinstance(values, Mapping):
            raise ConfigError(f"{origin}: {section} must be a mapping of fields, got {values!r}")
        fields.update({f"{section}.{name}": value for name, value in values.items()})
    return fields


def yaml_layer(path: str | Path) -> Layer:
    """A YAML file as a layer named after it."""
    try:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    return f"file {path}", _fields_of(loaded, str(path))


def overrides_layer(overrides: Sequence[str] | Mapping[str, Any]) -> Layer:
    """``["train.kimg=2", ...]`` (CLI style) or ``{"train.kimg": 2}`` as the "set" layer."""
    if isinstance(overrides, Mapping):
        return "set", dict(overrides)
    fields = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.field=value")
        key, raw = item.split("=", 1)
        # YAML parsing gives ints, floats, bools, null and lists their natural types.
        fields[key.strip()] = yaml.safe_load(raw) if raw != "" else ""
    return "set", fields


def build_config(*layers: Layer) -> SDSGConfig:
    """The one way to build a config: layers ``(name, {"section.field": value})`` applied over the built-in
    defaults in the order given (the CLI's: :data:`LAYERS`). The result remembers which layer set each field
    last (:meth:`SDSGConfig.source`), so derived values never replace something a user set, even to a
    default's value. Raises ConfigError naming each bad field."""
    tree: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for name, fields in layers:
        for key, value in fields.items():
            path = key.split(".")
            if len(path) != 2:
                raise ConfigError(f"{key}: settings are named section.field (e.g. train.kimg)")
            tree.setdefault(path[0], {})[path[1]] = value
            sources[key] = name
    try:
        config = SDSGConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err)) from None
    config._sources = sources
    return config


def load_config(
    path: str | Path | None = None,
    overrides: Sequence[str] | Mapping[str, Any] = (),
) -> SDSGConfig:
    """Defaults, then an optional YAML file, then dotted overrides (:func:`build_config`'s file and set
    layers). ``overrides`` is either ``["train.kimg=2", ...]`` or ``{"train.kimg": 2}``."""
    layers = ([yaml_layer(path)] if path is not None else []) + [overrides_layer(overrides)]
    return build_config(*layers)


def describe_config(config: SDSGConfig) -> str:
    """The resolved config as YAML; each value a layer set carries ``# <layer>``, each derived path
    ``# derived from pipeline.root`` (--print-config)."""
    lines = []
    for section, values in config.model_dump(mode="json").items():
        lines.append(f"{section}:")
        for name, value in values.items():
            text = yaml.safe_dump({name: value}, default_flow_style=True, width=10_000).strip()[1:-1]
            field = f"{section}.{name}"
            note = f"  # {config.source(field)}" if config.source(field) != DEFAULT_LAYER else ""
            lines.append(f"  {text}{note}")
    return "\n".join(lines) + "\n"


def dump_config(config: SDSGConfig) -> str:
    """YAML text of the full config (what a job actually ran with)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
