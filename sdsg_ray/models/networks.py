"""StyleGAN2 (config F, Karras et al. 2020) generator, residual discriminator and the encoder E.

One readable file in the style of NVIDIA's stylegan2-ada-pytorch: small classes, the maths visible,
shapes asserted at block boundaries. No custom CUDA ops: the resampling filter runs through a small
pure-torch ``upfirdn2d`` whose fast paths (strided / transposed depthwise convs) are exact rewrites
of the readable reference path. Nothing here knows about Ray.

Channels at resolution r are ``min(channel_base // r, channel_max)``, so the same code builds a tiny
CPU model (32 px, 64 channels) and the paper-scale one (512/512/32768/512).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:  # config imports pydantic/yaml; the networks themselves only need torch
    from sdsg_ray.config import ModelConfig

NoiseMode = Literal["random", "const", "none"]
NOISE_MODES = ("random", "const", "none")

LRELU_SLOPE = 0.2
LRELU_GAIN = math.sqrt(2.0)  # keeps the activations' second moment at 1 through leaky ReLU (He init)
RESIDUAL_GAIN = math.sqrt(0.5)  # D blocks: (skip + main) / sqrt(2) keeps the variance of the sum
FIR_TAPS = (1.0, 3.0, 3.0, 1.0)  # binomial low-pass used for every 2x up/downsampling (config F)
MAPPING_LR_MUL = 0.01  # mapping network learns 100x slower (StyleGAN paper, section C)
W_AVG_BETA = 0.995  # decay of the tracked mean latent used for truncation
AFFINE_BIAS_INIT = 1.0  # styles start at 1 so modulation starts as the identity
DEMOD_EPS = 1e-8
NORMALIZE_EPS = 1e-8
MBSTD_CHANNELS = 1
MBSTD_EPS = 1e-8
INIT_RESOLUTION = 4  # the constant input and the discriminator epilogue live at 4x4


# ----------------------------------------------------------------------------------------------
# Small helpers


def assert_shape(x: Tensor, shape: Sequence[int | None], name: str = "tensor") -> None:
    """Cheap shape check (None = any size); the message is only formatted when the check fails."""
    if x.ndim != len(shape) or any(want is not None and got != want for got, want in zip(x.shape, shape)):
        raise AssertionError(f"{name}: expected shape {tuple(shape)} (None = any), got {tuple(x.shape)}")


def normalize_2nd_moment(x: Tensor, dim: int = 1) -> Tensor:
    return x * (x.square().mean(dim=dim, keepdim=True) + NORMALIZE_EPS).rsqrt()


def bias_act(x: Tensor, bias: Tensor | None, lrelu: bool, gain: float = 1.0, clamp: float | None = None) -> Tensor:
    """x + bias (per channel, dim 1), optional leaky ReLU, times gain, optional clamp to [-clamp, clamp]."""
    if bias is not None:
        x = x + bias.to(x.dtype).reshape([1, -1] + [1] * (x.ndim - 2))
    if lrelu:
        x = F.leaky_relu(x, LRELU_SLOPE)
    if gain != 1.0:
        x = x * gain
    if clamp is not None:
        x = x.clamp(-clamp, clamp)
    return x


def channels_at(resolution: int, channel_base: int, channel_max: int) -> int:
    return min(channel_base // resolution, channel_max)


# ----------------------------------------------------------------------------------------------
# Mixed precision (NVIDIA's policy): the one place that decides which block runs in which dtype.
# Only the num_fp16_res highest-resolution blocks of G, D and E compute in reduced precision (they hold
# most of the FLOPs and the activations); the mapping network, the low-resolution blocks, D/E's 4x4
# epilogue, the image skip sum, every loss and the regularisers' penalties stay float32. Weights stay
# float32 (cast per call), so the optimizer and EMA never see reduced precision.

REDUCED_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
REDUCED_MIN_RESOLUTION = 8  # NVIDIA never runs the 4x4 block in reduced precision


def reduced_precision_from(resolution: int, num_fp16_res: int) -> int | None:
    """Lowest block resolution eligible for reduced precision (NVIDIA's ``fp16_resolution``); None: no block.
    Blocks at this resolution and above are eligible; e.g. 256 px with num_fp16_res=4 -> 32..256."""
    if num_fp16_res <= 0:
        return None
    return max(2 ** (log2_resolution(resolution) + 1 - num_fp16_res), REDUCED_MIN_RESOLUTION)


def set_reduced_precision(module: nn.Module, dtype: torch.dtype | None) -> list[int]:
    """Make every eligible block under ``module`` compute in ``dtype`` (None: back to float32); returns the
    resolutions of the blocks now in reduced precision. Eligibility was fixed at construction from
    ``num_fp16_res``; this only switches it, so the same weights run either way."""
    if dtype is not None and dtype not in REDUCED_DTYPES.values():
        raise ValueError(f"reduced precision dtype must be one of {list(REDUCED_DTYPES.values())}, got {dtype}")
    blocks = [block for block in module.modules() if isinstance(block, ResolutionBlock) and block.reduced_eligible]
    for block in blocks:
        block.compute_dtype = dtype if dtype is not None else torch.float32
    return [block.resolution for block in blocks] if dtype is not None else []


def log2_resolution(resolution: int) -> int:
    log2 = int(math.log2(resolution))
    if resolution != 2**log2 or not 16 <= resolution <= 1024:
        raise ValueError(f"resolution must be a power of two in 16..1024, got {resolution}")
    return log2


# ----------------------------------------------------------------------------------------------
# FIR resampling


def fir_filter(taps: Sequence[float] = FIR_TAPS) -> Tensor:
    """Separable 2-D low-pass filter [K, K] from 1-D taps, normalised to sum 1."""
    f = torch.as_tensor(taps, dtype=torch.float32)
    f = torch.outer(f, f)
    return f / f.sum()


def upfirdn2d(x: Tensor, f: Tensor, up: int = 1, down: int = 1, padding: tuple[int, int] = (0, 0), gain: float = 1.0,
              impl: Literal["fast", "ref"] = "fast") -> Tensor:
    """Upsample (zero insertion) -> pad -> FIR filter -> downsample, per channel, on NCHW.

    ``f`` is a square [K, K] filter applied as a true convolution; ``padding`` = (before, after),
    the same on both axes, negative values crop. ``gain`` scales the filter (use up**2 when
    upsampling: zero insertion divides the mean by up**2).

    impl="ref" is the readable definition. impl="fast" takes an exact shortcut when one applies:
    up only -> one transposed depthwise conv (it inserts the zeros itself); down only -> one strided
    depthwise conv (never computes the pixels it would throw away).
    """
    batch, channels, height, width = x.shape
    taps = f.shape[0]
    pad0, pad1 = padding
    weight = (f * gain).to(x.dtype)
    if impl == "fast":
        # conv_transpose2d(stride=up, padding=p) == zero-insert, pad by K-1-p, convolve; its output
        # length (H-1)*up + K - 2p equals the reference's H*up + pad0 + pad1 - K + 1 iff the test holds.
        if up > 1 and down == 1 and taps - 1 - pad0 >= 0 and pad1 - pad0 + up - 1 == 0:
            kernel = weight.expand(channels, 1, taps, taps).contiguous()  # transposed conv: no flip
            return F.conv_transpose2d(x, kernel, stride=up, padding=taps - 1 - pad0, groups=channels)
        if up == 1:
            kernel = weight.flip([0, 1]).expand(channels, 1, taps, taps).contiguous()
            return F.conv2d(F.pad(x, [pad0, pad1, pad0, pad1]), kernel, stride=down, groups=channels)
    elif impl != "ref":
        raise ValueError(f"impl must be 'fast' or 'ref', got {impl!r}")
    if up > 1:  # every input pixel followed by up-1 zeros along each axis
        x = x.reshape(batch, channels, height, 1, width, 1)
        x = F.pad(x, [0, up - 1, 0, 0, 0, up - 1])
        x = x.reshape(batch, channels, height * up, width * up)
    x = F.pad(x, [pad0, pad1, pad0, pad1])  # negative pads crop
    # conv2d is a correlation; flipping the filter makes it the convolution we define
    kernel = weight.flip([0, 1]).expand(channels, 1, taps, taps).contiguous()
    x = F.conv2d(x, kernel, groups=channels)
    return x[:, :, ::down, ::down]


def upsample2d(x: Tensor, f: Tensor, up: int = 2) -> Tensor:
    """[.., H, W] -> [.., H*up, W*up], FIR-interpolated (NVIDIA's upsample2d padding)."""
    taps = f.shape[0]
    return upfirdn2d(x, f, up=up, padding=((taps + up - 1) // 2, (taps - up) // 2), gain=up**2)


# ----------------------------------------------------------------------------------------------
# Equalized-learning-rate layers: parameters stored at N(0, 1) / lr_mul, scaled by He's constant
# at runtime, so Adam's per-parameter step is the same relative size for every layer.


class FullyConnectedLayer(nn.Module):
    def __init__(self, in_features: int, out_features: int, lrelu: bool = False, lr_mul: float = 1.0,
                 bias_init: float = 0.0):
        super().__init__()
        self.in_features, self.out_features, self.lrelu = in_features, out_features, lrelu
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_mul)
        self.bias = nn.Parameter(torch.full([out_features], float(bias_init)))
        self.weight_gain = lr_mul / math.sqrt(in_features)
        self.bias_gain = lr_mul

    def forward(self, x: Tensor) -> Tensor:
        assert_shape(x, [None, self.in_features], "FullyConnectedLayer input")
        w = self.weight.to(x.dtype) * self.weight_gain
        b = self.bias.to(x.dtype) * self.bias_gain
        x = F.linear(x, w, b)
        return bias_act(x, None, self.lrelu, LRELU_GAIN) if self.lrelu else x

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, lrelu={self.lrelu}, lr_mul={self.bias_gain}"


class Conv2dLayer(nn.Module):
    """Equalized conv (discriminator/encoder); down=2 blurs with the FIR filter, then strides."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, lrelu: bool = True, bias: bool = True,
                 down: int = 1, conv_clamp: float | None = None):
        super().__init__()
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.conv_clamp = conv_clamp
        self.lrelu, self.down, self.padding = lrelu, down, kernel_size // 2
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.weight_gain = 1.0 / math.sqrt(in_channels * kernel_size**2)
        self.act_gain = LRELU_GAIN if lrelu else 1.0
        self.register_buffer("resample_filter", fir_filter(), persistent=False)

    def forward(self, x: Tensor, gain: float = 1.0) -> Tensor:
        assert_shape(x, [None, self.in_channels, None, None], "Conv2dLayer input")
        w = (self.weight * self.weight_gain).to(x.dtype)
        if self.down == 1:
            x = F.conv2d(x, w, padding=self.padding)
        else:
            # blur with enough padding that the strided conv lands on H/down; for a 1x1 conv the
            # blur itself downsamples (fewer pixels for the conv)
            taps, d = self.resample_filter.shape[0], self.down
            pad = (self.padding + (taps - d + 1) // 2, self.padding + (taps - d) // 2)
            if self.kernel_size == 1:
                x = F.conv2d(upfirdn2d(x, self.resample_filter, down=d, padding=pad), w)
            else:
                x = F.conv2d(upfirdn2d(x, self.resample_filter, padding=pad), w, stride=d)
        clamp = self.conv_clamp * gain if self.conv_clamp is not None else None  # NVIDIA: clamp scales with gain
        return bias_act(x, self.bias, self.lrelu, self.act_gain * gain, clamp)


# ----------------------------------------------------------------------------------------------
# Mapping network


class MappingNetwork(nn.Module):
    """z -> w: normalise z, then `num_layers` leaky-ReLU FC layers at lr multiplier 0.01.

    Tracks ``w_avg`` (the mean latent used by truncation) only when called with ``update_w_avg=True``:
    every training call of the loss (G phase, D phase, path length), as NVIDIA's ``update_emas``; never
    inference, style mixing's second latent or E's losses. The EMA (decay ``w_avg_beta`` = 0.995) is
    debiased: the n-th update moves w_avg by max(1 - beta, 1/n) toward the batch mean, so w_avg is the
    running mean until 1/n < 1 - beta, never a plain EMA's copy shrunk by 1 - beta^n.
    ``w_avg_count`` (updates so far) travels in the state dict.
    """

    def __init__(self, z_dim: int, w_dim: int, num_layers: int, lr_mul: float = MAPPING_LR_MUL, w_avg_beta: float = W_AVG_BETA):
        super().__init__()
        self.z_dim, self.w_dim, self.num_layers, self.w_avg_beta = z_dim, w_dim, num_layers, w_avg_beta
        features = [z_dim] + [w_dim] * num_layers
        self.layers = nn.ModuleList(
            FullyConnectedLayer(features[i], features[i + 1], lrelu=True, lr_mul=lr_mul) for i in range(num_layers)
        )
        self.register_buffer("w_avg", torch.zeros(w_dim))
        self.register_buffer("w_avg_count", torch.zeros([], dtype=torch.int64))

    def forward(self, z: Tensor, update_w_avg: bool = False) -> Tensor:
        assert_shape(z, [None, self.z_dim], "z")
        x = normalize_2nd_moment(z.to(torch.float32))
        for layer in self.layers:
            x = layer(x)
        if update_w_avg:
            with torch.no_grad():
                batch_mean = x.detach().float().mean(dim=0)
                self.w_avg_count += 1
                rate = max(1.0 - self.w_avg_beta, 1.0 / float(self.w_avg_count))
                self.w_avg.copy_(self.w_avg.lerp(batch_mean, rate))
        return x

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # Bundles and training states written before w_avg_count existed: their w_avg is a plain EMA that
        # has already run; continue it as one (count large enough that the rate is 1 - beta).
        key = prefix + "w_avg_count"
        if key not in state_dict and prefix + "w_avg" in state_dict:
            state_dict[key] = torch.tensor(int(1.0 / (1.0 - self.w_avg_beta)) + 1, dtype=torch.int64)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)


def truncate(w: Tensor, center: Tensor, psi: float | Tensor) -> Tensor:
    """The truncation trick toward ``center``: w_t = psi * w + (1 - psi) * center.

    The global mean (StyleGAN's trick) and multi-modal truncation (Mokady et al. 2022, Sec. 4: each
    sample's nearest cluster center) differ only in ``center``. Not c + psi * (w - c), so both ends are
    exact in floats: psi = 1 gives w and psi = 0 gives c bit for bit. ``w`` [B, w_dim]; ``center``
    [w_dim] or [B, w_dim]; ``psi`` a float or a per-sample tensor [B].
    """
    assert_shape(w, [None, None], "w")
    if isinstance(psi, Tensor) and psi.ndim == 1:
        assert_shape(psi, [w.shape[0]], "psi")
        psi = psi.to(w.dtype).reshape(-1, 1)
    center = center.to(w.dtype)
    return psi * w + (1 - psi) * center


# ----------------------------------------------------------------------------------------------
# Synthesis network


def conv2d_up2(x: Tensor, weight: Tensor, f: Tensor, groups: int = 1) -> Tensor:
    """2x upsampling "same" conv in NVIDIA's order: a stride-2 transposed conv (the zero insertion comes
    free), then the FIR low-pass. A quarter of the MACs of upsampling first and convolving at 2H.

    weight [groups * O, I, k, k] as for F.conv2d; the transposed conv applies it spatially flipped,
    which only relabels the learned taps (fused and non-fused paths both come through here).
    """
    up = 2
    group_out, in_channels, kh, kw = weight.shape
    out_channels = group_out // groups
    w = weight.reshape(groups, out_channels, in_channels, kh, kw).transpose(1, 2)
    x = F.conv_transpose2d(x, w.reshape(groups * in_channels, out_channels, kh, kw), stride=up, groups=groups)
    # transposed conv gives (H-1)*up + k pixels; the blur's padding trims them to exactly H*up
    taps, padding = f.shape[0], kw // 2
    pad = (padding + (taps + up - 1) // 2 - (kw - 1), padding + (taps - up) // 2 - (kw - up))
    return upfirdn2d(x, f, padding=pad, gain=up**2)


def modulated_conv2d(x: Tensor, weight: Tensor, styles: Tensor, demodulate: bool = True, fused: bool = True,
                     up: int = 1, resample_filter: Tensor | None = None) -> Tensor:
    """StyleGAN2's modulated convolution (Eqs. 1-3): w'_oi = s_i w_oi, demodulated by 1/||w'_o||.

    fused=True: one grouped conv with per-sample weights (cheap for small batches / inference).
    fused=False: scale activations by the styles, convolve with the shared weight, scale by the
    demodulation coefficients (the same maths; faster for training batches).
    up=2 doubles the resolution (see :func:`conv2d_up2`).
    """
    batch, in_channels, _, _ = x.shape
    out_channels, _, kh, kw = weight.shape
    assert_shape(weight, [out_channels, in_channels, kh, kw], "modulated_conv2d weight")
    assert_shape(styles, [batch, in_channels], "styles")
    padding = kh // 2
    if x.dtype == torch.float16 and demodulate:
        # NVIDIA's guard against fp16 overflow: scale weight and styles to max-norm 1 first; demodulation
        # divides the scale out again, so only the rounding changes (bf16 has fp32's range: not needed)
        weight = weight * (1 / math.sqrt(in_channels * kh * kw) / weight.norm(float("inf"), dim=[1, 2, 3], keepdim=True))
        styles = styles / styles.norm(float("inf"), dim=1, keepdim=True)

    dcoefs = None
    if demodulate or fused:
        w = weight.unsqueeze(0) * styles.reshape(batch, 1, in_channels, 1, 1)  # [B, O, I, kh, kw]
    if demodulate:
        dcoefs = (w.square().sum(dim=[2, 3, 4]) + DEMOD_EPS).rsqrt()  # [B, O]

    if not fused:
        x = x * styles.to(x.dtype).reshape(batch, in_channels, 1, 1)
        if up > 1:
            x = conv2d_up2(x, weight.to(x.dtype), resample_filter)
        else:
            x = F.conv2d(x, weight.to(x.dtype), padding=padding)
        if dcoefs is not None:
            x = x * dcoefs.to(x.dtype).reshape(batch, out_channels, 1, 1)
        return x

    if dcoefs is not None:
        w = w * dcoefs.reshape(batch, out_channels, 1, 1, 1)
    x = x.reshape(1, batch * in_channels, *x.shape[2:])  # the batch becomes conv groups
    w = w.reshape(batch * out_channels, in_channels, kh, kw).to(x.dtype)
    if up > 1:
        x = conv2d_up2(x, w, resample_filter, groups=batch)
    else:
        x = F.conv2d(x, w, padding=padding, groups=batch)
    return x.reshape(batch, out_channels, *x.shape[2:])


class SynthesisLayer(nn.Module):
    """Modulated 3x3 conv (+ optional 2x upsampling) -> per-pixel noise -> bias + lrelu."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int, up: int = 1, conv_clamp: float | None = None):
        super().__init__()
        self.in_channels, self.out_channels, self.resolution, self.up = in_channels, out_channels, resolution, up
        self.conv_clamp = conv_clamp
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=AFFINE_BIAS_INIT)
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, 3, 3))
        self.weight_gain = 1.0 / math.sqrt(in_channels * 3 * 3)  # no-op under demodulation; kept for uniformity
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.noise_strength = nn.Parameter(torch.zeros([]))  # learned, starts with no noise
        self.register_buffer("noise_const", torch.randn(resolution, resolution))
        self.register_buffer("resample_filter", fir_filter(), persistent=False)

    def forward(self, x: Tensor, w: Tensor, noise_mode: NoiseMode, fused: bool) -> Tensor:
        batch = x.shape[0]
        in_res = self.resolution // self.up
        assert_shape(x, [None, self.in_channels, in_res, in_res], "SynthesisLayer input")
        styles = self.affine(w)
        x = modulated_conv2d(x, self.weight * self.weight_gain, styles, True, fused, self.up, self.resample_filter)
        if noise_mode == "random":
            noise = torch.randn(batch, 1, self.resolution, self.resolution, device=x.device, dtype=x.dtype)
            x = x + noise * self.noise_strength.to(x.dtype)
        elif noise_mode == "const":
            x = x + (self.noise_const * self.noise_strength).to(x.dtype)
        return bias_act(x, self.bias, True, LRELU_GAIN, self.conv_clamp)


class ToRGBLayer(nn.Module):
    """Modulated 1x1 conv without demodulation: features -> RGB contribution at this resolution."""

    def __init__(self, in_channels: int, img_channels: int, w_dim: int, conv_clamp: float | None = None):
        super().__init__()
        self.conv_clamp = conv_clamp
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=AFFINE_BIAS_INIT)
        self.weight = nn.Parameter(torch.randn(img_channels, in_channels, 1, 1))
        self.bias = nn.Parameter(torch.zeros(img_channels))
        self.weight_gain = 1.0 / math.sqrt(in_channels)

    def forward(self, x: Tensor, w: Tensor, fused: bool) -> Tensor:
        styles = self.affine(w) * self.weight_gain
        x = modulated_conv2d(x, self.weight, styles, demodulate=False, fused=fused)
        return bias_act(x, self.bias, False, 1.0, self.conv_clamp)


class ResolutionBlock(nn.Module):
    """What G's and D's blocks share: one resolution, its channels, and the precision policy's switch
    (:func:`set_reduced_precision` sets ``compute_dtype`` of the ``reduced_eligible`` blocks)."""

    def __init__(self, in_channels: int, out_channels: int, resolution: int, img_channels: int,
                 reduced_eligible: bool) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.resolution = in_channels, out_channels, resolution
        self.img_channels = img_channels
        self.reduced_eligible = reduced_eligible
        self.compute_dtype = torch.float32


class SynthesisBlock(ResolutionBlock):
    """One resolution of the skip architecture: [const | 2x-up conv] -> conv -> toRGB, img summed."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int, img_channels: int,
                 conv_clamp: float | None = None, reduced_eligible: bool = False):
        super().__init__(in_channels, out_channels, resolution, img_channels, reduced_eligible)
        self.is_first = resolution == INIT_RESOLUTION
        if self.is_first:
            self.const = nn.Parameter(torch.randn(out_channels, resolution, resolution))
        else:
            self.conv0 = SynthesisLayer(in_channels, out_channels, w_dim, resolution, up=2, conv_clamp=conv_clamp)
        self.conv1 = SynthesisLayer(out_channels, out_channels, w_dim, resolution, conv_clamp=conv_clamp)
        self.torgb = ToRGBLayer(out_channels, img_channels, w_dim, conv_clamp=conv_clamp)
        self.num_conv = 1 if self.is_first else 2
        self.num_torgb = 1
        self.register_buffer("resample_filter", fir_filter(), persistent=False)

    def forward(self, x: Tensor | None, img: Tensor | None, ws: Tensor, noise_mode: NoiseMode, fused: bool) -> tuple[Tensor, Tensor]:
        assert_shape(ws, [None, self.num_conv + self.num_torgb, None], "block ws")
        layer_ws = iter(ws.float().unbind(dim=1))  # styles are computed in float32 (affine layers)
        dtype = self.compute_dtype
        if self.is_first:
            x = self.const.to(dtype).unsqueeze(0).expand(ws.shape[0], -1, -1, -1)
        else:
            half = self.resolution // 2
            assert_shape(x, [None, self.in_channels, half, half], "SynthesisBlock x")
            x = self.conv0(x.to(dtype), next(layer_ws), noise_mode, fused)
        x = self.conv1(x, next(layer_ws), noise_mode, fused)
        y = self.torgb(x, next(layer_ws), fused).to(torch.float32)  # the image skip sum stays float32
        img = y if img is None else upsample2d(img, self.resample_filter) + y
        assert_shape(img, [None, self.img_channels, self.resolution, self.resolution], "SynthesisBlock img")
        return x, img


class SynthesisNetwork(nn.Module):
    """ws -> image in [-1, 1] (not clamped). ws: [B, w_dim] (one w for every layer) or [B, num_ws, w_dim].

    Layer l of the num_ws latents: block at 4x4 uses ws[0] (conv) and ws[1] (toRGB); each later block
    uses two conv ws and shares its toRGB w with the next block's first conv, as in NVIDIA's code.
    """

    def __init__(self, w_dim: int, resolution: int, channel_base: int, channel_max: int, img_channels: int = 3,
                 conv_clamp: float | None = None, num_fp16_res: int = 0):
        super().__init__()
        self.w_dim, self.resolution, self.img_channels = w_dim, resolution, img_channels
        self.block_resolutions = [2**i for i in range(2, log2_resolution(resolution) + 1)]
        reduced_from = reduced_precision_from(resolution, num_fp16_res)
        self.blocks = nn.ModuleList(
            SynthesisBlock(channels_at(res // 2, channel_base, channel_max) if res > INIT_RESOLUTION else 0,
                           channels_at(res, channel_base, channel_max), w_dim, res, img_channels, conv_clamp,
                           reduced_eligible=reduced_from is not None and res >= reduced_from)
            for res in self.block_resolutions
        )
        self.num_ws = sum(block.num_conv for block in self.blocks) + self.blocks[-1].num_torgb

    def forward(self, ws: Tensor, noise_mode: NoiseMode = "random", fused_modconv: bool | None = None,
                max_resolution: int | None = None) -> Tensor:
        """fused_modconv=None picks NVIDIA's rule: fused grouped conv when not training.

        ``max_resolution``: stop after that block and return its skip image, the coarse image every
        finer block only adds detail to (a cheap preview: the top blocks hold most of the FLOPs).
        """
        if noise_mode not in NOISE_MODES:
            raise ValueError(f"noise_mode must be one of {NOISE_MODES}, got {noise_mode!r}")
        if max_resolution is not None and max_resolution not in self.block_resolutions:
            raise ValueError(f"max_resolution must be one of {self.block_resolutions}, got {max_resolution}")
        if ws.ndim == 2:
            ws = ws.unsqueeze(1).expand(-1, self.num_ws, -1)
        assert_shape(ws, [None, self.num_ws, self.w_dim], "ws")
        fused = (not self.training) if fused_modconv is None else fused_modconv
        x = img = None
        w_idx = 0
        for block in self.blocks:
            x, img = block(x, img, ws[:, w_idx : w_idx + block.num_conv + block.num_torgb], noise_mode, fused)
            w_idx += block.num_conv
            if block.resolution == max_resolution:
                break
        return img


class Generator(nn.Module):
    """G(z) = synthesis(mapping(z)). Style mixing is the training loop's (it builds [B, num_ws, w_dim])."""

    def __init__(self, z_dim: int, w_dim: int, resolution: int, channel_base: int, channel_max: int, mapping_layers: int,
                 img_channels: int = 3, conv_clamp: float | None = None, num_fp16_res: int = 0):
        super().__init__()
        self.z_dim, self.w_dim, self.resolution, self.img_channels = z_dim, w_dim, resolution, img_channels
        self.synthesis = SynthesisNetwork(w_dim, resolution, channel_base, channel_max, img_channels, conv_clamp, num_fp16_res)
        self.num_ws = self.synthesis.num_ws
        self.mapping = MappingNetwork(z_dim, w_dim, mapping_layers)

    def forward(self, z: Tensor, noise_mode: NoiseMode = "random") -> Tensor:
        """An untruncated sample; truncated sampling is the Sampler's (sdsg_ray.truncation)."""
        return self.synthesis(self.mapping(z), noise_mode=noise_mode)


# ----------------------------------------------------------------------------------------------
# Discriminator and encoder


class DiscriminatorBlock(ResolutionBlock):
    """Residual block: (conv3x3 -> conv3x3 down) + 1x1 down skip, sum scaled by 1/sqrt(2)."""

    def __init__(self, in_channels: int, tmp_channels: int, out_channels: int, resolution: int, img_channels: int,
                 conv_clamp: float | None = None, reduced_eligible: bool = False):
        super().__init__(in_channels, out_channels, resolution, img_channels, reduced_eligible)
        if in_channels == 0:  # the first block reads the image
            self.fromrgb = Conv2dLayer(img_channels, tmp_channels, kernel_size=1, conv_clamp=conv_clamp)
        self.conv0 = Conv2dLayer(tmp_channels, tmp_channels, kernel_size=3, conv_clamp=conv_clamp)
        self.conv1 = Conv2dLayer(tmp_channels, out_channels, kernel_size=3, down=2, conv_clamp=conv_clamp)
        self.skip = Conv2dLayer(tmp_channels, out_channels, kernel_size=1, lrelu=False, bias=False, down=2)

    def forward(self, x: Tensor) -> Tensor:
        r = self.resolution
        x = x.to(self.compute_dtype)
        if self.in_channels == 0:
            assert_shape(x, [None, self.img_channels, r, r], "image")
            x = self.fromrgb(x)
        else:
            assert_shape(x, [None, self.in_channels, r, r], "DiscriminatorBlock input")
        y = self.skip(x, gain=RESIDUAL_GAIN)
        x = self.conv1(self.conv0(x), gain=RESIDUAL_GAIN)
        return y + x


class MinibatchStdLayer(nn.Module):
    """Appends the mean std-dev over groups of samples as extra channel(s): lets D see diversity.

    Group size min(group_size, B), reduced to a divisor of B so any batch size works.
    """

    def __init__(self, group_size: int, num_channels: int = MBSTD_CHANNELS):
        super().__init__()
        self.group_size, self.num_channels = group_size, num_channels

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        g = min(self.group_size, n)
        while n % g:
            g -= 1
        f = self.num_channels
        y = x.reshape(g, -1, f, c // f, h, w)  # [G, n, F, c, H, W]: sample i*... grouped across the batch
        y = y - y.mean(dim=0)
        y = (y.square().mean(dim=0) + MBSTD_EPS).sqrt()  # std over the group  [n, F, c, H, W]
        y = y.mean(dim=[2, 3, 4]).reshape(-1, f, 1, 1)  # [n, F, 1, 1]
        y = y.repeat(g, 1, h, w)  # [N, F, H, W]
        return torch.cat([x, y.to(x.dtype)], dim=1)


class _ResidualTrunk(nn.Module):
    """fromRGB + DiscriminatorBlocks from `resolution` down to 4x4 (shared by D and E)."""

    def __init__(self, resolution: int, channel_base: int, channel_max: int, img_channels: int,
                 conv_clamp: float | None = None, num_fp16_res: int = 0):
        super().__init__()
        reduced_from = reduced_precision_from(resolution, num_fp16_res)
        self.blocks = nn.ModuleList(
            DiscriminatorBlock(channels_at(res, channel_base, channel_max) if res < resolution else 0,
                               channels_at(res, channel_base, channel_max),
                               channels_at(res // 2, channel_base, channel_max), res, img_channels, conv_clamp,
                               reduced_eligible=reduced_from is not None and res >= reduced_from)
            for res in (2**i for i in range(log2_resolution(resolution), 2, -1))
        )
        self.out_channels = channels_at(INIT_RESOLUTION, channel_base, channel_max)

    def forward(self, img: Tensor) -> Tensor:
        x = img
        for block in self.blocks:
            x = block(x)
        x = x.to(torch.float32)  # the 4x4 epilogue (and so every logit and w) is float32
        assert_shape(x, [None, self.out_channels, INIT_RESOLUTION, INIT_RESOLUTION], "trunk output")
        return x


class Discriminator(nn.Module):
    """Residual D; epilogue at 4x4: minibatch-std -> conv3x3 -> FC -> FC to one logit per image."""

    def __init__(self, resolution: int, channel_base: int, channel_max: int, img_channels: int = 3, mbstd_group: int = 4,
                 conv_clamp: float | None = None, num_fp16_res: int = 0, mbstd_channels: int = MBSTD_CHANNELS):
        super().__init__()
        self.trunk = _ResidualTrunk(resolution, channel_base, channel_max, img_channels, conv_clamp, num_fp16_res)
        c = self.trunk.out_channels
        self.mbstd = MinibatchStdLayer(mbstd_group, mbstd_channels)
        self.conv = Conv2dLayer(c + mbstd_channels, c, kernel_size=3, conv_clamp=conv_clamp)
        self.fc = FullyConnectedLayer(c * INIT_RESOLUTION**2, c, lrelu=True)
        self.out = FullyConnectedLayer(c, 1)

    def forward(self, img: Tensor) -> Tensor:
        x = self.conv(self.mbstd(self.trunk(img)))
        return self.out(self.fc(x.flatten(1)))


class Encoder(nn.Module):
    """E: image -> w, with D's residual architecture and an FC head into W (or W+).

    No minibatch-std layer: E(x) must depend on x alone, so a reconstruction score d(x) does not
    change with whichever images share x's batch. Output = ``w_avg + head(features)``: ``w_avg`` is a
    saved buffer (zeros at init) that the training loop keeps equal to G.mapping.w_avg, so E starts near
    the mean latent rather than near 0 (a point G never trains on) and learns offsets from it.
    """

    def __init__(self, resolution: int, channel_base: int, channel_max: int, w_dim: int, num_ws: int, w_plus: bool = False,
                 img_channels: int = 3, conv_clamp: float | None = None, num_fp16_res: int = 0):
        super().__init__()
        self.w_dim, self.num_ws, self.w_plus = w_dim, num_ws, w_plus
        self.trunk = _ResidualTrunk(resolution, channel_base, channel_max, img_channels, conv_clamp, num_fp16_res)
        c = self.trunk.out_channels
        self.conv = Conv2dLayer(c, c, kernel_size=3, conv_clamp=conv_clamp)
        self.fc = FullyConnectedLayer(c * INIT_RESOLUTION**2, c, lrelu=True)
        self.out = FullyConnectedLayer(c, w_dim * (num_ws if w_plus else 1))
        self.register_buffer("w_avg", torch.zeros(w_dim))

    def forward(self, img: Tensor) -> Tensor:
        x = self.fc(self.conv(self.trunk(img)).flatten(1))
        offset = self.out(x)
        if self.w_plus:
            offset = offset.reshape(-1, self.num_ws, self.w_dim)
        return self.w_avg.to(offset.dtype) + offset


# ----------------------------------------------------------------------------------------------
# Reconstruction: the one definition of G(E(x))

# d(x) must be a deterministic function of x (independent of its batch and of re-runs) and exactly what
# stage 1 optimised: both use constant noise.
RECONSTRUCTION_NOISE: NoiseMode = "const"


class Reconstruction(NamedTuple):
    w: Tensor  # E(x): [B, w_dim] (or [B, num_ws, w_dim] for a W+ encoder)
    image: Tensor  # G(E(x)) in [-1, 1], not clamped: [B, C, R, R]


def reconstruct(synthesis: nn.Module, encoder: nn.Module, images: Tensor,
                noise_mode: NoiseMode = RECONSTRUCTION_NOISE) -> Reconstruction:
    """x -> (E(x), G(E(x))), G the synthesis network alone (the paper's G(w) skips the mapping).

    The training loss, the scorer's d(x), the reconstruction grids and the selection's examples all
    call this, so the filtering score is the quantity stage 1 trained.
    """
    w = encoder(images)
    image = synthesis(w, noise_mode=noise_mode)
    assert image.shape == images.shape, f"G(E(x)) has shape {tuple(image.shape)}, x {tuple(images.shape)}"
    return Reconstruction(w, image)


# ----------------------------------------------------------------------------------------------
# Builders from the typed config


def build_generator(model: "ModelConfig") -> Generator:
    return Generator(model.z_dim, model.w_dim, model.resolution, model.channel_base, model.channel_max, model.mapping_layers,
                     conv_clamp=model.conv_clamp, num_fp16_res=model.num_fp16_res)


def build_discriminator(model: "ModelConfig") -> Discriminator:
    return Discriminator(model.resolution, model.channel_base, model.channel_max, mbstd_group=model.mbstd_group,
                         mbstd_channels=model.mbstd_channels, conv_clamp=model.conv_clamp, num_fp16_res=model.num_fp16_res)


def build_encoder(model: "ModelConfig", num_ws: int) -> Encoder:
    """E for one model config (num_ws: its generator's)."""
    return Encoder(model.resolution, model.channel_base, model.channel_max, model.w_dim, num_ws, w_plus=model.encoder_w_plus,
                   conv_clamp=model.conv_clamp, num_fp16_res=model.num_fp16_res)


def build_networks(model: "ModelConfig") -> tuple[Generator, Discriminator, Encoder]:
    """Freshly initialised (G, D, E) for one model config; E's num_ws matches G's. Every block computes in
    float32 until :func:`set_reduced_precision` switches the eligible ones (the training loop does)."""
    G = build_generator(model)
    D = build_discriminator(model)
    E = build_encoder(model, G.num_ws)
    return G, D, E
