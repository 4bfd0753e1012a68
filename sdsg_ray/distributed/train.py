"""Ray Train wiring for ``sdsg train`` (thin: the training itself is ``sdsg_ray.training.loop``).

One TorchTrainer worker per ``train.workers``; each wraps the modules its stage trains with ``prepare_model``
(DDP when there are several workers), reports every ``log_every`` steps and attaches the training state at
every checkpoint (rank 0 only; ``report`` is a barrier on every rank). Ray Train keeps the run state under
``<out>/ray``: a failed worker group restarts from the latest checkpoint (``FailureConfig.max_failures``),
and ``run_training`` again with the same ``--out`` resumes the run (same ``RunConfig`` name and path).
"""

from __future__ import annotations

import logging
import signal
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable

import ray.train
import ray.train.torch
import torch
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from sdsg_ray.artifacts.checkpoint import ModelDir
from sdsg_ray.config import SDSGConfig
from sdsg_ray.manifest import is_manifest, list_images
from sdsg_ray.ray_utils import ensure_ray, worker_env
from sdsg_ray.storage import ObjectNotFound, get_storage, join, normalize
from sdsg_ray.training.loop import run_loop, with_checkpoint_model

log = logging.getLogger(__name__)

RUN_NAME = "ray"  # Ray Train's run directory under --out
STATE_FILE = "state.pt"


def _absolute_uris(config: SDSGConfig) -> SDSGConfig:
    """Local paths made absolute on the driver: Ray workers run in other working directories
    (``normalize`` leaves s3:// URIs as they are)."""
    tc = config.train
    update = {"data": normalize(tc.data), "out": normalize(tc.out)}
    update.update({name: normalize(getattr(tc, name)) for name in ("checkpoint", "resume_from") if getattr(tc, name)})
    return config.model_copy(update={"train": tc.model_copy(update=update)})  # keeps which layer set what


def _train_worker(loop_config: dict[str, Any]) -> dict[str, Any]:
    """The per-worker function: resume from Ray's latest checkpoint, then the library loop."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = SDSGConfig.model_validate(loop_config["config"])
    torch.set_num_threads(config.train.threads_per_worker or config.train.cpus_per_worker)
    rank = ray.train.get_context().get_world_rank()
    device = ray.train.torch.get_device()

    resume = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            resume = torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=True)

    def wrap(module: torch.nn.Module) -> torch.nn.Module:
        # broadcast_buffers=False as in NVIDIA's loop: buffers (w_avg, noise) are not per-step state
        # to copy from rank 0; w_avg is averaged explicitly by the loop.
        return ray.train.torch.prepare_model(module, parallel_strategy_kwargs={"broadcast_buffers": False})

    def report(metrics: dict[str, Any], make_state: Callable[[], dict[str, Any]] | None) -> None:
        if make_state is None:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as directory:
            checkpoint = None
            if rank == 0:
                torch.save(make_state(), Path(directory) / STATE_FILE)
                checkpoint = ray.train.Checkpoint.from_directory(directory)
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"checkpoint-{metrics['step']:09d}")

    return run_loop(config, device=device, wrap=wrap, resume=resume, report=report)


def _check_data(config: SDSGConfig) -> None:
    """Fail on the driver, before any worker starts, when train.data holds nothing to train on (one HEAD
    request for a manifest, the first page of a listing otherwise)."""
    storage = get_storage(config.storage)
    data = config.train.data
    if not is_manifest(data, storage) and next(iter(list_images(data, storage)), None) is None:
        raise ObjectNotFound(f"{data}: no images and no manifest here (train.data)")


def build_trainer(config: SDSGConfig):
    """The TorchTrainer for ``config`` (exposed so tests and tools can inspect it)."""
    tc = config.train
    use_gpu = tc.gpus_per_worker > 0
    resources = {"CPU": tc.cpus_per_worker, **({"GPU": tc.gpus_per_worker} if use_gpu else {})}
    filesystem, storage_path = get_storage(config.storage).arrow_filesystem(tc.out)
    env = worker_env(config.storage)
    return TorchTrainer(
        _train_worker,
        train_loop_config={"config": config.model_dump(mode="json")},
        scaling_config=ScalingConfig(num_workers=tc.workers, use_gpu=use_gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(
            name=RUN_NAME,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            checkpoint_config=CheckpointConfig(num_to_keep=tc.num_to_keep),
            failure_config=FailureConfig(max_failures=tc.max_failures),
            worker_runtime_env={"env_vars": env} if env else None,
        ),
    )


def run_training(config: SDSGConfig) -> dict[str, Any]:
    """``sdsg train``: fit (or resume) the run under ``train.out``; returns its summary."""
    config = with_checkpoint_model(_absolute_uris(config))  # fails here, before Ray starts, on a bad checkpoint
    _check_data(config)
    ensure_ray(config.storage)
    tc = config.train
    log.info("training stage=%s on %s -> %s: %d worker(s), %.1f kimg, batch %d",
             tc.stage, tc.data, tc.out, tc.workers, tc.kimg, tc.batch_size)
    # fit() installs Ray Train's SIGINT handler (Ctrl-C aborts the run) and leaves it installed: a later Ctrl-C
    # in this process, such as the demo's sampler, would only "abort" the finished run. The caller's comes back.
    caller_sigint = signal.getsignal(signal.SIGINT)
    try:
        result = build_trainer(config).fit()
    finally:
        if threading.current_thread() is threading.main_thread():  # signal.signal works there only
            signal.signal(signal.SIGINT, caller_sigint)
    if result.error is not None:
        raise result.error
    summary = dict(result.return_value or {})
    summary.setdefault("out", tc.out)
    summary.setdefault("inference", ModelDir(tc.out).inference)
    # As a URI of the project's storage (Ray gives a path inside its filesystem, no s3:// scheme).
    checkpoint = result.checkpoint
    summary["checkpoint"] = join(tc.out, RUN_NAME, Path(checkpoint.path).name) if checkpoint is not None else None
    log.info("training finished at step %s (kimg %.3f); inference bundle: %s", summary.get("step"),
             summary.get("kimg", 0), summary["inference"])
    return summary


