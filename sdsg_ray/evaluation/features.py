"""Features for the distances (:func:`sdsg_ray.pretrained.build_fid_features`): of real image sets, read once
per set, and of a sampler's images (the truncation Sampler, the same code path as the HTTP service)."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from tqdm import tqdm

from sdsg_ray.imaging import load_batch, to_tensor
from sdsg_ray.manifest import resolve_images
from sdsg_ray.pretrained import FeatureExtractor
from sdsg_ray.storage import ObjectNotFound, Storage
from sdsg_ray.truncation.modes import SampleSpec

log = logging.getLogger(__name__)


@dataclass
class FeatureBank:
    """Features of real image sets, computed once per set URI (X is the reference of every model)."""

    extractor: FeatureExtractor
    storage: Storage
    resolution: int  # the side images are read at (the generator's)
    max_real: int | None  # at most this many images per set, a seeded sample (None: all)
    seed: int
    batch_size: int
    sizes: dict[str, int] = field(default_factory=dict, init=False)  # images per set, before the cap
    failed: dict[str, int] = field(default_factory=dict, init=False)  # unreadable images per set
    _cache: dict[str, np.ndarray] = field(default_factory=dict, init=False, repr=False)

    def real(self, uri: str) -> np.ndarray:
        if uri in self._cache:
            return self._cache[uri]
        keys = resolve_images(uri, self.storage)
        if not keys:
            raise ObjectNotFound(f"{uri}: no images found")
        self.sizes[uri] = len(keys)
        if self.max_real is not None and len(keys) > self.max_real:
            keys = sorted(random.Random(self.seed).sample(keys, self.max_real))
        chunks, failed = [], 0
        for start in tqdm(range(0, len(keys), self.batch_size), desc=f"features {uri}", unit="batch"):
            batch = load_batch(keys[start:start + self.batch_size], self.storage, self.resolution)
            ok = batch["status"] == "ok"
            failed += int((~ok).sum())
            if ok.any():
                chunks.append(self.extractor(to_tensor(batch["image"][ok])))
        self.failed[uri] = failed
        if failed:
            log.warning("%s: %d images could not be read and are left out of its features", uri, failed)
        self._cache[uri] = np.concatenate(chunks)
        return self._cache[uri]

    def images(self, images: np.ndarray) -> np.ndarray:
        """Features of generated uint8 NHWC images."""
        return np.concatenate([self.extractor(to_tensor(images[i:i + self.batch_size]))
                               for i in range(0, len(images), self.batch_size)])


def sample_features(sampler, bank: FeatureBank, seeds: Sequence[int], psi: float, mode: str,
                    clusters: Sequence[int] | None = None, desc: str = "") -> np.ndarray:
    """Features of the sampler's images for the seeds; ``clusters`` pins each seed's multimodal center."""
    feats = []
    step = sampler.batch_size
    for start in tqdm(range(0, len(seeds), step), desc=desc or f"{mode} psi={psi}", unit="batch", leave=False):
        chunk = seeds[start:start + step]
        pinned = clusters[start:start + step] if clusters is not None else [None] * len(chunk)
        specs = [SampleSpec(int(s), float(psi), mode, None if c is None else int(c)) for s, c in zip(chunk, pinned)]
        feats.append(bank.images(sampler.render_specs(specs)))
    return np.concatenate(feats)
