"""The paper's truncation figures (Fig. 7's curves, Fig. 4's grid) for every registered truncation mode
(sdsg_ray.truncation.modes), sampled through the truncation Sampler, the same code path as the HTTP service."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from sdsg_ray.distances import Distances, distances
from sdsg_ray.evaluation.features import FeatureBank, sample_features
from sdsg_ray.imaging import image_grid
from sdsg_ray.truncation.modes import TRUNCATION_MODES


def nearest_centers(sampler, seeds: Sequence[int], by: str | None = None) -> list[int]:
    """Each seed's multimodal center, computed once and reused at every psi (it does not depend on psi);
    ``by``: the assignment rule (default: the sampler's)."""
    assigner = sampler.assigner if by is None else sampler.assigners[by]
    out: list[int] = []
    for start in range(0, len(seeds), sampler.batch_size):
        w = sampler.latents(seeds[start:start + sampler.batch_size])
        out += [int(k) for k in assigner.assign(w)]
    return out


def truncation_curve(sampler, bank: FeatureBank, reference: np.ndarray, seeds: Sequence[int],
                     psis: Sequence[float], untruncated: Distances | None = None) -> dict:
    """Fig. 7: FD/KD against psi for each registered mode's lines, the same seeds at every point.

    At psi = 1 every mode draws w itself, so that point is computed once (or is ``untruncated``, when the
    caller already has it). A line whose mode has centers pins each seed's center by its assignment rule,
    once for every psi; a line that ``agrees_with`` another records how often both picked the same center.
    """
    lines = [(name, line, rule) for name, mode in TRUNCATION_MODES.items() for line, rule in mode.fig7_lines(sampler)]
    rules = {line.name: rule for _, line, rule in lines if rule is not None}
    centers = {name: nearest_centers(sampler, seeds, rule) for name, rule in rules.items()}
    curve: dict = {"psis": list(psis)}
    for mode, line, _ in lines:
        points = []
        for psi in psis:
            if psi == 1.0 and untruncated is not None:
                points.append(untruncated)
                continue
            feats = sample_features(sampler, bank, seeds, psi, mode, centers.get(line.name),
                                    desc=f"{line.name} psi={psi}")
            points.append(distances(feats, reference))
            if psi == 1.0:
                untruncated = points[-1]
        curve[line.name] = {"fd": [p.fd for p in points], "kd": [p.kd for p in points]}
        if line.name in centers and line.agrees_with in centers:
            same = np.mean(np.array(centers[line.name]) == np.array(centers[line.agrees_with]))
            curve[line.name][f"same_center_as_{rules[line.agrees_with]}"] = float(same)
    return curve


def truncation_grid(sampler, seeds: Sequence[int], psi: float) -> tuple[np.ndarray, list[str]]:
    """Fig. 4: one row per mode the sampler can draw, the same seeds in each; returns the grid and its row labels."""
    modes = [mode for _, mode in TRUNCATION_MODES.items() if mode.available(sampler)]
    rows = [sampler.sample(seeds, psi=psi, mode=mode.name) for mode in modes]
    grid = image_grid(np.concatenate(rows), ncols=len(seeds), pad=2)
    return grid, [mode.grid_label(psi) for mode in modes]
