"""``curation.html``: the selection as a page to look at, written by ``sdsg select`` next to report.json.

A static page (no server: it works from a file or an S3 website): thumbnails by d(x), kept or removed at a
θ slider over the selection's own θ grid, Fig. 8, and precision/recall per planted outlier kind at the
slider's θ (docs/architecture.md describes it).

Why the numbers agree with report.json: the page's counts at grid θ_k are report.json's ``curve[k].size``;
the per-kind counts and each thumbnail's kept/removed state use the rule's own binning
(:meth:`BinnedMoments.bin_index`, d <= θ), so at the chosen θ the page's precision and recall are
report.json's ``outliers`` numbers. A page opened from ``file://`` may not fetch, so all of this is embedded
in the HTML as JSON; the thumbnails are JPEG sprite sheets beside it (``curation/x-NNN.jpg`` and
``curation/recon-NNN.jpg``), written once here, by the selection run.

The page's size is bounded by the cap ``select.page_images``, not by the number of images (report.json's
``curation_page.bytes``; docs/architecture.md has measured sizes). Beyond the cap it shows a stratified
sample: the strata are the 100 equal-width d(x) bins of the selection's histogram. Each stratum gets an
equal share of the cap, capped by what it holds (water-filling), so the sparse tail of high d(x), where the
outliers are, is shown in full; within a stratum the images are a uniform random sample (seeded, streaming:
the ``n`` smallest of one random priority per image). Each thumbnail carries the number of images it stands for.
"""

from __future__ import annotations

import io
import json
import logging
from collections import defaultdict
from dataclasses import dataclass
from importlib import resources

import numpy as np
from PIL import Image

from sdsg_ray.artifacts.scores import SCORE_COLUMN, ScoreSet
from sdsg_ray.artifacts.selection import FilteredSet
from sdsg_ray.artifacts.dataset import read_labels
from sdsg_ray.filtering.scorer import reconstruct_keys
from sdsg_ray.filtering.selection import BinnedMoments
from sdsg_ray.imaging import image_grid
from sdsg_ray.storage import Storage

log = logging.getLogger(__name__)

TEMPLATE = "curation_page.html"
DATA_MARKER = "__CURATION_DATA__"
SHEET_SIDE = 32  # thumbnails per sprite-sheet row and column: 1,024 per sheet
JPEG_QUALITY = 85
SAMPLE_SEED = 0
RECON_BATCH = 64  # images per G(E(x)) pass when rendering thumbnails


@dataclass
class PageSample:
    """The images the page shows, ascending in d(x): keys, scores (as stored) and how many images each
    stands for (1 when every image is shown)."""

    keys: list[str]
    d: np.ndarray
    weight: np.ndarray
    total: int

    @property
    def sampled(self) -> bool:
        return len(self.keys) < self.total


def allocate(counts: np.ndarray, cap: int) -> np.ndarray:
    """Slots per stratum summing to min(cap, Σ counts): equal shares capped by each stratum's count
    (water-filling), so sparse strata are taken whole and the rest share what is left equally."""
    counts = np.asarray(counts, np.int64)
    alloc = np.zeros_like(counts)
    remaining = min(int(cap), int(counts.sum()))
    while remaining > 0:
        open_ = np.flatnonzero(alloc < counts)
        share = max(1, remaining // len(open_))
        for s in open_:
            take = min(share, int(counts[s] - alloc[s]), remaining)
            alloc[s] += take
            remaining -= take
            if remaining == 0:
                break
    return alloc


def sample_by_score(scores: ScoreSet, storage: Storage, edges: np.ndarray, counts: np.ndarray, cap: int,
                    seed: int = SAMPLE_SEED) -> PageSample:
    """One streaming pass: the stratified sample described in the module docstring (every image when the
    readable images number at most ``cap``). ``edges``/``counts``: the selection's d(x) histogram."""
    strata = len(edges) - 1
    alloc = allocate(counts, cap)
    rng = np.random.default_rng(seed)
    seen = np.zeros(strata, np.int64)
    held: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = [
        (np.zeros(0), np.zeros(0, np.float32), np.zeros(0, object)) for _ in range(strata)]
    for batch in scores.iter_batches(storage, ["key", "status", SCORE_COLUMN]):
        good = batch["status"] == "ok"
        d, keys = batch[SCORE_COLUMN][good], batch["key"][good]
        priority = rng.random(len(d))
        stratum = np.clip(np.searchsorted(edges, d.astype(np.float64), side="right") - 1, 0, strata - 1)
        for s in np.unique(stratum):
            mine = stratum == s
            seen[s] += int(mine.sum())
            if alloc[s] == 0:
                continue
            p, dd, kk = (np.concatenate([a, b]) for a, b in zip(held[s], (priority[mine], d[mine], keys[mine])))
            keep = np.argsort(p, kind="stable")[: alloc[s]]
            held[s] = (p[keep], dd[keep], kk[keep])
    keys = np.concatenate([h[2] for h in held])
    d = np.concatenate([h[1] for h in held])
    weight = np.concatenate([np.full(len(h[2]), seen[s] / max(1, len(h[2]))) for s, h in enumerate(held)])
    order = np.lexsort((keys.astype(str), d))  # ascending d, ties by key: the same page on every run
    return PageSample([str(k) for k in keys[order]], d[order], weight[order], int(seen.sum()))


def kept_until(d: np.ndarray, thetas: np.ndarray) -> np.ndarray:
    """For each score, how many grid points (report.json's curve order, θ descending) keep it: it is kept
    at curve[j] exactly when j < kept_until. The rule's own binning, so counts equal the curve's sizes."""
    return BinnedMoments(np.asarray(thetas, np.float64), dim=0).bin_index(np.asarray(d, np.float64)) + 1


def kind_counts(scores: ScoreSet, kind_of: dict[str, str], storage: Storage, thetas: np.ndarray) -> dict:
    """Per label kind (``kind_of``: key -> 'inlier' or the outlier's kind), its labelled readable images and
    how many are kept at each grid θ (curve order): what the page turns into precision and recall at any θ."""
    by_kind: dict[str, list[np.ndarray]] = defaultdict(list)
    for batch in scores.iter_batches(storage, ["key", "status", SCORE_COLUMN]):
        names = np.array([kind_of.get(k, "") if s == "ok" else "" for k, s in zip(batch["key"], batch["status"])])
        for name in set(names) - {""}:
            by_kind[name].append(batch[SCORE_COLUMN][names == name])
    kinds = sorted(by_kind, key=lambda k: (k != "inlier", k))
    out = {"names": kinds, "total": {}, "kept": {}}
    for name in kinds:
        until = kept_until(np.concatenate(by_kind[name]), thetas)
        at_least = np.cumsum(np.bincount(until, minlength=len(thetas) + 1)[::-1])[::-1]  # #(until >= u)
        out["total"][name] = int(len(until))
        out["kept"][name] = [int(n) for n in at_least[1:]]  # kept at curve[j] <=> until > j <=> until >= j+1
    return out


def _thumb(image: np.ndarray, size: int) -> np.ndarray:
    return image if image.shape[0] == size else np.asarray(Image.fromarray(image).resize((size, size), Image.LANCZOS))


def write_thumbnails(keys: list[str], bundle, pair: str, storage: Storage, out: FilteredSet, thumb_size: int) -> dict:
    """x and G(E(x)) of every key as JPEG sprite sheets in the page's assets; returns the page's ``thumbs``
    entry (size, sheets as paths relative to the page, and per key its cell, -1 when no longer readable)."""
    size = min(bundle.model.resolution, thumb_size)
    per_sheet = SHEET_SIDE * SHEET_SIDE
    x = np.zeros((len(keys), size, size, 3), np.uint8)
    recon = np.zeros_like(x)
    cell = np.full(len(keys), -1, np.int64)
    for start in range(0, len(keys), RECON_BATCH):
        readable, originals, reconstructions = reconstruct_keys(keys[start:start + RECON_BATCH], bundle, storage, pair)
        for i, o, r in zip(np.flatnonzero(readable) + start, originals, reconstructions):
            x[i], recon[i], cell[i] = _thumb(o, size), _thumb(r, size), i
    sheets: dict[str, list[str]] = {"x": [], "recon": []}
    written = 0
    for sheet in range(-(-len(keys) // per_sheet)):
        block = slice(sheet * per_sheet, (sheet + 1) * per_sheet)
        for name, images in (("x", x), ("recon", recon)):
            # row-major, SHEET_SIDE wide (a sheet holding fewer images is one row of them: same cells)
            buf = io.BytesIO()
            Image.fromarray(image_grid(images[block], ncols=SHEET_SIDE)).save(buf, "JPEG", quality=JPEG_QUALITY)
            data = buf.getvalue()
            file = f"{name}-{sheet:03d}.jpg"
            storage.write_bytes(out.asset(file), data)
            sheets[name].append(f"{FilteredSet.curation_assets.name}/{file}")
            written += len(data)
    return {"size": size, "columns": SHEET_SIDE, "per_sheet": per_sheet, **sheets, "cells": cell.tolist(),
            "bytes": written}


def page_data(report: dict, sample: PageSample, thumbs: dict | None, kinds: dict | None, note: str,
              kind_of: dict[str, str] | None = None) -> dict:
    """Everything the page shows, from report.json and this module's sample; JSON-ready."""
    thetas = np.array([p["theta"] for p in report["curve"]])
    until = kept_until(sample.d, thetas)
    cells = thumbs["cells"] if thumbs else [-1] * len(sample.keys)
    return {
        "report": {k: report[k] for k in ("theta", "bound", "target_threshold", "start_threshold", "min_size",
                                          "size_raw", "size_kept", "failed", "distance_name",
                                          "distance_kept_vs_raw", "distance_recon_vs_raw", "metric", "curve")}
        | {"judge": report.get("judge", report["metric"])},  # the network (and size) that computed d(x)
        "outliers": report.get("outliers"),
        "kinds": kinds,
        "thumbs": None if thumbs is None else {k: v for k, v in thumbs.items() if k not in ("cells", "bytes")},
        "sampled": sample.sampled,
        "shown": len(sample.keys),
        "note": note,
        # one row per thumbnail, ascending d: key, d(x), kept at curve[j] for j < until, sprite cell, weight,
        # planted label ("" without labels)
        "items": [[k, round(float(d), 6), int(u), int(c), round(float(w), 3), (kind_of or {}).get(k, "")]
                  for k, d, u, c, w in zip(sample.keys, sample.d, until, cells, sample.weight)],
    }


def render_page(data: dict) -> str:
    """The template with ``data`` embedded as JSON (``</`` escaped so no string can close the script)."""
    template = resources.files(__package__).joinpath(TEMPLATE).read_text(encoding="utf-8")
    payload = json.dumps(data, separators=(",", ":"), allow_nan=False).replace("</", "<\\/").replace("<!--", "<\\!--")
    return template.replace(DATA_MARKER, payload)


def write_curation_page(report: dict, scores: ScoreSet, out: FilteredSet, storage: Storage, *, edges: np.ndarray,
                        counts: np.ndarray, cap: int, thumb_size: int, bundle=None, pair: str = "ema",
                        labels: str | None = None, bundle_note: str = "") -> dict:
    """Write the selection's curation page (+ its sprites); returns the report's ``curation_page`` entry:
    file, images shown, whether sampled, total bytes."""
    sample = sample_by_score(scores, storage, edges, counts, cap)
    thumbs = None
    note = ""
    if sample.keys and bundle is not None:
        thumbs = write_thumbnails(sample.keys, bundle, pair, storage, out, thumb_size)
    elif sample.keys:
        note = f"thumbnails skipped: {bundle_note or 'no checkpoint'}"
    else:
        note = "no thumbnails: select.page_images is 0"
    kind_of = None
    if labels and storage.exists(labels):  # key -> 'inlier', or the outlier's kind ('outlier' when unnamed)
        kind_of = {row["key"]: "inlier" if not row["is_outlier"] else row.get("kind") or "outlier"
                   for row in read_labels(labels, storage)}
    kinds = kind_counts(scores, kind_of, storage, np.array([p["theta"] for p in report["curve"]])) if kind_of else None
    page = render_page(page_data(report, sample, thumbs, kinds, note, kind_of))
    storage.write_text(out.curation_page, page)
    size = len(page.encode()) + (thumbs["bytes"] if thumbs else 0)
    log.info("curation page: %s (%d of %d images%s, %.2f MB)", out.curation_page, len(sample.keys),
             sample.total, ", stratified sample" if sample.sampled else "", size / 1e6)
    return {"file": FilteredSet.curation_page.name, "images": len(sample.keys), "sampled": sample.sampled, "cap": cap,
            "thumb_size": thumbs["size"] if thumbs else None, "bytes": size}
