"""NVIDIA's mixed-precision policy on CPU (bf16 runs there): which blocks compute in reduced precision,
conv clamping, float32 regularisers and losses, finite reduced-precision steps, and that the policy off
is the float32 network bit for bit."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from sdsg_ray.config import ModelConfig, load_config
from sdsg_ray.models.networks import (
    RESIDUAL_GAIN,
    Conv2dLayer,
    DiscriminatorBlock,
    FullyConnectedLayer,
    SynthesisBlock,
    SynthesisLayer,
    ToRGBLayer,
    build_networks,
    reduced_precision_from,
    set_reduced_precision,
)

TINY = {"train.metric": "stlpips-alex", "model.resolution": 16, "model.channel_max": 32, "model.z_dim": 32,
        "model.w_dim": 32, "train.batch_size": 4}
LAYERS = (Conv2dLayer, SynthesisLayer, ToRGBLayer, FullyConnectedLayer)


def _batch(seed: int, n: int = 4, res: int = 16) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, res, res, 3), dtype=np.uint8))


def _record_dtypes(module: nn.Module) -> tuple[dict[str, torch.dtype], list]:
    """Output dtype of every layer under ``module`` (qualified names), filled by forward hooks."""
    seen: dict[str, torch.dtype] = {}
    handles = [
        layer.register_forward_hook(lambda m, args, out, name=name: seen.__setitem__(name, out.dtype))
        for name, layer in module.named_modules() if isinstance(layer, LAYERS)
    ]
    return seen, handles


def _block_of(module: nn.Module, layer_name: str) -> nn.Module | None:
    """The SynthesisBlock / DiscriminatorBlock that holds a layer, or None (mapping, epilogue, head)."""
    parts = layer_name.split(".")
    for i in range(len(parts), 0, -1):
        owner = module.get_submodule(".".join(parts[:i]))
        if isinstance(owner, (SynthesisBlock, DiscriminatorBlock)):
            return owner
    return None


def test_eligible_blocks_follow_nvidias_fp16_resolution():
    assert reduced_precision_from(256, 4) == 32  # the paper's 256-px model: blocks 32..256
    assert reduced_precision_from(1024, 4) == 128
    assert reduced_precision_from(32, 4) == 8  # never the 4x4 block
    assert reduced_precision_from(256, 0) is None
    model = ModelConfig(resolution=256, channel_base=256, channel_max=4, z_dim=8, w_dim=8, num_fp16_res=4)
    G, D, E = build_networks(model)
    assert [b.resolution for b in G.synthesis.blocks if b.reduced_eligible] == [32, 64, 128, 256]
    assert [b.resolution for b in D.trunk.blocks if b.reduced_eligible] == [256, 128, 64, 32]
    assert [b.resolution for b in E.trunk.blocks if b.reduced_eligible] == [256, 128, 64, 32]


def test_only_the_highest_resolution_blocks_run_in_reduced_precision():
    """Forward hooks on every layer: bf16 exactly inside the eligible blocks of G, D and E; the mapping
    network, the low-resolution blocks, D/E's epilogue and every network output stay float32."""
    torch.manual_seed(0)
    model = ModelConfig(resolution=64, channel_base=512, channel_max=16, z_dim=16, w_dim=16, num_fp16_res=2)
    G, D, E = build_networks(model)
    assert sorted(set_reduced_precision(G, torch.bfloat16)) == [32, 64]
    assert sorted(set_reduced_precision(D, torch.bfloat16)) == [32, 64]
    assert sorted(set_reduced_precision(E, torch.bfloat16)) == [32, 64]
    for net in (G, D, E):
        seen, handles = _record_dtypes(net)
        if net is G:
            out = G(torch.randn(3, 16))
            img = out
        else:
            out = net(img.detach())
        for h in handles:
            h.remove()
        assert out.dtype == torch.float32
        assert len(seen) == sum(isinstance(m, LAYERS) for m in net.modules())  # every layer ran
        for name, dtype in seen.items():
            block = _block_of(net, name)
            reduced = block is not None and block.resolution >= 32 and not name.endswith("affine")
            assert dtype == (torch.bfloat16 if reduced else torch.float32), (type(net).__name__, name, dtype)
    assert sum(dtype == torch.bfloat16 for dtype in seen.values()) > 0


def test_conv_clamp_is_applied_and_scaled_by_the_layers_gain():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8) * 100
    clamped = Conv2dLayer(4, 8, 3, conv_clamp=1.0)
    free = Conv2dLayer(4, 8, 3)
    free.load_state_dict(clamped.state_dict())
    with torch.no_grad():
        assert float(free(x).abs().max()) > 1.0
        assert float(clamped(x).abs().max()) == pytest.approx(1.0)
        assert float(clamped(x, gain=RESIDUAL_GAIN).abs().max()) == pytest.approx(RESIDUAL_GAIN)  # clamp * gain  # clamp * gain, as NVIDIA

    # in the built networks: every clamped layer of G, D and E stays inside +-conv_clamp
    model = ModelConfig(resolution=16, channel_base=256, channel_max=16, z_dim=16, w_dim=16, conv_clamp=0.05)
    G, D, E = build_networks(model)
    clamped_layers = [m for net in (G, D, E) for m in net.modules() if getattr(m, "conv_clamp", None) is not None]
    assert len(clamped_layers) > 10
    peaks = []
    hooks = [m.register_forward_hook(lambda m, a, out: peaks.append(float(out.detach().abs().max()))) for m in clamped_layers]
    img = G(torch.randn(4, 16))
    D(img), E(img)
    for h in hooks:
        h.remove()
    assert len(peaks) == len(clamped_layers) and max(peaks) <= 0.05 + 1e-6
    assert max(peaks) == pytest.approx(0.05)  # the clamp bites at this tiny bound


def test_r1_and_path_length_are_computed_in_float32_with_reduced_blocks(monkeypatch):
    from sdsg_ray.training import losses
    from sdsg_ray.training.loop import TrainingRun

    calls: list[tuple[str, list[torch.dtype]]] = []

    def spy(name, fn):
        def wrapped(*args):
            result = fn(*args)
            calls.append((name, [a.dtype for a in args] + [result.dtype]))
            return result
        return wrapped

    monkeypatch.setattr(losses, "r1_penalty", spy("r1", losses.r1_penalty))
    monkeypatch.setattr(losses, "path_lengths", spy("pl", losses.path_lengths))
    config = load_config(None, {**TINY, "train.stage": "generator"})
    run = TrainingRun(config, reduced_precision=True)
    assert run.reduced_dtype == torch.bfloat16 and run.reduced_blocks["G"] and run.reduced_blocks["D"]
    seen, handles = _record_dtypes(run.D)
    logs = run.step(_batch(0))  # step 0: every phase, both regularisers included
    for h in handles:
        h.remove()
    assert torch.bfloat16 in seen.values()  # D's top blocks did run in bf16 ...
    assert {name for name, _ in calls} == {"r1", "pl"}
    for name, dtypes in calls:  # ... while the penalties' inputs, gradients and results are float32
        assert all(d == torch.float32 for d in dtypes), (name, dtypes)
    for key in ("loss/D_r1", "loss/G_pl", "loss/G_adv", "loss/D_real", "loss/D_fake"):
        assert logs[key].dtype == torch.float32 and math.isfinite(float(logs[key])), key


@pytest.mark.slow  # ~2-3 min on this loaded 2-core machine (bf16 convs are emulated on CPU)
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_a_joint_step_in_reduced_precision_gives_finite_losses(dtype):
    from sdsg_ray.pretrained import build_metric
    from sdsg_ray.training.loop import TrainingRun

    config = load_config(None, {**TINY, "model.precision_dtype": dtype})
    run = TrainingRun(config, metric=build_metric(config.train.metric), reduced_precision=True)
    assert run.reduced_dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    assert set(run.reduced_blocks) == {"G", "D", "E"} and all(run.reduced_blocks.values())
    for step in range(1):  # step 0 runs every phase: G, E, path length, D and R1
        logs = run.step(_batch(step))
        assert {"loss/G_adv", "loss/E_w", "loss/rec_l1", "loss/rec_lpips", "loss/D_real"} <= set(logs)
        for key, value in logs.items():
            assert value.dtype == torch.float32 and torch.isfinite(value).all(), (step, key, value)
    for p in list(run.G.parameters()) + list(run.E.parameters()):
        assert p.dtype == torch.float32 and torch.isfinite(p).all()  # weights stay float32


def test_policy_off_is_the_float32_network_bit_for_bit():
    """CPU default (policy off) with num_fp16_res=4 and conv_clamp=256 trains exactly like a network built
    with neither; and switching reduced precision on and off again restores the float32 output exactly."""
    from sdsg_ray.training.loop import TrainingRun

    base = {**TINY, "train.stage": "generator"}
    off = TrainingRun(load_config(None, {**base, "model.num_fp16_res": 4}))
    plain = TrainingRun(load_config(None, {**base, "model.num_fp16_res": 0, "model.conv_clamp": None}))
    assert off.reduced_dtype is None and not any(off.reduced_blocks.values())
    for step in range(2):
        a, b = off.step(_batch(step)), plain.step(_batch(step))
        assert {k: float(v) for k, v in a.items()} == {k: float(v) for k, v in b.items()}
    assert off.param_checksum() == plain.param_checksum()

    G = off.G.eval()
    z = torch.randn(2, G.z_dim)
    ref = G(z, noise_mode="const")
    set_reduced_precision(G, torch.bfloat16)
    assert not torch.equal(G(z, noise_mode="const"), ref)  # reduced precision does change the numbers
    set_reduced_precision(G, None)
    assert torch.equal(G(z, noise_mode="const"), ref)
