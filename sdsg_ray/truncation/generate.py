"""``sdsg generate``: one PNG per seed and a grid, like NVIDIA's ``gen_images.py``, through the one Sampler.

Works on any checkpoint directory, imported ones included: the images come from
:meth:`~sdsg_ray.truncation.sampler.Sampler.render_specs` (seeded z, constant noise, mean or multi-modal
truncation), so a seed gives the same image here, over HTTP and in the evaluation grids.
"""

from __future__ import annotations

import logging

from sdsg_ray.artifacts.generated import GeneratedImages
from sdsg_ray.config import SDSGConfig
from sdsg_ray.errors import InvalidRequest
from sdsg_ray.imaging import encode_png, square_grid
from sdsg_ray.storage import get_storage
from sdsg_ray.truncation.modes import SEED_MAX, TRUNCATION_MODES, SampleSpec
from sdsg_ray.truncation.sampler import load_sampler

log = logging.getLogger(__name__)

MAX_SEEDS = 100_000


def parse_seeds(text: str) -> list[int]:
    """'0-3,7,10-11' -> [0, 1, 2, 3, 7, 10, 11] (NVIDIA's gen_images.py syntax); order kept, duplicates dropped."""
    seeds: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        try:
            lo, _, hi = part.partition("-")
            first, last = int(lo), int(hi) if hi else int(lo)
        except ValueError:
            raise InvalidRequest(f"generate.seeds: {part!r} is not a seed or a range like 0-31") from None
        if not 0 <= first <= last <= SEED_MAX:
            raise InvalidRequest(f"generate.seeds: {part!r} must be a seed or an increasing range in [0, {SEED_MAX}]")
        if len(seeds) + last - first + 1 > MAX_SEEDS:
            raise InvalidRequest(f"generate.seeds: more than {MAX_SEEDS} seeds")
        seeds.extend(range(first, last + 1))
    return list(dict.fromkeys(seeds))


def run_generate(config: SDSGConfig) -> dict:
    """Write every seed's PNG and their grid to ``--out`` (GeneratedImages); returns the paths and settings."""
    cfg = config.generate
    seeds = parse_seeds(cfg.seeds)
    storage = get_storage(config.storage)
    out = GeneratedImages(cfg.out)
    mode = TRUNCATION_MODES[cfg.truncation]
    if mode.uses_clusters and not cfg.clusters:
        raise InvalidRequest(f"generate.truncation {mode.name!r} needs --clusters (the `sdsg cluster` --out of this "
                             "checkpoint)")
    sampler = load_sampler(cfg.checkpoint, cfg.clusters, storage, assign_by=cfg.assign_by, batch_size=cfg.batch_size)
    specs = [SampleSpec(seed, cfg.psi, cfg.truncation) for seed in seeds]
    images = sampler.render_specs(specs)
    for seed, image in zip(seeds, images):
        storage.write_bytes(out.image(seed), encode_png(image))
    storage.write_bytes(out.grid, encode_png(square_grid(images)))
    log.info("wrote %d images and %s (psi %.2f, truncation %s)", len(seeds), out.grid, cfg.psi, cfg.truncation)
    return {"grid": out.grid, "images": len(seeds), "psi": cfg.psi, "truncation": cfg.truncation,
            "assignment": sampler.assign_by if mode.uses_clusters else None,
            "checkpoint": sampler.bundle.identity}
