"""The training objective and loop without Ray: regularisers on hand-checkable cases, data order,
state round trips and exact resumption."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from sdsg_ray.config import load_config
from sdsg_ray.storage import get_storage
from sdsg_ray.training.data import ImageDataset, StepBatchSampler
from sdsg_ray.training.losses import (
    PathLengthMean,
    ema_beta,
    lazy_regularization_adam,
    mix_styles,
    path_lengths,
    r1_penalty,
)

TINY = {"train.metric": "stlpips-alex", "model.resolution": 16, "model.channel_max": 32, "model.z_dim": 32, "model.w_dim": 32, "train.batch_size": 4}


# --- regularisers -------------------------------------------------------------------------------


def test_r1_of_a_linear_discriminator_is_the_squared_weight_norm():
    """D(x) = <a, x> + b: grad_x D = a for every sample, so R1 = ||a||^2 and d(gamma/2 R1)/da = gamma a."""
    torch.manual_seed(0)
    D = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 1))
    real = torch.randn(5, 3, 4, 4, requires_grad=True)
    penalty = r1_penalty(real, D(real))
    a = D[1].weight.detach().flatten()
    torch.testing.assert_close(penalty, a.square().sum().expand(5))
    gamma = 0.7
    (penalty * gamma / 2).mean().backward()
    torch.testing.assert_close(D[1].weight.grad.flatten(), gamma * a)
    assert D[1].bias.grad is None  # the bias does not enter the gradient w.r.t. x


def test_path_length_of_a_linear_synthesis_matches_its_jacobian():
    """img = A vec(ws): J^T y = A^T y, length = sqrt(mean_layers sum_w (A^T y)^2); and its gradient
    w.r.t. A is y g^T / (L num_ws) with g = A^T y (needs create_graph)."""
    torch.manual_seed(0)
    batch, num_ws, w_dim, res = 3, 4, 5, 4
    A = torch.randn(3 * res * res, num_ws * w_dim, requires_grad=True)
    ws = torch.randn(batch, num_ws, w_dim, requires_grad=True)
    img = (ws.flatten(1) @ A.T).reshape(batch, 3, res, res)
    noise = torch.randn_like(img)
    lengths = path_lengths(img, ws, noise)

    g = noise.flatten(1) @ A.detach()  # [B, num_ws * w_dim] = (A^T y) per sample
    expected = g.reshape(batch, num_ws, w_dim).square().sum(2).mean(1).sqrt()
    torch.testing.assert_close(lengths, expected)

    lengths[0].backward()
    grad_expected = torch.outer(noise[0].flatten(), g[0]) / (expected[0] * num_ws)
    torch.testing.assert_close(A.grad, grad_expected)


def test_path_length_mean_is_an_ema_with_decay_001():
    tracker = PathLengthMean(decay=0.01)
    tracker.update(torch.tensor([2.0, 4.0]))
    assert tracker.value.item() == pytest.approx(0.03)
    tracker.update(torch.tensor([3.0]))
    assert tracker.value.item() == pytest.approx(0.03 + 0.01 * (3.0 - 0.03))


def test_lazy_regularization_corrects_lr_and_betas():
    lr, betas = lazy_regularization_adam(0.002, (0.0, 0.99), 16)
    assert lr == pytest.approx(0.002 * 16 / 17)
    assert betas == (0.0, pytest.approx(0.99 ** (16 / 17)))
    assert lazy_regularization_adam(0.002, (0.0, 0.99), None) == (0.002, (0.0, 0.99))


def test_ema_half_life_is_ema_kimg():
    beta = ema_beta(global_batch=8, ema_kimg=0.5, cur_nimg=10**6, ema_rampup=0.05)  # past the ramp-up
    assert beta ** (500 / 8) == pytest.approx(0.5)


def test_style_mixing_takes_the_tail_from_the_second_latent():
    ws, other = torch.zeros(2, 6, 3), torch.ones(2, 6, 3)
    torch.manual_seed(1)
    mixed = mix_styles(ws, other, prob=1.0)
    per_layer = mixed[0, :, 0]
    cutoff = int((per_layer == 0).sum())
    assert 1 <= cutoff < 6
    assert per_layer[:cutoff].eq(0).all() and per_layer[cutoff:].eq(1).all()
    assert mix_styles(ws, other, prob=0.0) is ws


# --- data ----------------------------------------------------------------------------------------


def test_sampler_splits_each_global_batch_into_disjoint_rank_slices_and_resumes_exactly():
    n, batch, world = 12, 4, 2
    samplers = [StepBatchSampler(n, batch, rank, world, seed=3, num_steps=10) for rank in range(world)]
    steps = [list(s) for s in samplers]
    for k in range(10):
        global_batch = steps[0][k] + steps[1][k]
        assert len(set(global_batch)) == batch  # the ranks' halves are disjoint
    # Each epoch (3 global batches here) is a fresh permutation of the dataset.
    stream = [i for k in range(9) for r in range(world) for i in steps[r][k]]
    epochs = [stream[e * n : (e + 1) * n] for e in range(3)]
    assert all(sorted(e) == list(range(n)) for e in epochs) and epochs[0] != epochs[1]
    # Resuming at step 6 yields exactly the batches of the uninterrupted run.
    resumed = list(StepBatchSampler(n, batch, 1, world, seed=3, start_step=6, num_steps=4))
    assert resumed == steps[1][6:]
    assert list(StepBatchSampler(n, batch, 1, world, seed=4, num_steps=10)) != steps[1]
    with pytest.raises(ValueError, match="divisible"):
        StepBatchSampler(n, 5, 0, 2, seed=0)


def _png(color: int, size: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), color, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("cache", [True, False])
def test_unreadable_images_are_skipped_deterministically_and_counted(tmp_path, cache):
    uris = []
    for i, payload in enumerate([_png(10), b"not an image", _png(30), _png(40)]):
        path = tmp_path / f"img{i}.png"
        path.write_bytes(payload)
        uris.append(str(path))
    dataset = ImageDataset(uris, 16, get_storage(), cache=cache)
    if cache:
        assert len(dataset) == 3 and list(dataset.failed) == [uris[1]]
        assert [int(dataset[i][0][0, 0, 0]) for i in range(3)] == [10, 30, 40]
    else:
        image, skipped = dataset[1]  # index 1 is corrupt: index 2 stands in, one skip counted
        assert (int(image[0, 0, 0]), skipped) == (30, 1)
        assert dataset[1][0].equal(image)


# --- the training step -----------------------------------------------------------------------------


def _batch(seed: int, n: int = 4, res: int = 16) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, res, res, 3), dtype=np.uint8))


def test_generator_stage_state_round_trips_and_resumes_bit_exactly():
    """Save after 2 steps, load (weights_only) into a fresh run: step 3 gives the same losses and weights."""
    from sdsg_ray.training.loop import TrainingRun

    config = load_config(None, {**TINY, "train.stage": "generator", "train.pl_interval": 2, "train.r1_interval": 2})
    run = TrainingRun(config)
    for k in range(2):
        run.step(_batch(k))
    buffer = io.BytesIO()
    torch.save(run.state_dict(), buffer)
    state = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    assert state["step"] == 2 and state["nimg"] == 8 and state["E"] is None

    resumed = TrainingRun(config)
    resumed.load_state_dict(state)
    expected, got = run.step(_batch(2)), resumed.step(_batch(2))
    assert set(expected) >= {"loss/G_adv", "loss/G_pl", "loss/D_real", "loss/D_fake", "loss/D_r1"}
    for key in expected:
        assert float(got[key]) == float(expected[key]), key
    assert resumed.param_checksum() == run.param_checksum()

    other = load_config(None, {**TINY, "train.stage": "generator", "model.channel_max": 16})
    with pytest.raises(ValueError, match="another model"):
        TrainingRun(other).load_state_dict(state)


def _grad_norm(module: nn.Module) -> float:
    return float(sum(p.grad.abs().sum() for p in module.parameters() if p.grad is not None))


@pytest.mark.parametrize("term", ["w", "rec"])
def test_encoder_terms_reach_the_networks_the_docstring_promises(term):
    """L_w trains E only; the reconstruction terms train E and G.synthesis, never the mapping or D."""
    from sdsg_ray.pretrained import build_metric
    from sdsg_ray.training.loop import TrainingRun

    lambdas = {"train.lambda_w": 1.0, "train.lambda_l1": 0.0, "train.lambda_lpips": 0.0} if term == "w" else \
              {"train.lambda_w": 0.0, "train.lambda_l1": 1.0, "train.lambda_lpips": 1.0}
    config = load_config(None, {**TINY, **lambdas})
    run = TrainingRun(config, metric=build_metric(config.train.metric))
    for module in (run.G, run.D, run.E):
        module.requires_grad_(True)
    loss, logs = run.loss.encoder_terms(run.to_images(_batch(0)), torch.randn(4, run.G.z_dim))
    loss.backward()
    assert _grad_norm(run.E) > 0
    assert _grad_norm(run.D) == 0 and _grad_norm(run.G.mapping) == 0
    assert (_grad_norm(run.G.synthesis) > 0) == (term == "rec")
    assert math.isfinite(float(logs["rec_lpips_real"]))


def test_a_joint_step_moves_G_E_D_and_the_ema_and_shares_w_avg_with_E():
    from sdsg_ray.pretrained import build_metric
    from sdsg_ray.training.loop import TrainingRun

    config = load_config(None, TINY)
    run = TrainingRun(config, metric=build_metric(config.train.metric))
    modules = {"G": run.G, "D": run.D, "E": run.E, "G_ema": run.G_ema}
    before = {name: [p.detach().clone() for p in m.parameters()] for name, m in modules.items()}
    logs = run.step(_batch(0))
    for name, module in modules.items():
        assert any(not torch.equal(a, b) for a, b in zip(before[name], module.parameters())), f"{name} did not change"
    assert {"loss/E_w", "loss/rec_l1", "loss/rec_lpips", "loss/G_pl", "loss/D_r1"} <= set(logs)
    assert torch.equal(run.E.w_avg, run.G.mapping.w_avg) and run.G.mapping.w_avg.abs().sum() > 0


def test_a_short_joint_run_lowers_reconstruction_lpips_and_writes_its_outputs(tmp_path):
    """16 steps on the generated dataset (in-process loop, no Ray): LPIPS(x, G_ema(E(x))) on fixed
    training images falls, and every checkpoint leaves its grids, metrics and inference bundle."""
    from sdsg_ray.artifacts.checkpoint import load_inference
    from sdsg_ray.dataset.synthetic import make_dataset
    from sdsg_ray.training.loop import run_loop

    storage = get_storage()
    make_dataset(str(tmp_path / "raw"), n=32, resolution=16, outlier_fraction=0.1, seed=0, storage=storage)
    steps, batch = 16, 4
    config = load_config(None, {
        **TINY, "train.data": str(tmp_path / "raw" / "images"), "train.out": str(tmp_path / "run"),
        "train.kimg": steps * batch / 1000, "train.checkpoint_every_kimg": steps * batch / 2000,
        "train.log_every": 4, "train.ema_kimg": 0.01, "train.threads_per_worker": 2,
    })
    summary = run_loop(config)
    assert summary["step"] == steps

    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [0, 4, 8, 12, 16]
    start, end = rows[0]["eval/recon_lpips"], rows[-1]["eval/recon_lpips"]
    assert end < 0.9 * start, (start, end)
    assert all(math.isfinite(rows[-1][k]) for k in ("loss/G_adv", "loss/D_real", "loss/rec_lpips", "loss/E_w"))
    assert rows[-1]["images_per_s_per_worker"] > 0

    for folder in ("samples", "recon"):
        names = sorted(p.name for p in (tmp_path / "run" / folder).iterdir())
        assert names == ["kimg-000000.032.png", "kimg-000000.064.png"]
    recon = np.asarray(Image.open(tmp_path / "run" / "recon" / "kimg-000000.064.png"))
    assert recon.shape == (32, 8 * 16, 3)  # reals on top, reconstructions below
    bundle = load_inference(str(tmp_path / "run"))
    assert bundle.E is not None and bundle.meta["step"] == steps and bundle.meta["metric"] == "stlpips-alex"
    assert read_tensorboard_scalars(tmp_path / "run" / "tensorboard")["loss/G_adv"] == {
        row["step"]: pytest.approx(row["loss/G_adv"]) for row in rows if "loss/G_adv" in row}


def read_tensorboard_scalars(directory) -> dict[str, dict[int, float]]:
    """Scalars of every event file in a directory: TFRecord framing (length, crc, Event proto, crc)."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    scalars: dict[str, dict[int, float]] = {}
    files = sorted(directory.glob("events.out.tfevents.*"))
    assert files, f"no event files in {directory}"
    for path in files:
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    return scalars
