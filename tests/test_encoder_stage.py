"""A generator trained elsewhere: stage 'encoder' trains E (and E_ema) against its frozen G_ema, and
``train.resume_from`` fine-tunes its G and D (NVIDIA's --resume) with a fresh E.

The "generator you already have" is the tiny model's random initialisation under another seed, exported
as `sdsg import` writes one: inference.pt without an encoder (plus discriminator.pt for fine-tuning)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch

from sdsg_ray.artifacts.checkpoint import export_discriminator, export_inference, load_inference, scoring_pair
from sdsg_ray.config import ConfigError, load_config
from sdsg_ray.storage import ObjectNotFound, get_storage, join

TINY = {"train.metric": "stlpips-alex", "model.resolution": 16, "model.channel_max": 32, "model.z_dim": 32,
        "model.w_dim": 32, "train.batch_size": 4}
MODEL = {k: v for k, v in TINY.items() if k.startswith("model.")}


def _batch(seed: int, n: int = 4, res: int = 16) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, res, res, 3), dtype=np.uint8))


def _states_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _generator_dir(directory, discriminator: bool = False) -> str:
    """An exported generator (seed 123's initialisation, live G = G_ema, no E); with D when asked."""
    from sdsg_ray.models.networks import build_networks

    model = load_config(None, MODEL).model
    torch.manual_seed(123)
    G, D, _ = build_networks(model)
    with torch.no_grad():
        G.mapping.w_avg.normal_()  # a trained generator's mean latent is not zero
    uri = str(directory)
    export_inference(G, None, model, {"stage": "imported"}, uri, get_storage(), G_live=G)
    if discriminator:
        export_discriminator(D, model, uri, get_storage())
    return uri


def _encoder_config(checkpoint: str, **extra):
    from sdsg_ray.training.loop import with_checkpoint_model

    return with_checkpoint_model(load_config(None, {**TINY, "train.stage": "encoder", "train.checkpoint": checkpoint, **extra}))


# --- configuration ------------------------------------------------------------------------------


@pytest.mark.parametrize("settings, message", [
    ({"train.stage": "encoder"}, "set train.checkpoint"),
    ({"train.stage": "joint", "train.checkpoint": "runs/x"}, "not of stage 'joint'"),
    ({"train.stage": "encoder", "train.checkpoint": "runs/x", "train.resume_from": "runs/y"}, "keeps G frozen"),
])
def test_stage_inputs_that_do_not_fit_the_stage_are_refused(settings, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, settings)


def test_the_model_section_comes_from_the_checkpoint_unless_a_user_set_another(tmp_path):
    from sdsg_ray.training.loop import with_checkpoint_model

    uri = _generator_dir(tmp_path / "g")
    adopted = with_checkpoint_model(load_config(None, {"train.stage": "encoder", "train.checkpoint": uri}))
    assert adopted.model == load_inference(uri).model and adopted.model.resolution == 16  # default would be 32
    with pytest.raises(ConfigError, match=r"model.resolution=32 \(checkpoint: 16\)"):
        with_checkpoint_model(load_config(None, {"train.stage": "encoder", "train.checkpoint": uri, "model.resolution": 32}))
    with pytest.raises(ObjectNotFound, match="inference.pt"):
        with_checkpoint_model(load_config(None, {"train.stage": "encoder", "train.checkpoint": str(tmp_path / "none")}))


# --- stage 'encoder' ----------------------------------------------------------------------------


def test_the_encoder_stage_trains_E_alone_and_resumes_bit_exactly(tmp_path):
    """G_ema stays the checkpoint's, bit for bit; E and E_ema move; a saved state resumes step 3 exactly;
    a state that started from another generator is refused."""
    from sdsg_ray.pretrained import build_metric
    from sdsg_ray.training.loop import TrainingRun

    uri = _generator_dir(tmp_path / "g")
    source = load_inference(uri)
    config = _encoder_config(uri)
    metric = build_metric(config.train.metric)
    run = TrainingRun(config, metric=metric)
    assert run.G is None and run.D is None and [p.name for p in run.phases] == ["Emain"]
    assert torch.equal(run.E.w_avg, source.w_avg)  # E starts at the generator's mean latent
    E_before = [p.detach().clone() for p in run.E.parameters()]
    for k in range(2):
        logs = run.step(_batch(k))
    assert set(logs) == {"loss/E_w", "loss/rec_l1", "loss/rec_lpips", "rec_lpips_real", "rec_l1_real"}
    assert _states_equal(run.G_ema, source.G_ema)
    assert all(not torch.equal(a, b) for a, b in zip(E_before, run.E.parameters()))
    assert not _states_equal(run.E_ema, run.E) and not any(torch.equal(a, b) for a, b in zip(E_before, run.E_ema.parameters()))

    buffer = io.BytesIO()
    torch.save(run.state_dict(), buffer)
    state = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    assert state["G"] is None and state["D"] is None and state["start"]["generator"]["identity"] == source.identity
    resumed = TrainingRun(config, metric=metric)
    resumed.load_state_dict(state)
    expected, got = run.step(_batch(2)), resumed.step(_batch(2))
    assert {k: float(v) for k, v in got.items()} == {k: float(v) for k, v in expected.items()}
    assert resumed.param_checksum() == run.param_checksum() and _states_equal(resumed.E_ema, run.E_ema)

    other = _generator_dir(tmp_path / "other")
    with torch.no_grad():  # same architecture, other weights: another identity
        bundle = load_inference(other)
        bundle.G_ema.mapping.w_avg.add_(1)
        export_inference(bundle.G_ema, None, bundle.model, {}, other, get_storage())
    with pytest.raises(ValueError, match="started from"):
        TrainingRun(_encoder_config(other), metric=metric).load_state_dict(state)


def test_a_short_encoder_run_lowers_reconstruction_lpips_and_writes_a_scorable_bundle(tmp_path):
    """16 steps of run_loop (no Ray) on the generated dataset against a frozen random generator:
    LPIPS(x, G_ema(E_ema(x))) on fixed training images falls, and inference.pt holds the frozen G_ema,
    E and E_ema, so both scoring pairs work unchanged."""
    from sdsg_ray.dataset.synthetic import make_dataset
    from sdsg_ray.training.loop import run_loop

    storage = get_storage()
    make_dataset(str(tmp_path / "raw"), n=32, resolution=16, outlier_fraction=0.1, seed=0, storage=storage)
    uri = _generator_dir(tmp_path / "g")
    steps, batch = 16, 4
    config = load_config(None, {
        **TINY, "train.stage": "encoder", "train.checkpoint": uri, "train.data": str(tmp_path / "raw" / "images"),
        "train.out": str(tmp_path / "run"), "train.kimg": steps * batch / 1000,
        "train.checkpoint_every_kimg": steps * batch / 2000, "train.log_every": 4, "train.ema_kimg": 0.01,
        "train.threads_per_worker": 2,
    })
    assert run_loop(config)["step"] == steps
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [0, 4, 8, 12, 16]
    start, end = rows[0]["eval/recon_lpips"], rows[-1]["eval/recon_lpips"]
    assert end < 0.9 * start, (start, end)
    assert "loss/G_adv" not in rows[-1] and rows[-1]["images_per_s_per_worker"] > 0
    assert not (tmp_path / "run" / "samples").exists()  # a frozen G's samples never change
    assert len(list((tmp_path / "run" / "recon").iterdir())) == 2
    assert not (tmp_path / "run" / "discriminator.pt").exists()  # no D in this stage

    bundle, source = load_inference(str(tmp_path / "run")), load_inference(uri)
    assert bundle.meta["stage"] == "encoder" and bundle.meta["generator"]["identity"] == source.identity
    assert _states_equal(bundle.G_ema, source.G_ema) and _states_equal(bundle.G, source.G_ema)
    for pair, expected_E in (("ema", bundle.E_ema), ("live", bundle.E)):
        G, E = scoring_pair(bundle, pair)
        assert E is expected_E and _states_equal(G, source.G_ema)


# --- train.resume_from --------------------------------------------------------------------------


def test_resume_from_starts_G_G_ema_and_D_from_the_directory_with_a_fresh_E(tmp_path):
    """NVIDIA's --resume: G, D and G_ema are the directory's, E is the seed's fresh initialisation, kimg
    starts at 0 and G_ema has no EMA ramp-up (a ramp-up would overwrite it with G at the first step)."""
    from sdsg_ray.pretrained import build_metric
    from sdsg_ray.training.losses import ema_beta
    from sdsg_ray.training.loop import TrainingRun
    from sdsg_ray.artifacts.checkpoint import load_discriminator

    uri = _generator_dir(tmp_path / "g", discriminator=True)
    source = load_inference(uri)
    with torch.no_grad():  # make G_ema differ from the live G, so the test tells them apart
        G_ema = source.G_ema
        for p in G_ema.parameters():
            p.mul_(0.5)
        export_inference(G_ema, None, source.model, {"stage": "imported"}, uri, get_storage(), G_live=source.G)
    source = load_inference(uri)
    D = load_discriminator(uri)
    config = load_config(None, {**TINY, "train.resume_from": uri})
    metric = build_metric(config.train.metric)
    run = TrainingRun(config, metric=metric)
    fresh = TrainingRun(load_config(None, TINY), metric=metric)
    assert _states_equal(run.G, source.G) and _states_equal(run.G_ema, source.G_ema) and _states_equal(run.D, D)
    E_fresh = {k: v for k, v in fresh.E.state_dict().items() if k != "w_avg"}
    assert all(torch.equal(v, E_fresh[k]) for k, v in run.E.state_dict().items() if k != "w_avg")
    assert torch.equal(run.E.w_avg, source.G.mapping.w_avg) and (run.step_count, run.kimg) == (0, 0.0)

    ema_before = [p.detach().clone() for p in run.G_ema.parameters()]
    run.step(_batch(0))
    beta = ema_beta(4, config.train.ema_kimg, 0, None)
    assert 0.9 < beta < 1
    for before, live, ema in zip(ema_before, run.G.parameters(), run.G_ema.parameters()):
        torch.testing.assert_close(ema, live.detach().lerp(before, beta))
    assert load_inference(uri).meta["stage"] == "imported"  # the source is read, never written

    out = tmp_path / "out"
    run.export_inference({"stage": "joint"}, str(out), get_storage())
    run.export_discriminator(str(out), get_storage())  # a fine-tuned run can be resumed from in turn
    assert load_inference(str(out)).meta["resumed_from"]["identity"] == source.identity
    assert _states_equal(load_discriminator(str(out)), run.D)

    (tmp_path / "g" / "discriminator.pt").unlink()
    with pytest.raises(ObjectNotFound, match="discriminator.pt"):
        TrainingRun(config, metric=metric)


# --- on Ray Train, through the CLI --------------------------------------------------------------


@pytest.mark.slow
def test_sdsg_train_stage_encoder_on_ray_resumes_and_sdsg_score_uses_its_bundle(ray_cluster, tmp_path):
    """`sdsg train --stage encoder --checkpoint DIR` on Ray Train, re-submitted with a longer kimg (the run
    continues from its checkpoint), then `sdsg score` on the result with the default pair."""
    from jobs.cli import main
    from sdsg_ray.dataset.synthetic import make_dataset

    storage = get_storage()
    make_dataset(str(tmp_path / "raw"), n=16, resolution=16, outlier_fraction=0.25, seed=0, storage=storage)
    uri = _generator_dir(tmp_path / "g")
    data, out = str(tmp_path / "raw" / "images"), str(tmp_path / "run")
    common = ["--stage", "encoder", "--checkpoint", uri, "--data", data, "--out", out, "--batch-size", "4",
              "--set", "train.metric=stlpips-alex", "--set", "train.checkpoint_every_kimg=0.008",
              "--set", "train.log_every=1", "--set", "train.threads_per_worker=1"]
    assert main(["train", *common, "--kimg", "0.008"]) == 0
    assert main(["train", *common, "--kimg", "0.016"]) == 0
    steps = [json.loads(line)["step"] for line in storage.read_text(join(out, "metrics.jsonl")).splitlines()]
    assert steps == [0, 1, 2, 3, 4]  # one step-0 row: the second fit resumed at step 2
    bundle = load_inference(out)
    assert bundle.meta["stage"] == "encoder" and bundle.meta["step"] == 4
    assert _states_equal(bundle.G_ema, load_inference(uri).G_ema)

    scores = str(tmp_path / "scores")
    assert main(["score", "--data", data, "--checkpoint", out, "--out", scores, "--metric", "stlpips-alex",
                 "--set", "score.fid_features=stlpips-alex-pool"]) == 0
    summary = json.loads(storage.read_text(join(scores, "summary.json")))
    assert summary["scored"] == 16, summary
