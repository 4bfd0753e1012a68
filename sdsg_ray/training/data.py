"""Training images from any storage URI, in an order that is a pure function of (seed, step, rank).

The global batch of step k is positions [k*B, (k+1)*B) of an endless stream made of one random
permutation of the dataset per epoch (permutation e seeded by (seed, e)); rank r of W takes the r-th
contiguous slice of B/W. So every rank sees a disjoint part of the same global batch, and a run resumed
at step k reads exactly the batches an uninterrupted run would, whatever happened before.

Images are URIs or sample addresses inside webdataset/parquet shards (sdsg_ray.shards). Small sets are
decoded once into memory (the demo's 2000 images at 32 px are 6 MB); larger ones are read through Storage
in DataLoader worker processes. Unreadable images never stop training: cached, they are dropped at load
time; streamed, the next readable index stands in (deterministic) and the skip is counted in the batch.
"""

from __future__ import annotations

import logging
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from sdsg_ray.errors import InvalidRequest
from sdsg_ray.imaging import decode_image, load_batch
from sdsg_ray.shards import read_bytes
from sdsg_ray.storage import Storage

log = logging.getLogger(__name__)

LOAD_CHUNK = 512  # images decoded per thread-pool call while filling the cache
FAILURES_LOGGED = 5


class NoTrainingImages(InvalidRequest):
    """The data URI resolved to no readable image."""


def seed_for(*parts: int) -> int:
    """A 63-bit seed that depends on every part (SeedSequence mixes them; no collisions like seed+epoch)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1))


class ImageDataset(Dataset):
    """uint8 HWC images at ``resolution`` from a list of URIs; item = (image tensor, images skipped).

    ``cache=True`` decodes everything up front and keeps only the readable images (the others are in
    ``self.failed``). ``cache=False`` reads on demand: a failing index i is replaced by i+1, i+2, ...
    """

    def __init__(self, uris: list[str], resolution: int, storage: Storage, cache: bool, threads: int = 8, progress: bool = False):
        if not uris:
            raise NoTrainingImages("no image URIs to train on")
        self.resolution = resolution
        self.storage = storage
        self.failed: dict[str, str] = {}  # uri -> error, from the cache fill
        self.cached: np.ndarray | None = None
        self.uris = list(uris)
        if cache:
            self._fill_cache(threads, progress)

    def _fill_cache(self, threads: int, progress: bool) -> None:
        kept_uris: list[str] = []
        kept_images: list[np.ndarray] = []
        with tqdm(total=len(self.uris), desc="decode training images", unit="img", disable=not progress) as bar:
            for start in range(0, len(self.uris), LOAD_CHUNK):
                batch = load_batch(self.uris[start : start + LOAD_CHUNK], self.storage, self.resolution, threads)
                ok = batch["status"] == "ok"
                kept_images.append(batch["image"][ok])
                kept_uris.extend(batch["key"][ok].tolist())
                self.failed.update(zip(batch["key"][~ok], batch["error"][~ok]))
                bar.update(len(ok))
        if self.failed:
            shown = "; ".join(f"{k}: {e}" for k, e in list(self.failed.items())[:FAILURES_LOGGED])
            log.warning("skipped %d unreadable training images (first: %s)", len(self.failed), shown)
        if not kept_uris:
            raise NoTrainingImages(f"none of the {len(self.uris)} images could be decoded (first: {shown})")
        self.uris = kept_uris
        self.cached = np.concatenate(kept_images)

    def __len__(self) -> int:
        return len(self.uris)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if self.cached is not None:
            return torch.from_numpy(self.cached[index]), 0
        for skipped in range(len(self.uris)):
            uri = self.uris[(index + skipped) % len(self.uris)]
            try:
                decoded = decode_image(read_bytes(uri, self.storage), self.resolution)
            except Exception as err:  # a missing/denied object is one bad image, not a failed run
                log.warning("skipping %s: read failed: %s", uri, err)
                continue
            if decoded.status == "ok":
                return torch.from_numpy(decoded.image.copy()), skipped
            log.warning("skipping %s: %s", uri, decoded.error)
        raise NoTrainingImages(f"none of the {len(self.uris)} images could be decoded")


class StepBatchSampler(Sampler[list[int]]):
    """Yields rank ``rank``'s indices for steps ``start_step, start_step+1, ...`` (see module docstring)."""

    def __init__(self, n: int, global_batch: int, rank: int, world_size: int, seed: int, start_step: int = 0, num_steps: int | None = None):
        if global_batch % world_size:
            raise ValueError(f"train.batch_size={global_batch} must be divisible by train.workers={world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of {world_size}")
        self.n, self.global_batch, self.rank, self.world_size = n, global_batch, rank, world_size
        self.local_batch = global_batch // world_size
        self.seed, self.start_step, self.num_steps = seed, start_step, num_steps
        self._epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, np.random.default_rng(seed_for(self.seed, epoch)).permutation(self.n)
        return self._perm

    def indices(self, step: int) -> list[int]:
        """Rank-local indices of global batch ``step``."""
        first = step * self.global_batch + self.rank * self.local_batch
        return [int(self._permutation(pos // self.n)[pos % self.n]) for pos in range(first, first + self.local_batch)]

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start_step
        while self.num_steps is None or step < self.start_step + self.num_steps:
            yield self.indices(step)
            step += 1

    def __len__(self) -> int:
        if self.num_steps is None:
            raise TypeError("endless sampler has no length")
        return self.num_steps


def make_loader(dataset: ImageDataset, sampler: StepBatchSampler, num_workers: int,
                pin_memory: bool = False) -> DataLoader:
    """Batches of (uint8 [b, R, R, 3], skipped [b]); worker processes only when reading lazily."""
    workers = 0 if dataset.cached is not None else num_workers
    return DataLoader(dataset, batch_sampler=sampler, num_workers=workers, pin_memory=pin_memory)


def cache_fits(num_images: int, resolution: int, cache_max_mb: float) -> bool:
    """Whether the decoded set (uint8 RGB) fits the in-memory cache budget."""
    return num_images * resolution * resolution * 3 <= cache_max_mb * 2**20
