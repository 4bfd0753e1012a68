"""StyleGAN2 networks: shapes, the maths of each piece, and the invariants the training loop relies on.

Random-weight networks are honest here: every test checks structure or an identity that holds for any
weights (fused == non-fused, truncation algebra, mixing crossovers, determinism, equalized LR scales).
"""

from __future__ import annotations

import math

import pytest
import torch

from sdsg_ray.config import ModelConfig
from sdsg_ray.models import Discriminator, Encoder, Generator, build_generator, build_networks, truncate
from sdsg_ray.models.networks import (
    LRELU_GAIN,
    MAPPING_LR_MUL,
    Conv2dLayer,
    FullyConnectedLayer,
    MinibatchStdLayer,
    conv2d_up2,
    fir_filter,
    modulated_conv2d,
    upfirdn2d,
    upsample2d,
)

TINY = dict(channel_base=256, channel_max=16)  # 16 channels everywhere: fast on CPU


def tiny_model(resolution: int = 32, **kw) -> ModelConfig:
    return ModelConfig(resolution=resolution, z_dim=32, w_dim=32, mapping_layers=2, **TINY, **kw)


@pytest.fixture(scope="module")
def G() -> Generator:
    torch.manual_seed(0)
    return build_generator(tiny_model()).eval()


@pytest.mark.parametrize("resolution", [16, 32, 64])
def test_shapes_every_network(resolution):
    torch.manual_seed(0)
    G, D, E = build_networks(tiny_model(resolution))
    assert G.num_ws == 2 * int(math.log2(resolution)) - 2
    z = torch.randn(2, 32)
    w = G.mapping(z)
    assert w.shape == (2, 32)
    img = G.synthesis(w)
    assert img.shape == (2, 3, resolution, resolution)
    assert torch.equal(G.synthesis(w.unsqueeze(1).repeat(1, G.num_ws, 1), noise_mode="none"), G.synthesis(w, noise_mode="none"))
    assert D(img).shape == (2, 1)
    assert E(img).shape == (2, 32)
    E_plus = Encoder(resolution, TINY["channel_base"], TINY["channel_max"], 32, G.num_ws, w_plus=True)
    assert E_plus(img).shape == (2, G.num_ws, 32)


def test_channel_schedule_and_bad_input():
    G = Generator(64, 64, 32, channel_base=2048, channel_max=64, mapping_layers=2)
    assert [b.out_channels for b in G.synthesis.blocks] == [64, 64, 64, 64]
    G = Generator(8, 8, 64, channel_base=512, channel_max=64, mapping_layers=1)
    assert [b.out_channels for b in G.synthesis.blocks] == [64, 64, 32, 16, 8]  # min(512 // r, 64)
    with pytest.raises(ValueError, match="power of two"):
        Discriminator(48, 256, 16)
    with pytest.raises(ValueError, match="noise_mode"):
        G.synthesis(torch.zeros(1, 8), noise_mode="fixed")
    with pytest.raises(Exception, match="ws"):
        G.synthesis(torch.zeros(1, 3, 8))  # wrong num_ws


@pytest.mark.parametrize("up", [1, 2])
def test_fused_and_nonfused_modconv_agree(up):
    torch.manual_seed(0)
    x, weight, styles = torch.randn(4, 8, 8, 8), torch.randn(6, 8, 3, 3), torch.randn(4, 8)
    f = fir_filter()
    fused = modulated_conv2d(x, weight, styles, demodulate=True, fused=True, up=up, resample_filter=f)
    split = modulated_conv2d(x, weight, styles, demodulate=True, fused=False, up=up, resample_filter=f)
    assert fused.shape == (4, 6, 8 * up, 8 * up)
    torch.testing.assert_close(fused, split, atol=1e-5, rtol=1e-5)
    if up == 1:  # demodulation: white unit-variance input -> ~unit second moment out, whatever the styles
        assert 0.5 < fused.square().mean().item() < 2.0


def test_whole_generator_fused_flag(G):
    ws = G.mapping(torch.randn(3, 32))
    torch.testing.assert_close(
        G.synthesis(ws, noise_mode="const", fused_modconv=True), G.synthesis(ws, noise_mode="const", fused_modconv=False), atol=1e-5, rtol=1e-5
    )


def test_style_mixing_crossovers(G):
    w1, w2 = G.mapping(torch.randn(2, 32)).chunk(2)
    num_ws = G.num_ws

    def mixed(cutoff: int) -> torch.Tensor:
        ws = w1.unsqueeze(1).repeat(1, num_ws, 1)
        ws[:, cutoff:] = w2.unsqueeze(1)
        return G.synthesis(ws, noise_mode="const")

    img1, img2 = G.synthesis(w1, noise_mode="const"), G.synthesis(w2, noise_mode="const")
    torch.testing.assert_close(mixed(num_ws), img1)
    torch.testing.assert_close(mixed(0), img2)
    # a late crossover (only the last toRGB/convs) changes the image less than an early one
    late, early = (mixed(num_ws - 2) - img1).abs().mean(), (mixed(2) - img1).abs().mean()
    assert 0 < late < early


def test_truncation_algebra(G):
    w_avg = torch.randn(32)
    z = torch.randn(5, 32)
    with torch.no_grad():
        w = G.mapping(z)
    assert torch.equal(truncate(w, w_avg, 0.0), w_avg.expand(5, -1))  # exact at both ends
    assert torch.equal(truncate(w, w_avg, 1.0), w)
    torch.testing.assert_close(truncate(w, w_avg, 0.3), w_avg + 0.3 * (w - w_avg))
    per_sample = truncate(w, w_avg, torch.tensor([0.0, 1.0, 0.5, 0.5, 0.5]))
    assert torch.equal(per_sample[0], w_avg) and torch.equal(per_sample[1], w[1])
    torch.testing.assert_close(per_sample[2], (w[2] + w_avg) / 2)
    centers = torch.randn(5, 32)  # multi-modal: each sample its own center
    assert torch.equal(truncate(w, centers, 0.0), centers)
    torch.testing.assert_close(truncate(w, centers, 0.5)[3], (w[3] + centers[3]) / 2)


def test_w_avg_updates_only_when_asked():
    torch.manual_seed(0)
    G = build_generator(tiny_model()).train()
    z = torch.randn(16, 32)
    G.mapping(z)
    assert torch.count_nonzero(G.mapping.w_avg) == 0  # training mode alone does not move it
    w = G.mapping(z, update_w_avg=True)
    # Debiased EMA: the first update is the batch mean itself (not 0.005 of it, a pull toward zero) ...
    torch.testing.assert_close(G.mapping.w_avg, w.mean(dim=0))
    w2 = G.mapping(torch.randn(16, 32), update_w_avg=True)
    # ... and the n-th moves max(1 - beta, 1/n) of the way: a running mean while n < 200.
    torch.testing.assert_close(G.mapping.w_avg, (w.mean(dim=0) + w2.mean(dim=0)) / 2)


def test_equalized_learning_rate_scales():
    torch.manual_seed(0)
    fc = FullyConnectedLayer(512, 256, lr_mul=MAPPING_LR_MUL)
    assert fc.weight.std().item() == pytest.approx(1 / MAPPING_LR_MUL, rel=0.05)  # stored N(0,1)/lr_mul
    effective = fc.weight * fc.weight_gain
    assert effective.std().item() == pytest.approx(1 / math.sqrt(512), rel=0.05)  # He: 1/sqrt(fan_in)
    conv = Conv2dLayer(64, 32, kernel_size=3)
    assert (conv.weight * conv.weight_gain).std().item() == pytest.approx(1 / math.sqrt(64 * 9), rel=0.05)
    # with lrelu gain sqrt(2), unit-variance input keeps ~unit second moment through the layer
    out = Conv2dLayer(64, 64, 3)(torch.randn(8, 64, 16, 16))
    assert out.square().mean().item() == pytest.approx(1.0, rel=0.25)
    assert conv.act_gain == LRELU_GAIN
    # the mapping network's layers all use the 0.01 multiplier (also on the bias)
    G = build_generator(tiny_model())
    assert all(layer.bias_gain == MAPPING_LR_MUL for layer in G.mapping.layers)


def test_noise_modes_determinism(G):
    for layer in G.synthesis.modules():
        if hasattr(layer, "noise_strength"):
            layer.noise_strength.data.fill_(0.5)  # make noise visible
    try:
        w = G.mapping(torch.randn(2, 32))
        assert torch.equal(G.synthesis(w, noise_mode="const"), G.synthesis(w, noise_mode="const"))
        assert torch.equal(G.synthesis(w, noise_mode="none"), G.synthesis(w, noise_mode="none"))
        assert not torch.equal(G.synthesis(w, noise_mode="random"), G.synthesis(w, noise_mode="random"))
        assert not torch.equal(G.synthesis(w, noise_mode="const"), G.synthesis(w, noise_mode="none"))
    finally:
        for layer in G.synthesis.modules():
            if hasattr(layer, "noise_strength"):
                layer.noise_strength.data.zero_()


def test_upfirdn2d_hand_checkable():
    f = fir_filter()
    assert f.sum().item() == pytest.approx(1.0)
    ones = torch.ones(1, 1, 8, 8)
    up = upsample2d(ones, f)
    assert up.shape == (1, 1, 16, 16)
    assert torch.allclose(up[..., 2:-2, 2:-2], torch.ones(1)), "a constant stays constant inside"
    delta = torch.zeros(1, 1, 8, 8)
    delta[..., 4, 4] = 1
    up = upsample2d(delta, f)
    assert up.sum().item() == pytest.approx(4.0)  # mass x up**2: gain compensates the zero insertion
    expected_1d = torch.tensor([1.0, 3.0, 3.0, 1.0]) / 8 * 2  # filter taps x sqrt(gain) per axis
    torch.testing.assert_close(up[0, 0, 7:11, 7:11], torch.outer(expected_1d, expected_1d))
    down = upfirdn2d(ones, f, down=2, padding=(1, 1))
    assert down.shape == (1, 1, 4, 4)
    assert torch.allclose(down[..., 1:-1, 1:-1], torch.ones(1))


def test_upsampling_conv_is_upsample_then_conv():
    """With an identity 3x3 kernel (centre tap only) the transposed-conv path equals plain FIR upsampling."""
    x = torch.randn(2, 3, 8, 8)
    identity = torch.zeros(3, 3, 3, 3)
    identity[range(3), range(3), 1, 1] = 1.0
    torch.testing.assert_close(conv2d_up2(x, identity, fir_filter()), upsample2d(x, fir_filter()), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
    "kw",
    [dict(up=2, padding=(2, 1), gain=4.0), dict(down=2, padding=(1, 1)), dict(down=2, padding=(2, 2)), dict(padding=(-1, 2)), dict(up=2, down=2, padding=(1, 1))],
)
def test_upfirdn2d_fast_paths_are_exact(kw):
    x = torch.randn(2, 3, 8, 8)
    fast, ref = upfirdn2d(x, fir_filter(), **kw), upfirdn2d(x, fir_filter(), impl="ref", **kw)
    assert fast.shape == ref.shape
    torch.testing.assert_close(fast, ref, atol=1e-6, rtol=1e-6)


def test_minibatch_std_and_encoder_independence():
    mbstd = MinibatchStdLayer(group_size=4)
    x = torch.randn(6, 5, 4, 4)  # 6 is not a multiple of 4: falls back to groups of 3
    y = mbstd(x)
    assert y.shape == (6, 6, 4, 4)
    torch.testing.assert_close(y[:, :5], x)
    same = torch.ones(4, 5, 4, 4)
    assert mbstd(same)[:, 5].max().item() < 1e-3  # identical samples: no spread
    torch.manual_seed(0)
    E = Encoder(32, TINY["channel_base"], TINY["channel_max"], 32, num_ws=8)
    imgs = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(E(imgs)[:1], E(imgs[:1]), atol=1e-5, rtol=1e-5)  # per-image, no batch statistics
    before = E(imgs)
    with torch.no_grad():
        E.w_avg.fill_(3.0)
    torch.testing.assert_close(E(imgs), before + 3.0)  # E predicts an offset from the mean latent


def test_backward_channels_last_and_autocast():
    torch.manual_seed(0)
    G, D, E = build_networks(tiny_model())
    G, D, E = (m.train().to(memory_format=torch.channels_last) for m in (G, D, E))
    img = G(torch.randn(4, 32))
    loss = torch.nn.functional.softplus(-D(img)).mean() + E(img).square().mean()
    loss.backward()
    for name, p in G.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert G.synthesis.blocks[-1].torgb.weight.grad.abs().sum() > 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = G.eval()(torch.randn(2, 32), noise_mode="const")
        assert out.shape == (2, 3, 32, 32) and torch.isfinite(out).all()
        assert D(out).shape == (2, 1)
