"""The per-step training logic and the loop around it (NVIDIA's ``training_loop.py``, without Ray).

``TrainingRun`` owns G, G_ema, D, E, their optimizers and the loss; ``step()`` runs the phases of one
iteration. Three stages share it: 'joint' (stage 1: G, D and E), 'generator' (stage 2: G and D) and
'encoder' (E alone against the frozen G_ema of ``train.checkpoint``, for a generator trained elsewhere).
``train.resume_from`` starts 'joint'/'generator' from another run's or an import's G, G_ema and D (NVIDIA's
``--resume``: transfer learning, kimg from 0). ``run_loop`` feeds it batches, logs, writes the checkpoint
artifacts (rank 0) and hands the training state to a ``report`` callback (Ray Train's, or a test's).

Reproducibility: the global torch RNG is re-seeded from (seed, step, rank) before every step and data
order is a function of (seed, step, rank), so step k is a pure function of (seed, k, state) and a
resumed run continues exactly as an uninterrupted one.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import random
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from tensorboardX import SummaryWriter
from torch import Tensor, nn

from sdsg_ray.artifacts.checkpoint import InferenceBundle, ModelDir, export_discriminator, export_inference, load_discriminator, load_inference
from sdsg_ray.config import ConfigError, ModelConfig, SDSGConfig
from sdsg_ray.imaging import encode_png, image_grid, to_uint8
from sdsg_ray.manifest import resolve_images
from sdsg_ray.models.networks import REDUCED_DTYPES, build_networks, reconstruct, set_reduced_precision
from sdsg_ray.pretrained import build_metric
from sdsg_ray.storage import Storage, get_storage, join
from sdsg_ray.training.data import ImageDataset, StepBatchSampler, seed_for, cache_fits, make_loader
from sdsg_ray.training.losses import SDSGLoss, Wrapped, ema_beta, lazy_regularization_adam

log = logging.getLogger(__name__)

STATE_FORMAT = "sdsg-train/1"
ADAM_BETAS = (0.0, 0.99)
SAMPLE_GRID = (4, 8)  # rows, columns of the G_ema sample grid
RECON_GRID_COLUMNS = 8  # images in the real | reconstruction grid (one row each)
RECON_EVAL_IMAGES = 64  # fixed real images behind the logged eval/recon_lpips

Wrap = Callable[[nn.Module], nn.Module]
Report = Callable[[dict[str, Any], Callable[[], dict[str, Any]] | None], None]


def _identity(module: nn.Module) -> nn.Module:
    return module


def _dist_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


# --- RNG state as plain tensors (weights_only loading accepts no numpy objects) -----------------


def _rng_state() -> dict[str, Any]:
    _, keys, pos, has_gauss, cached = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": py_version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss_next": py_gauss},
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"], np_state["has_gauss"], np_state["cached_gaussian"]))
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss_next"]))


@dataclass
class Phase:
    name: str
    modules: list[nn.Module]  # plain modules whose parameters this phase trains
    optimizers: list[torch.optim.Optimizer]
    interval: int  # runs on steps where step % interval == 0; gain = interval


def start_checkpoint(config: SDSGConfig) -> str | None:
    """The checkpoint a run starts from: the frozen generator of stage 'encoder', or ``train.resume_from``."""
    tc = config.train
    return tc.checkpoint if tc.stage == "encoder" else tc.resume_from


def with_checkpoint_model(config: SDSGConfig) -> SDSGConfig:
    """``config`` with the model section of the checkpoint the run starts from (unchanged when there is none).

    The networks are that checkpoint's, so its architecture wins over the defaults; a model field that a
    layer (flag, --set, YAML) set to another value is a ConfigError rather than silently ignored."""
    uri = start_checkpoint(config)
    if uri is None:
        return config
    stored = load_inference(uri, get_storage(config.storage)).model
    conflicts = [f"model.{name}={getattr(config.model, name)!r} (checkpoint: {getattr(stored, name)!r})"
                 for name in ModelConfig.model_fields
                 if config.is_set(f"model.{name}") and getattr(config.model, name) != getattr(stored, name)]
    if conflicts:
        raise ConfigError(f"{uri} holds another model than configured: {', '.join(conflicts)}; "
                          "leave the model section unset, it comes from the checkpoint")
    if stored != config.model:
        log.info("model section taken from %s: %s", uri, stored.model_dump(mode="json"))
    return config.model_copy(update={"model": stored})


class TrainingRun:
    """Networks, optimizers and loss of one run; ``step(real)`` performs one training iteration.

    ``wrap`` turns each trained module into its distributed version (Ray's ``prepare_model``); the
    plain modules stay reachable here for EMA, checkpoints and export. Stage 'encoder' has no live G and
    no D (``self.G``, ``self.D`` are None): E trains against ``G_ema``, loaded from ``train.checkpoint``
    and never updated. Its config's model section must be the checkpoint's (:func:`with_checkpoint_model`).
    """

    def __init__(self, config: SDSGConfig, device: torch.device | str = "cpu", wrap: Wrap = _identity,
                 world_size: int = 1, metric: nn.Module | None = None, reduced_precision: bool | None = None):
        """``reduced_precision``: run the model section's precision policy (None: on CUDA when
        ``train.mixed_precision``; True also on CPU, where bf16 works: tests and ``gpu_check --tiny``)."""
        tc, model = config.train, config.model
        self.config = config
        self.device = torch.device(device)
        if tc.batch_size % world_size:
            raise ValueError(f"train.batch_size={tc.batch_size} must be divisible by train.workers={world_size}")
        self.local_batch = tc.batch_size // world_size
        cuda = self.device.type == "cuda"
        if reduced_precision is None:
            reduced_precision = cuda and tc.mixed_precision
        self.reduced_dtype = REDUCED_DTYPES[model.precision_dtype] if reduced_precision else None
        self.amp = cuda and self.reduced_dtype is not None  # channels_last goes with it on CUDA

        torch.manual_seed(tc.seed)  # identical initial weights on every rank (DDP also broadcasts them)
        # Built from the seed in every stage, so a fresh E starts where the joint stage's E would.
        G, D, E = build_networks(model)
        encoder_only = tc.stage == "encoder"
        self.start = self._load_start(G, D, config) if start_checkpoint(config) else None
        self.G = G.to(self.device) if not encoder_only else None
        self.D = D.to(self.device) if not encoder_only else None
        self.E = E.to(self.device) if tc.stage != "generator" else None
        if self.amp:
            for module in (self.G.synthesis if self.G is not None else None, self.D, self.E):
                if module is not None:
                    module.to(memory_format=torch.channels_last)
        if encoder_only:  # the frozen generator E learns to invert
            self.G_ema = self.start.G_ema.to(self.device).eval().requires_grad_(False)
        else:
            self.G_ema = copy.deepcopy(self.G).eval().requires_grad_(False)  # float32: grids, eval, export
            if self.start is not None:
                self.G_ema.load_state_dict(self.start.G_ema.state_dict())
        if self.E is not None:
            # E outputs w_avg + offset: start it at the generator's mean latent (zeros for a fresh G).
            self.E.w_avg.copy_((self.G if self.G is not None else self.G_ema).mapping.w_avg)
        # E_ema follows E as G_ema follows G (same beta): scoring can then use a pair trained together.
        self.E_ema = copy.deepcopy(self.E).eval().requires_grad_(False) if self.E is not None else None
        self.reduced_blocks = {
            name: set_reduced_precision(module, self.reduced_dtype)
            for name, module in (("G", self.G), ("D", self.D), ("E", self.E)) if module is not None
        }

        if encoder_only:
            # G_ema stays float32 for grids and export; the loss runs a reduced-precision copy when the
            # policy asks for one (it is frozen: no gradients, no DDP wrapper, no sync).
            frozen = self.G_ema
            if self.reduced_dtype is not None:
                frozen = copy.deepcopy(self.G_ema)
                set_reduced_precision(frozen, self.reduced_dtype)
                if self.amp:
                    frozen.synthesis.to(memory_format=torch.channels_last)
            wrapped = Wrapped(mapping=frozen.mapping, synthesis=frozen.synthesis, D=None, E=wrap(self.E))
        else:
            wrapped = Wrapped(mapping=wrap(self.G.mapping), synthesis=wrap(self.G.synthesis), D=wrap(self.D),
                              E=wrap(self.E) if self.E is not None else None)
        for module in (self.G, self.D, self.E):
            if module is not None:
                module.requires_grad_(False)  # each phase enables only what it trains

        self.opt_E = torch.optim.Adam(self.E.parameters(), lr=tc.lr_e, betas=ADAM_BETAS, eps=1e-8) if self.E is not None else None
        if encoder_only:
            self.opt_G = self.opt_D = None
            self.phases = [Phase("Emain", [self.E], [self.opt_E], 1)]
        else:
            g_interval = tc.pl_interval if tc.pl_weight > 0 else None
            d_interval = tc.r1_interval if tc.r1_gamma > 0 else None
            lr_g, betas_g = lazy_regularization_adam(tc.lr_g, ADAM_BETAS, g_interval)
            lr_d, betas_d = lazy_regularization_adam(tc.lr_d, ADAM_BETAS, d_interval)
            self.opt_G = torch.optim.Adam(self.G.parameters(), lr=lr_g, betas=betas_g, eps=1e-8)
            self.opt_D = torch.optim.Adam(self.D.parameters(), lr=lr_d, betas=betas_d, eps=1e-8)
            self.phases = [Phase("Gmain", [self.G] + ([self.E] if self.E is not None else []), [self.opt_G] + ([self.opt_E] if self.opt_E else []), 1)]
            if g_interval:
                self.phases.append(Phase("Greg", [self.G], [self.opt_G], g_interval))
            self.phases.append(Phase("Dmain", [self.D], [self.opt_D], 1))
            if d_interval:
                self.phases.append(Phase("Dreg", [self.D], [self.opt_D], d_interval))

        self.metric = metric
        self.loss = SDSGLoss(wrapped, self.G_ema.num_ws, metric=metric if self.E is not None else None,
                             r1_gamma=tc.r1_gamma, pl_weight=tc.pl_weight, style_mixing_prob=tc.style_mixing_prob,
                             lambda_w=tc.lambda_w, lambda_l1=tc.lambda_l1, lambda_lpips=tc.lambda_lpips)
        self.loss.pl_mean.to(self.device)
        self.step_count = 0
        self.nimg = 0

    def _load_start(self, G: nn.Module, D: nn.Module, config: SDSGConfig) -> InferenceBundle:
        """The checkpoint the run starts from (:func:`start_checkpoint`); for ``train.resume_from`` its live G
        (G_ema when the bundle has none, e.g. a stage-2 export) and its D are loaded into ``G`` and ``D``."""
        uri = start_checkpoint(config)
        storage = get_storage(config.storage)
        bundle = load_inference(uri, storage)
        if bundle.model != config.model:
            raise ConfigError(f"{uri} holds another model than config.model; build the config with "
                              "with_checkpoint_model() (sdsg train does)")
        if config.train.stage != "encoder":
            if bundle.G is None:
                log.warning("%s has no live G: fine-tuning starts G from its G_ema", uri)
            G.load_state_dict((bundle.G if bundle.G is not None else bundle.G_ema).state_dict())
            D.load_state_dict(load_discriminator(uri, storage).state_dict())
        log.info("starting from %s (identity %s, %s)", uri, bundle.identity, bundle.meta.get("stage", "?"))
        return bundle

    def start_meta(self) -> dict[str, Any]:
        """Where the run's starting weights came from (inference.pt's meta and the training state)."""
        if self.start is None:
            return {}
        key = "generator" if self.config.train.stage == "encoder" else "resumed_from"
        return {key: {"uri": start_checkpoint(self.config), "identity": self.start.identity}}

    @property
    def kimg(self) -> float:
        return self.nimg / 1000.0

    # --- one iteration ----------------------------------------------------------------------

    def to_images(self, batch_uint8: Tensor) -> Tensor:
        """uint8 NHWC from the loader -> float NCHW in [-1, 1] on the device (converted after transfer)."""
        x = batch_uint8.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        return x.contiguous(memory_format=torch.channels_last) if self.amp else x.contiguous()

    def step(self, real_uint8: Tensor) -> dict[str, Tensor]:
        """One iteration: every phase due at this step, then the EMA. Returns detached loss terms."""
        rank, _ = _dist_world()
        torch.manual_seed(seed_for(self.config.train.seed, self.step_count, rank))
        real = self.to_images(real_uint8)
        assert real.shape[0] == self.local_batch, f"batch of {real.shape[0]}, expected {self.local_batch}"
        logs: dict[str, Tensor] = {}
        for phase in self.phases:
            if self.step_count % phase.interval:
                continue
            gen_z = torch.randn(self.local_batch, self.G_ema.z_dim, device=self.device)
            for module in phase.modules:
                module.requires_grad_(True)
            for opt in phase.optimizers:
                opt.zero_grad(set_to_none=True)
            logs.update(self.loss.accumulate_gradients(phase.name, real, gen_z, gain=phase.interval))
            for module in phase.modules:
                module.requires_grad_(False)
                for param in module.parameters():
                    if param.grad is not None:  # NVIDIA's guard: one bad batch must not poison the weights
                        torch.nan_to_num(param.grad, nan=0, posinf=1e5, neginf=-1e5, out=param.grad)
            for opt in phase.optimizers:
                opt.step()
        # Every phase updated w_avg with its local batch; the updates are linear in the batch means and
        # identical in weight on every rank, so one average at the end equals averaging after each.
        self._sync_w_avg()
        self._update_ema()
        self.step_count += 1
        self.nimg += self.config.train.batch_size
        return logs

    @torch.no_grad()
    def _sync_w_avg(self) -> None:
        """Average the tracked mean latent over ranks (= the global batch's update) and hand it to E,
        whose output is w_avg + offset (see ``Encoder``). Stage 'encoder': G is frozen, nothing moves."""
        if self.G is None:
            return
        w_avg = self.G.mapping.w_avg
        _, world = _dist_world()
        if world > 1:
            torch.distributed.all_reduce(w_avg)
            w_avg /= world
        if self.E is not None:
            self.E.w_avg.copy_(w_avg)

    @torch.no_grad()
    def _update_ema(self) -> None:
        tc = self.config.train
        beta = ema_beta(tc.batch_size, tc.ema_kimg, self.nimg, tc.ema_rampup)  # nimg: before this step's
        # A G fine-tuned from train.resume_from keeps G_ema's history (NVIDIA turns the ramp-up off with
        # --resume); a fresh E still ramps up.
        beta_G = ema_beta(tc.batch_size, tc.ema_kimg, self.nimg, None) if tc.resume_from else beta
        for ema, live, beta in ((self.G_ema, self.G, beta_G), (self.E_ema, self.E, beta)):
            if ema is None or live is None:
                continue
            for p_ema, p in zip(ema.parameters(), live.parameters()):
                p_ema.copy_(p.detach().lerp(p_ema, beta))
            for b_ema, b in zip(ema.buffers(), live.buffers()):
                b_ema.copy_(b.detach())

    # --- state -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue bit-exactly; loadable with torch.load(weights_only=True)."""
        cpu = lambda module: {k: v.detach().cpu() for k, v in module.state_dict().items()} if module is not None else None  # noqa: E731
        state = lambda opt: opt.state_dict() if opt is not None else None  # noqa: E731
        return {
            "format": STATE_FORMAT, "config": self.config.model_dump(mode="json"), "start": self.start_meta(),
            "step": self.step_count, "nimg": self.nimg,
            **{name: cpu(getattr(self, name)) for name in ("G", "G_ema", "D", "E", "E_ema")},
            **{name: state(getattr(self, name)) for name in ("opt_G", "opt_D", "opt_E")},
            "pl_mean": self.loss.pl_mean.value.detach().cpu(), "rng": _rng_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a training state of format {STATE_FORMAT}: {state.get('format')!r}")
        saved = state["config"]
        mine = self.config.model_dump(mode="json")
        saved_model = ModelConfig.model_validate(saved["model"]).model_dump(mode="json")  # fields added since: defaults
        if saved_model != mine["model"] or saved["train"]["stage"] != mine["train"]["stage"]:
            raise ValueError("the checkpoint under train.out was trained with another model or stage: "
                             f"saved model={saved['model']} stage={saved['train']['stage']}, "
                             f"now model={mine['model']} stage={mine['train']['stage']}; use a fresh --out")
        if state.get("start", {}) != self.start_meta():
            raise ValueError(f"the checkpoint under train.out started from {state.get('start')}, this run from "
                             f"{self.start_meta()}; use a fresh --out")
        self.G_ema.load_state_dict(state["G_ema"])
        if self.G is not None:
            self.G.load_state_dict(state["G"])
            self.D.load_state_dict(state["D"])
            self.opt_G.load_state_dict(state["opt_G"])
            self.opt_D.load_state_dict(state["opt_D"])
        if self.E is not None:
            self.E.load_state_dict(state["E"])
            self.opt_E.load_state_dict(state["opt_E"])
            if state.get("E_ema") is not None:
                self.E_ema.load_state_dict(state["E_ema"])
            else:  # a state saved before E_ema existed
                log.warning("training state has no E_ema (saved by an older version): E_ema starts as a copy of E")
                self.E_ema.load_state_dict(state["E"])
        self.loss.pl_mean.value.copy_(state["pl_mean"])
        self.step_count, self.nimg = int(state["step"]), int(state["nimg"])
        # Steps re-seed torch themselves; restoring the rest keeps any other consumer of these RNGs
        # (user hooks, libraries) on the same sequence as an uninterrupted run.
        _set_rng_state(state["rng"])

    # --- evaluation ------------------------------------------------------------------------

    def scoring_pair(self) -> tuple[nn.Module, nn.Module]:
        """(G, E) that scoring will use (``score.pair``): (G_ema, E_ema) or the live (G, E); stage 'encoder'
        trains E against G_ema, which is then also the live pair's G."""
        assert self.E is not None, "stage 'generator' has no encoder"
        return (self.G_ema, self.E_ema) if self.config.score.pair == "ema" else (self.trained_against(), self.E)

    def trained_against(self) -> nn.Module:
        """The G that E's reconstruction terms ran through: the live G, or the frozen G_ema (stage 'encoder')."""
        return self.G if self.G is not None else self.G_ema

    @torch.no_grad()
    def reconstruct(self, real: Tensor) -> Tensor:
        """G(E(x)) with the scoring pair: what scoring computes from the inference bundle."""
        G, E = self.scoring_pair()
        return reconstruct(G.synthesis, E, real).image

    def export_inference(self, meta: dict, uri: str, storage) -> str:
        """Write inference.pt: G_ema, E, and with an encoder also E_ema and the G E was trained against (both
        scoring pairs; for stage 'encoder' that G is G_ema itself)."""
        return export_inference(self.G_ema, self.E, self.config.model, {**self.start_meta(), **meta}, uri, storage,
                                G_live=self.trained_against() if self.E is not None else None, E_ema=self.E_ema)

    def export_discriminator(self, uri: str, storage) -> str | None:
        """Write discriminator.pt beside inference.pt, so ``train.resume_from`` can fine-tune from this run."""
        return export_discriminator(self.D, self.config.model, uri, storage) if self.D is not None else None

    @torch.no_grad()
    def recon_lpips(self, real: Tensor, batch: int = 32) -> float:
        assert self.metric is not None
        total = sum(float(self.metric(x, self.reconstruct(x)).sum()) for x in real.split(batch))
        return total / real.shape[0]

    def param_checksum(self) -> float:
        """Sum over every trained parameter (float64): identical on all DDP replicas after a step."""
        return float(sum(p.detach().double().sum() for m in (self.G, self.D, self.E) if m is not None for p in m.parameters()))


# --- the loop --------------------------------------------------------------------------------


@dataclass
class _Window:
    """Losses and throughput since the last report."""

    terms: dict[str, list[Tensor]] = field(default_factory=dict)
    steps: int = 0
    skipped: int = 0
    started: float = field(default_factory=time.perf_counter)

    def add(self, logs: dict[str, Tensor], skipped: int) -> None:
        for k, v in logs.items():
            self.terms.setdefault(k, []).append(v)
        self.steps += 1
        self.skipped += skipped

    def means(self) -> dict[str, float]:
        return {k: float(torch.stack(v).float().mean()) for k, v in self.terms.items()}


def load_dataset(config: SDSGConfig, storage: Storage, progress: bool) -> ImageDataset:
    tc = config.train
    uris = resolve_images(tc.data, storage)
    if not uris:
        raise ValueError(f"train.data={tc.data!r} holds no images")
    cache = cache_fits(len(uris), config.model.resolution, tc.cache_max_mb)
    return ImageDataset(uris, config.model.resolution, storage, cache=cache, progress=progress)


class _TensorBoard:
    """TensorBoard event files under ``<out>/tensorboard/``, so ``tensorboard --logdir <out>`` works on a run
    as StyleGAN2 users expect. tensorboardX writes them into a local directory; they are copied to storage
    (local or S3) at every metrics flush. A resumed run adds its own event file; TensorBoard merges them."""

    DIR = "tensorboard"

    def __init__(self, storage: Storage, out: str) -> None:
        self.storage, self.out = storage, out
        self.local = tempfile.mkdtemp(prefix="sdsg-tensorboard-")
        self.writer = SummaryWriter(self.local, flush_secs=3600)

    def add(self, metrics: dict[str, Any]) -> None:
        for name, value in metrics.items():
            if name != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(name, value, metrics["step"])

    def upload(self) -> None:
        self.writer.flush()
        for name in sorted(os.listdir(self.local)):
            with open(os.path.join(self.local, name), "rb") as f:
                self.storage.write_bytes(join(self.out, self.DIR, name), f.read())


class _Artifacts:
    """Rank 0's outputs under ``train.out``: grids, metrics.jsonl, TensorBoard events, inference.pt."""

    def __init__(self, run: TrainingRun, dataset: ImageDataset, storage: Storage, out: str, metric_name: str | None):
        self.run, self.storage, self.out, self.metric_name = run, storage, out, metric_name
        rows, cols = SAMPLE_GRID
        gen = torch.Generator().manual_seed(run.config.train.seed)
        self.z = torch.randn(rows * cols, run.G_ema.z_dim, generator=gen).to(run.device)
        n_eval = min(RECON_EVAL_IMAGES, len(dataset))
        self.real = torch.stack([dataset[i][0] for i in range(n_eval)]) if run.E is not None else None
        self.pending: list[dict[str, Any]] = []
        self.tensorboard = _TensorBoard(storage, out)

    def eval_metrics(self) -> dict[str, float]:
        if self.run.E is None:
            return {}
        return {"eval/recon_lpips": self.run.recon_lpips(self.run.to_images(self.real))}

    def write(self) -> None:
        run, storage, out = self.run, self.storage, self.out
        name = f"kimg-{run.kimg:010.3f}.png"  # zero-padded: names sort by training time (fractional kimg at tiny scale)
        if run.G is not None:  # stage 'encoder': G is frozen, its samples never change
            with torch.no_grad():
                grid = image_grid(to_uint8(run.G_ema(self.z, noise_mode="const")), ncols=SAMPLE_GRID[1])
            storage.write_bytes(join(out, "samples", name), encode_png(grid))
        if run.E is not None:
            real = run.to_images(self.real[:RECON_GRID_COLUMNS])
            pair = torch.cat([real, run.reconstruct(real)])
            storage.write_bytes(join(out, "recon", name), encode_png(image_grid(to_uint8(pair), ncols=real.shape[0])))
        self._flush_metrics()
        meta = {"stage": run.config.train.stage, "step": run.step_count, "kimg": run.kimg, "metric": self.metric_name,
                "seed": run.config.train.seed}  # the untrained-network control rebuilds the initialisation from it
        run.export_inference(meta, ModelDir(out).inference, storage)
        run.export_discriminator(out, storage)

    def _flush_metrics(self) -> None:
        """Append the pending lines. Lines at or after the first pending step are dropped first: they
        come from an attempt that died after an unregistered checkpoint and are being replayed."""
        if not self.pending:
            return
        uri = join(self.out, "metrics.jsonl")
        first = self.pending[0]["step"]
        lines = []
        if self.storage.exists(uri):
            lines = [l for l in self.storage.read_text(uri).splitlines() if l.strip() and json.loads(l)["step"] < first]
        lines += [json.dumps(m) for m in self.pending]
        self.storage.write_text(uri, "\n".join(lines) + "\n")
        for metrics in self.pending:
            self.tensorboard.add(metrics)
        self.tensorboard.upload()
        self.pending = []


def _format_log(metrics: dict[str, Any]) -> str:
    losses = " ".join(f"{k.split('/', 1)[1]}={v:.4f}" for k, v in metrics.items() if k.startswith("loss/"))
    extra = f" eval_recon_lpips={metrics['eval/recon_lpips']:.4f}" if "eval/recon_lpips" in metrics else ""
    return (f"step {metrics['step']} kimg {metrics['kimg']:.3f} | {losses}{extra} | "
            f"{metrics.get('images_per_s_per_worker', 0.0):.1f} img/s/worker")


def run_loop(config: SDSGConfig, *, device: torch.device | str = "cpu", wrap: Wrap = _identity,
             resume: dict[str, Any] | None = None, report: Report | None = None) -> dict[str, Any]:
    """Train until ``train.kimg``; returns a summary (step, kimg, out, inference URI, last metrics).

    ``report(metrics, make_state)`` is called on every rank at every log point (``make_state`` is
    None except at checkpoints, where calling it returns ``TrainingRun.state_dict()``).
    """
    config = with_checkpoint_model(config)
    tc = config.train
    rank, world_size = _dist_world()
    if tc.threads_per_worker:
        torch.set_num_threads(tc.threads_per_worker)
    storage = get_storage(config.storage)
    dataset = load_dataset(config, storage, progress=rank == 0)
    metric = build_metric(tc.metric, device=device) if tc.stage != "generator" else None
    run = TrainingRun(config, device, wrap, world_size, metric=metric)
    if resume is not None:
        run.load_state_dict(resume)
        log.info("resumed at step %d (kimg %.3f)", run.step_count, run.kimg)
    artifacts = _Artifacts(run, dataset, storage, tc.out, getattr(metric, "name", None)) if rank == 0 else None
    report = report or (lambda metrics, make_state: None)

    total_steps = max(1, math.ceil(tc.kimg * 1000 / tc.batch_size))
    checkpoint_every = max(1, round(tc.checkpoint_every_kimg * 1000 / tc.batch_size))
    inference_uri = ModelDir(tc.out).inference
    last: dict[str, Any] = {}
    if run.step_count == 0:  # the starting point, for before/after comparisons
        last = {"step": 0, "kimg": 0.0, **(artifacts.eval_metrics() if artifacts else {})}
        if artifacts:
            artifacts.pending.append(last)
            log.info(_format_log(last))
        report(last, None)
    if run.step_count >= total_steps:
        return {"step": run.step_count, "kimg": run.kimg, "out": tc.out, "inference": inference_uri, "metrics": last}

    sampler = StepBatchSampler(len(dataset), tc.batch_size, rank, world_size, tc.seed, run.step_count, total_steps - run.step_count)
    loader = make_loader(dataset, sampler, tc.data_workers, pin_memory=run.device.type == "cuda")
    window = _Window()
    for real, skipped in loader:
        window.add(run.step(real), int(skipped.sum()))
        done = run.step_count
        checkpoint = done % checkpoint_every == 0 or done == total_steps
        if not (checkpoint or done % tc.log_every == 0):
            continue
        elapsed = max(time.perf_counter() - window.started, 1e-9)
        metrics: dict[str, Any] = {
            "step": done,
            "kimg": run.kimg,
            "kimg_per_s": window.steps * tc.batch_size / 1000.0 / elapsed,
            "images_per_s_per_worker": window.steps * run.local_batch / elapsed,
            "data/skipped_images": window.skipped,
            **window.means(),
        }
        if world_size > 1:
            checksums = [None] * world_size
            torch.distributed.all_gather_object(checksums, run.param_checksum())
            metrics["replica_checksums"] = checksums
        if checkpoint and artifacts:
            metrics.update(artifacts.eval_metrics())
        if artifacts:
            artifacts.pending.append(metrics)
            log.info(_format_log(metrics))
            if checkpoint:
                artifacts.write()
        report(metrics, run.state_dict if checkpoint else None)
        last, window = metrics, _Window()
    log.info("finished at step %d (kimg %.3f); inference bundle: %s", run.step_count, run.kimg, inference_uri)
    return {"step": run.step_count, "kimg": run.kimg, "out": tc.out, "inference": inference_uri, "metrics": last}
