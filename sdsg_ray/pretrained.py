"""The ONE place pretrained networks are built: perceptual metrics and FID features.

Nothing here ever falls back to random weights: a missing file raises :class:`PretrainedMissing` naming
the file, the directory to put it in, and the offline alternative.

Metrics (NCHW float images in [-1, 1]) are the entries of :data:`sdsg_ray.perceptual.METRICS`, built by
:func:`build_metric`. LPIPS, written out (exactly ``lpips.LPIPS.forward`` with ``spatial=False``):
    f_l(x)    = unit-normalise over channels(trunk_l(scale(x)))            per layer l, [B, C_l, H_l, W_l]
    d(x, y)   = sum_l mean_{h,w} sum_c w_{l,c} (f_l(x) - f_l(y))_{c,h,w}^2  with w_l the 1x1 "lin" weights
so the per-layer features can be cached (:meth:`PerceptualMetric.features`) and distances computed later.

The judge's size (``judge_resolution``): the LPIPS heads were calibrated on 64 x 64 patches and the deeper
trunk layers shrink a 32-px image to 2 x 2 maps, so the size the metric sees is a parameter of the method
(NVIDIA's projector resizes to 256 px before LPIPS-VGG). :meth:`PerceptualMetric.features`, the one door
every distance goes through, resizes to it (:func:`judge_resize`).
"""

from __future__ import annotations

import logging
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdsg_ray.config import ConfigError
from sdsg_ray.errors import UserError
from sdsg_ray.perceptual import AUTO, METRICS

log = logging.getLogger(__name__)

OFFLINE_METRIC = "stlpips-alex"
OFFLINE_FEATURES = "stlpips-alex-pool"
# torchvision's ImageNet checkpoints that lpips' trunks load (file names fixed by torchvision's URLs).
LPIPS_BACKBONE_FILES = {"alex": "alexnet-owt-7be5be79.pth", "vgg": "vgg16-397923af.pth"}
INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
INCEPTION_ENV = "SDSG_INCEPTION_PATH"
# The AlexNet trunks cannot run on fewer pixels (their pooling windows outgrow the feature maps), so
# smaller inputs are upsampled to this side first. Every metric does the same for comparability.
MIN_METRIC_SIDE = 32
# Side the stlpips-alex-pool features are computed at, whatever the input resolution, so the feature
# (and every FD built on it) means the same thing for 32 px samples and 256 px photos.
POOL_FEATURE_SIDE = 64


class PretrainedMissing(UserError, FileNotFoundError):
    """A pretrained weight file is absent; the message says which, where it goes, and the alternative."""


def lpips_weights(family: str, net: str) -> Path:
    """The file an LPIPS-family network cannot be built without: torchvision's ImageNet trunk (lpips; the
    heads ship in its wheel) or the shift-tolerant weights inside stlpips-pytorch (trunk and heads)."""
    if family == "lpips":  # torch.hub.get_dir() reads $TORCH_HOME at call time
        return Path(torch.hub.get_dir()) / "checkpoints" / LPIPS_BACKBONE_FILES[net]
    try:
        import stlpips_pytorch
    except ImportError as err:
        raise PretrainedMissing(f"stlpips-{net}: stlpips-pytorch not importable ({err})") from None
    return Path(stlpips_pytorch.__file__).parent / "weights" / "vST0.0" / f"{net}_shift_tolerant.pth"


def resolve_metric(name: str = AUTO) -> str:
    """A concrete metric name. "auto" = the first available entry of the registry, in its order
    (lpips-vgg, lpips-alex, stlpips-vgg, stlpips-alex: the paper used LPIPS-VGG); the choice and the reason
    are logged."""
    if name != AUTO:
        if name not in METRICS:
            raise ConfigError(f"unknown perceptual metric {name!r}; choose one of {METRICS.names()} or '{AUTO}'")
        return name
    reasons = []
    for candidate in METRICS:
        try:
            ok, why = METRICS[candidate].available()
        except PretrainedMissing as err:
            ok, why = False, str(err)
        if ok:
            log.info("metric auto -> %s (%s; skipped: %s)", candidate, why, "; ".join(reasons) or "none")
            return candidate
        reasons.append(f"{candidate}: {why}")
    raise PretrainedMissing("no perceptual metric available: " + "; ".join(reasons))


def judge_resize(x: Tensor, side: int) -> Tensor:
    """x NCHW -> [N, C, side, side]: the one resize rule of the judge, the same for x and G(E(x)).

    Shrinking: ``area`` (a box filter), exact for the power-of-two factors used here and free of aliasing
    (no detail finer than the judge's grid folds back into false detail). Enlarging: ``bilinear``, which adds
    no detail and, unlike bicubic, never overshoots (no ringing for the trunk to read as texture; values stay
    in [-1, 1]). The same side returns x itself.
    """
    if x.shape[-2:] == (side, side):
        return x
    if x.shape[-2] > side and x.shape[-1] > side:
        return F.interpolate(x, size=(side, side), mode="area")
    return F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)


def judged_side(judge_resolution: int | None, side: int) -> int:
    """The side a metric built with ``judge_resolution`` feeds its trunk for an input of side ``side``."""
    return judge_resolution or max(side, MIN_METRIC_SIDE)


def judge_label(name: str, judge_resolution: int | None, side: int) -> str:
    """Metric and size together, as summaries and reports name the judge: "stlpips-vgg at 128 px"."""
    return f"{name} at {judged_side(judge_resolution, side)} px"


class PerceptualMetric(nn.Module):
    """A perceptual distance d(x, y) per pair of NCHW images in [-1, 1], judged at one size, with cacheable
    features. Built frozen and in eval mode by :func:`build_metric`; differentiable in its inputs.

    A metric implements :meth:`embed` (features of images already at the judge size, batch first) and
    :meth:`distance_from_features`; this class resizes and derives ``forward`` and the pairwise form.
    ``judge_resolution``: the side every input is resized to first; None judges images at their own size
    (upsampled to MIN_METRIC_SIDE at least), as training's reconstruction loss does.
    """

    def __init__(self, name: str, judge_resolution: int | None = None):
        super().__init__()
        if judge_resolution is not None and (judge_resolution < MIN_METRIC_SIDE or judge_resolution & (judge_resolution - 1)):
            raise ConfigError(f"judge_resolution must be a power of two >= {MIN_METRIC_SIDE} "
                              f"(the AlexNet trunk's smallest input), got {judge_resolution}")
        self.name = name
        self.judge_resolution = judge_resolution

    def judged_side(self, side: int) -> int:
        return judged_side(self.judge_resolution, side)

    def label(self, side: int) -> str:
        return judge_label(self.name, self.judge_resolution, side)

    def features(self, x: Tensor) -> list[Tensor]:
        assert x.ndim == 4 and x.shape[1] == 3, f"expected NCHW RGB, got {tuple(x.shape)}"
        if self.judge_resolution is not None:
            x = judge_resize(x, self.judge_resolution)
        elif min(x.shape[-2:]) < MIN_METRIC_SIDE:
            x = F.interpolate(x, size=(MIN_METRIC_SIDE, MIN_METRIC_SIDE), mode="bilinear", align_corners=False)
        return self.embed(x)

    def embed(self, x: Tensor) -> list[Tensor]:
        """Features of judged images (batch first): what :meth:`distance_from_features` compares."""
        raise NotImplementedError

    def distance_from_features(self, fx: list[Tensor], fy: list[Tensor]) -> Tensor:
        """Equals ``forward(x, y)`` given ``fx = features(x)``, ``fy = features(y)``; returns [B]. Batch
        dimensions broadcast: fy with batch 1 is compared with every row of fx."""
        raise NotImplementedError

    def pairwise_distance_from_features(self, fx: list[Tensor], fc: list[Tensor]) -> Tensor:
        """All B x K distances between rows of fx (batch B) and fc (batch K): [B, K], one center at a time."""
        return torch.stack([self.distance_from_features(fx, [f[k:k + 1] for f in fc])
                            for k in range(fc[0].shape[0])], dim=1)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return self.distance_from_features(self.features(x), self.features(y))


class LpipsMetric(PerceptualMetric):
    """LPIPS family: unit-normalised trunk activations, compared through per-layer 1x1 "lin" heads."""

    def __init__(self, name: str, upstream: nn.Module, judge_resolution: int | None = None):
        super().__init__(name, judge_resolution)
        self.scaling_layer = upstream.scaling_layer  # (x - shift) / scale, ImageNet-style
        self.net = upstream.net  # trunk: returns a namedtuple of per-layer activations
        self.lins = upstream.lins  # per-layer 1x1 convs, no bias, one output channel

    @classmethod
    def load(cls, name: str, family: str, net: str, judge_resolution: int | None) -> "LpipsMetric":
        """The metric with verified pretrained weights (trunk and heads), or :class:`PretrainedMissing`."""
        weights = lpips_weights(family, net)
        if family == "lpips":
            if not weights.is_file():
                raise PretrainedMissing(
                    f"{name} needs torchvision's ImageNet weights {weights.name}, not found in {weights.parent} "
                    f"(= $TORCH_HOME/hub/checkpoints). Download https://download.pytorch.org/models/{weights.name} "
                    f"into that directory (or set TORCH_HOME), or use the offline metric '{OFFLINE_METRIC}', "
                    "whose weights ship with stlpips-pytorch.")
            import lpips

            # Trunk from the torchvision cache checked above, heads from the lpips wheel.
            return cls(name, lpips.LPIPS(net=net, pretrained=True, verbose=False), judge_resolution)
        from stlpips_pytorch import stlpips

        if not weights.is_file():
            raise PretrainedMissing(f"{name}: {weights} missing; reinstall stlpips-pytorch")
        # Built on the meta device (no random init: the VGG variant builds a 100M-parameter classifier it then
        # drops, 7 s on a CPU), then every tensor is loaded from the file. Upstream loads with strict=False,
        # which would hide a missing trunk layer, so the check here is ours: every parameter and buffer must
        # come from the file ("lins.*" are aliases of "lin0..4", the same modules).
        with torch.device("meta"):
            module = stlpips.LPIPS(net=net, variant="shift_tolerant", pretrained=False, verbose=False)
        module = module.to_empty(device="cpu")
        state = torch.load(weights, map_location="cpu", weights_only=True)
        tensors = {k for k, _ in module.named_parameters()} | {k for k, _ in module.named_buffers()}
        uncovered = sorted(k for k in tensors - set(state) if not k.startswith("lins."))
        unexpected = sorted(set(state) - set(module.state_dict()))
        if uncovered or unexpected:
            raise RuntimeError(f"{name}: {weights} does not match the network (missing {uncovered}, unexpected {unexpected})")
        module.load_state_dict(state, strict=False)
        return cls(name, module, judge_resolution)

    def embed(self, x: Tensor) -> list[Tensor]:
        # Unit-normalised over channels, with lpips.normalize_tensor's eps: forward() matches upstream.
        return [f / (f.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10) for f in self.net(self.scaling_layer(x))]

    def distance_from_features(self, fx: list[Tensor], fy: list[Tensor]) -> Tensor:
        total = 0.0
        for lin, a, b in zip(self.lins, fx, fy):
            total = total + lin((a - b).pow(2)).mean(dim=(2, 3))  # [B, 1]
        return total[:, 0]

    def pairwise_distance_from_features(self, fx: list[Tensor], fc: list[Tensor]) -> Tensor:
        """All B x K distances, expanding sum_c w_c (a_c - c_c)^2 = sum_c w_c a_c^2 + sum_c w_c c_c^2
        - 2 sum_c w_c a_c c_c, so memory is O((B + K) x features) and the cross term is one matmul per
        layer (no [B, K, C, H, W] tensor)."""
        total = 0.0
        for lin, a, c in zip(self.lins, fx, fc):
            w = lin.model[-1].weight.view(1, -1, 1, 1)  # [1, C, 1, 1]
            hw = a.shape[2] * a.shape[3]
            aw = a * w
            self_a = (aw * a).flatten(1).sum(1) / hw  # [B]
            self_c = (c * w * c).flatten(1).sum(1) / hw  # [K]
            cross = aw.flatten(1) @ c.flatten(1).T / hw  # [B, K]
            total = total + self_a[:, None] + self_c[None, :] - 2.0 * cross
        return total.clamp_min(0.0)


def build_metric(name: str = AUTO, device: str | torch.device = "cpu",
                 judge_resolution: int | None = None) -> PerceptualMetric:
    """A frozen perceptual metric on ``device`` (eval mode, no parameter requires grad) that judges its
    inputs at ``judge_resolution`` px (None: at their own size)."""
    name = resolve_metric(name)
    metric = METRICS[name].build(name, judge_resolution).eval().to(device)
    for p in metric.parameters():
        p.requires_grad_(False)
    return metric


def distance_labels(feature_name: str, is_inception: bool) -> tuple[str, str]:
    """('FID', 'KID') only for real Inception features; any other network is named, never passed off as
    FID: ('FD (<net>)', 'KD (<net>)')."""
    return ("FID", "KID") if is_inception else (f"FD ({feature_name})", f"KD ({feature_name})")


@dataclass(eq=False)
class FeatureExtractor:
    """Images NCHW float in [-1, 1] (any resolution) -> features [B, dim] as float64 numpy."""

    name: str
    dim: int
    is_inception: bool
    module: nn.Module
    device: torch.device

    @property
    def distance_label(self) -> str:
        return distance_labels(self.name, self.is_inception)[0]

    @torch.no_grad()
    def __call__(self, images: Tensor) -> np.ndarray:
        assert images.ndim == 4 and images.shape[1] == 3, f"expected NCHW RGB, got {tuple(images.shape)}"
        feats = self.module(images.to(self.device, torch.float32))
        assert feats.shape == (images.shape[0], self.dim), f"{self.name}: got {tuple(feats.shape)}"
        return feats.double().cpu().numpy()


class _CleanFIDInception(nn.Module):
    """clean-fid's "clean" mode: uint8 images, PIL bicubic resize to 299 on float, 0..255 into
    clean-fid's InceptionV3W wrapper of NVIDIA's TorchScript Inception (2048-d pool features)."""

    def __init__(self, directory: str):
        super().__init__()
        from cleanfid.inception_torchscript import InceptionV3W
        from cleanfid.resize import build_resizer

        self.model = InceptionV3W(directory, download=False, resize_inside=False).eval()
        self.resize: Callable[[np.ndarray], np.ndarray] = build_resizer("clean")

    def forward(self, images: Tensor) -> Tensor:
        # clean-fid measures files on disk, i.e. uint8: quantise first, exactly as a saved PNG would be.
        uint8 = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        resized = np.stack([self.resize(img) for img in uint8])  # [B, 299, 299, 3] float32 in 0..255
        x = torch.from_numpy(resized).permute(0, 3, 1, 2).to(images.device)
        return self.model(x)


class _PooledTrunk(nn.Module):
    """Global-average-pooled activations of the stlpips AlexNet's five layers, concatenated:
    64 + 192 + 384 + 256 + 256 = 1152 dims, computed at POOL_FEATURE_SIDE pixels."""

    def __init__(self, metric: LpipsMetric):
        super().__init__()
        self.scaling_layer = metric.scaling_layer
        self.net = metric.net

    def forward(self, images: Tensor) -> Tensor:
        side = POOL_FEATURE_SIDE
        x = F.interpolate(images, size=(side, side), mode="bilinear", align_corners=False, antialias=True)
        return torch.cat([f.mean(dim=(2, 3)) for f in self.net(self.scaling_layer(x))], dim=1)


def _cleanfid_cache_dir() -> str:
    # Where clean-fid's feature_extractor() looks before downloading (cleanfid/features.py).
    return "./" if platform.system() == "Windows" else "/tmp"


def find_inception(path: str | None = None) -> Path:
    """The Inception file: explicit ``path`` (file or directory) > $SDSG_INCEPTION_PATH > clean-fid's cache."""
    given = [(p, src) for p, src in ((path, "path"), (os.environ.get(INCEPTION_ENV), f"${INCEPTION_ENV}")) if p]
    # An explicit location that is wrong is an error, not a reason to look elsewhere.
    location, source = given[0] if given else (_cleanfid_cache_dir(), "clean-fid's cache")
    file = Path(location)
    if file.is_file() and file.name != INCEPTION_FILE:
        raise PretrainedMissing(f"{file} ({source}): clean-fid loads the Inception file by its name; rename it to {INCEPTION_FILE}")
    if file.is_dir() or file.name != INCEPTION_FILE:
        file = file / INCEPTION_FILE
    if file.is_file():
        return file
    raise PretrainedMissing(
        f"Inception weights {INCEPTION_FILE} not found at {file} ({source}). Download {INCEPTION_URL} "
        f"and put it in {_cleanfid_cache_dir()} (clean-fid's cache) or point ${INCEPTION_ENV} at it; or use the "
        f"offline features '{OFFLINE_FEATURES}' (reported as FD, not FID)."
    )


def build_fid_features(
    name: str = "auto", device: str | torch.device = "cpu", path: str | None = None
) -> FeatureExtractor:
    """Features for Frechet distances. "auto" = Inception if its file is present, else stlpips-alex-pool."""
    device = torch.device(device)
    if name == "auto":
        try:
            find_inception(path)
            name = "inception"
        except PretrainedMissing as err:
            log.info("fid features auto -> %s (%s)", OFFLINE_FEATURES, err)
            name = OFFLINE_FEATURES
        else:
            log.info("fid features auto -> inception")
    if name == "inception":
        file = find_inception(path)
        module = _CleanFIDInception(str(file.parent)).to(device)
        return FeatureExtractor("inception", 2048, True, module, device)
    if name == "stlpips-alex-pool":
        module = _PooledTrunk(build_metric("stlpips-alex", device)).eval()
        return FeatureExtractor(name, 1152, False, module, device)
    raise ConfigError(f"unknown FID features {name!r}; choose 'inception', 'stlpips-alex-pool' or 'auto'")
