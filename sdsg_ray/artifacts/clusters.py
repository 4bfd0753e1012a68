"""Multi-modal truncation centers on storage: clusters.pt, its format, reader and writer.

The file is plain ``torch.save`` of tensors and JSON-like values (the learned assignment's classifier as
tensors too), so it loads with ``torch.load(weights_only=True)``. Its identity is the sha256 of its bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sdsg_ray.artifacts.base import Artifact, Member
from sdsg_ray.artifacts.checkpoint import identity_of, read_torch_file, torch_bytes
from sdsg_ray.storage import Storage

FORMAT = "sdsg-clusters/1"


@dataclass
class ClusterSet:
    """The fitted centers and where they came from (enough to refuse a mismatched generator)."""

    centers: torch.Tensor  # [K, w_dim] float32
    sizes: torch.Tensor  # [K] int64: how many of the n_latents mapped w fell in each cluster
    seed: int
    metric: str  # perceptual metric the Sampler assigns with (resolved name, never "auto")
    checkpoint: str  # InferenceBundle.identity of the generator the w came from
    config: dict = field(default_factory=dict)  # the ClusterConfig used
    identity: str = ""  # sha256 of the file's bytes, first 16 hex chars (set on save/load)
    w_mean: torch.Tensor | None = None  # [w_dim] mean of the mapped w clustered: mean truncation's centre
    classifier: dict | None = None  # learned.CenterClassifier.state(): w -> LPIPS-nearest center (tensors)
    assignment_quality: dict = field(default_factory=dict)  # its held-out quality (learned.assignment_quality)
    judge_resolution: int | None = None  # side the metric sees G(w) and the centers at (None: the image's own)

    def __post_init__(self) -> None:
        assert self.centers.ndim == 2, f"centers must be [K, w_dim], got {tuple(self.centers.shape)}"
        assert self.sizes.shape == (self.centers.shape[0],), "sizes must be [K]"

    @property
    def count(self) -> int:
        return int(self.centers.shape[0])

    def to_bytes(self) -> bytes:
        payload = {
            "format": FORMAT,
            "centers": self.centers.detach().cpu().float().contiguous(),
            "sizes": self.sizes.detach().cpu().long(),
            "seed": int(self.seed),
            "metric": self.metric,
            "checkpoint": self.checkpoint,
            "config": dict(self.config),
        }
        if self.judge_resolution is not None:
            payload["judge_resolution"] = int(self.judge_resolution)
        if self.w_mean is not None:
            payload["w_mean"] = self.w_mean.detach().cpu().float().contiguous()
        if self.classifier is not None:
            payload["classifier"] = self.classifier
            payload["assignment_quality"] = dict(self.assignment_quality)
        return torch_bytes(payload)


@dataclass(frozen=True)
class ClusterFile(Artifact):
    """``sdsg cluster --out`` (or the file itself)."""

    clusters = Member("clusters.pt", "KMeans centers, their sizes, the judge, the learned assignment")

    @property
    def file(self) -> str:
        return self.uri if self.uri.endswith(".pt") else self.clusters

    def write(self, clusters: ClusterSet, storage: Storage) -> str:
        """Write the file; sets ``clusters.identity`` and returns the file's URI."""
        data = clusters.to_bytes()
        storage.write_bytes(self.file, data)
        clusters.identity = identity_of(data)
        return self.file

    def read(self, storage: Storage) -> ClusterSet:
        """The ClusterSet written by :meth:`write` (weights_only: no code runs on load)."""
        payload, data = read_torch_file(self.file, storage, FORMAT, "clusters file")
        return ClusterSet(
            centers=payload["centers"].float(),
            sizes=payload["sizes"].long(),
            seed=int(payload["seed"]),
            metric=str(payload["metric"]),
            checkpoint=str(payload["checkpoint"]),
            config=dict(payload["config"]),
            identity=identity_of(data),
            w_mean=payload["w_mean"].float() if "w_mean" in payload else None,  # absent in older files
            classifier=payload.get("classifier"),
            assignment_quality=dict(payload.get("assignment_quality", {})),
            judge_resolution=payload.get("judge_resolution"),  # absent: files written before issue 31 (own size)
        )

