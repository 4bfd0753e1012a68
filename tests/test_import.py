"""Bring your own generator: NVIDIA StyleGAN2 pickles imported without running their code, parity with
NVIDIA's own outputs, hostile pickles refused, safetensors round trip, and an imported 256-px model
clustered, sampled with `sdsg generate` and served over HTTP with multi-modal truncation.

The fixtures under tests/fixtures/nvidia/ were built by bench/make_nvidia_fixtures.py with NVIDIA's code
(stylegan2-ada-pytorch and stylegan3, never committed): snapshot pickles whose embedded module source is
a placeholder, and NVIDIA's outputs for fixed inputs (w, images at psi 1 and 0.7, D logits, loss values).
"""

from __future__ import annotations

import hashlib
import json
import math
import pickle
import struct
import sys
import types
from collections import OrderedDict
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from conftest import free_port
from PIL import Image
from test_serve import assert_names_field, npy, serve_config
from test_truncation import METRIC

from sdsg_ray.artifacts.checkpoint import CheckpointError, load_discriminator, load_inference, scoring_pair
from jobs.cli import main
from sdsg_ray.export import import_model
from sdsg_ray.models.networks import truncate
from sdsg_ray.nvidia_pickle import PersistentRecord, UnsafePickleError, UnsupportedModelError, read_pickle
from sdsg_ray.storage import get_storage
from sdsg_ray.training.losses import (
    PathLengthMean,
    broadcast_ws,
    discriminator_logistic,
    generator_logistic,
    path_lengths,
    r1_penalty,
)

FIXTURES = Path(__file__).parent / "fixtures" / "nvidia"
CONFIGS = ("sg3_tiny32", "ada_fp16_64", "ada_paper256")
MAX_ABS = 1e-4  # w and images (the bound; measured: a few 1e-6)
LOSS_RTOL = 1e-4
PLACEHOLDER = "# placeholder\n"


def upsample_exact(x: torch.Tensor, resolution: int) -> torch.Tensor:
    """The fixtures' 8x8 real images / pl noise to full size by pixel repetition (as the builder did)."""
    factor = resolution // x.shape[-1]
    return x.repeat_interleave(factor, dim=2).repeat_interleave(factor, dim=3)


def expected(name: str) -> dict:
    return torch.load(FIXTURES / f"{name}.expected.pt", weights_only=True)


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> dict[str, str]:
    """Every fixture pickle imported once; the first through the command line."""
    root = tmp_path_factory.mktemp("imported")
    out = {}
    for i, name in enumerate(CONFIGS):
        out[name] = str(root / name)
        if i == 0:
            assert main(["import", str(FIXTURES / f"{name}.pkl"), "--out", out[name]]) == 0
        else:
            import_model(str(FIXTURES / f"{name}.pkl"), out[name])
    return out


def test_fixtures_hold_no_nvidia_source_and_fit_the_budget():
    total = sum(p.stat().st_size for p in FIXTURES.iterdir())
    assert total <= 5_000_000, total
    for pkl in FIXTURES.glob("*.pkl"):
        assert b"def forward" not in pkl.read_bytes() and b"import torch" not in pkl.read_bytes(), pkl.name


# ----------------------------------------------------------------------------------------------
# Parity with NVIDIA's outputs


@pytest.mark.parametrize("name", CONFIGS)
def test_imported_generator_and_discriminator_match_nvidia(imported, name):
    ex = expected(name)
    bundle = load_inference(imported[name])
    G = bundle.G_ema
    with torch.no_grad():
        w = G.mapping(ex["z"])
        assert (w - ex["w"]).abs().max() <= MAX_ABS
        for psi in (1.0, 0.7):
            img = G.synthesis(truncate(w, bundle.w_avg, psi), noise_mode="const")
            want = ex[f"img_psi{psi}"]
            assert img.shape == want.shape
            assert (img - want).abs().max() <= MAX_ABS, (psi, (img - want).abs().max())
            assert want.std() > 0.1  # NVIDIA's image is not flat: the comparison could fail
        D = load_discriminator(imported[name]).eval()
        logits = D(upsample_exact(ex["real_low"], G.resolution))
        assert (logits - ex["D_logits"]).abs().max() <= MAX_ABS * max(1.0, ex["D_logits"].abs().max().item())


def project_losses(G, D, ex: dict, pl_weight: float, r1_gamma: float) -> dict[str, float]:
    """The project's loss terms (sdsg_ray.training.losses) on the fixture's batch: NVIDIA's setting of
    the builder (no style mixing, constant noise, fp32, the stored pl noise and pl_mean)."""
    res = G.resolution
    real = upsample_exact(ex["real_low"], res)

    def run_G(z):
        ws = broadcast_ws(G.mapping(z), G.num_ws).detach().requires_grad_(True)
        return G.synthesis(ws, noise_mode="const"), ws

    gen_img, _ = run_G(ex["gen_z"])
    g_main = generator_logistic(D(gen_img)).mean()
    d_main = discriminator_logistic(D(gen_img), real=False).mean() + discriminator_logistic(D(real), real=True).mean()
    real_grad = real.clone().requires_grad_(True)
    r1 = r1_penalty(real_grad, D(real_grad)).mean()
    pl_img, pl_ws = run_G(ex["gen_z"][: ex["gen_z"].shape[0] // 2])
    noise = upsample_exact(ex["pl_low"], res) / math.sqrt(res * res)
    lengths = path_lengths(pl_img, pl_ws, noise)
    pl_mean = PathLengthMean(0.01)
    pl_mean.value.copy_(ex["pl_mean_before"])
    target = pl_mean.update(lengths)
    pl_penalty = (lengths - target).square().mean()
    return {
        "loss_G_main": g_main.item(), "loss_D_main": d_main.item(), "r1_penalty": r1.item(),
        "loss_D_r1": (r1 * r1_gamma / 2).item(), "pl_penalty": pl_penalty.item(),
        "loss_G_pl": (pl_penalty * pl_weight).item(), "pl_mean_after": target.item(),
    }


@pytest.mark.parametrize("name", CONFIGS)
def test_loss_values_match_nvidias_stylegan2_loss(imported, name):
    ex = expected(name)
    kwargs = json.loads(ex["kwargs"])["loss"]
    bundle = load_inference(imported[name])
    assert bundle.G is not None  # the live G the losses were computed with
    D = load_discriminator(imported[name])
    ours = project_losses(bundle.G, D, ex, kwargs["pl_weight"], kwargs["r1_gamma"])
    for key, value in ours.items():
        want = ex[key].item()
        assert abs(value - want) <= LOSS_RTOL * abs(want) + 1e-7, (key, value, want)
    assert ex["r1_penalty"].item() > 0 and ex["pl_penalty"].item() > 0  # the regularisers are not trivially 0


def test_import_from_and_to_s3(s3_bucket, imported):
    storage = get_storage()
    source = f"{s3_bucket}/zoo/sg3_tiny32.pkl"
    storage.write_bytes(source, (FIXTURES / "sg3_tiny32.pkl").read_bytes())
    assert main(["import", source, "--out", f"{s3_bucket}/runs/tiny"]) == 0
    remote, local = load_inference(f"{s3_bucket}/runs/tiny"), load_inference(imported["sg3_tiny32"])
    assert remote.meta["origin"]["sha256"] == local.meta["origin"]["sha256"]
    assert all(torch.equal(a, b) for a, b in zip(remote.G_ema.state_dict().values(), local.G_ema.state_dict().values()))
    assert load_discriminator(f"{s3_bucket}/runs/tiny").mbstd.group_size == 4


def test_import_records_the_origin_and_has_no_encoder(imported):
    name = "ada_paper256"
    bundle = load_inference(imported[name])
    origin = bundle.meta["origin"]
    assert origin["sha256"] == hashlib.sha256((FIXTURES / f"{name}.pkl").read_bytes()).hexdigest()
    assert origin["init_kwargs"]["G"]["mapping_kwargs"] == {"num_layers": 8}
    assert origin["init_kwargs"]["D"]["epilogue_kwargs"] == {"mbstd_group_size": 8}
    model = bundle.model
    assert (model.mapping_layers, model.num_fp16_res, model.conv_clamp, model.mbstd_group) == (8, 4, 256.0, 8)
    assert bundle.E is None
    with pytest.raises(CheckpointError, match=r"no encoder; run `sdsg train --stage encoder --checkpoint DIR`"):
        scoring_pair(bundle, "ema")


# ----------------------------------------------------------------------------------------------
# Hostile and unsupported pickles


def repickle(snapshot: dict, monkeypatch, module_src: str = PLACEHOLDER) -> bytes:
    """Pickle a record tree back into NVIDIA's format (records as torch_utils.persistence calls), with
    ``module_src`` as every record's embedded source. A stand-in module provides the global's name."""
    persistence = types.ModuleType("torch_utils.persistence")

    def _reconstruct_persistent_obj(meta):  # never called: only its name goes into the pickle
        raise AssertionError("called")

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    persistence._reconstruct_persistent_obj = _reconstruct_persistent_obj
    monkeypatch.setitem(sys.modules, "torch_utils", types.ModuleType("torch_utils"))
    monkeypatch.setitem(sys.modules, "torch_utils.persistence", persistence)

    class Record:
        def __init__(self, record: PersistentRecord):
            self.record = record

        def __reduce__(self):
            state = dict(self.record.state)
            state["_modules"] = OrderedDict((k, Record(v) if isinstance(v, PersistentRecord) else v)
                                            for k, v in (state.get("_modules") or {}).items())
            meta = dict(type="class", version=6, module_src=module_src, class_name=self.record.class_name, state=state)
            return _reconstruct_persistent_obj, (meta,)

    return pickle.dumps({k: Record(v) if isinstance(v, PersistentRecord) else v for k, v in snapshot.items()}, protocol=4)


def tiny_snapshot() -> dict:
    return read_pickle((FIXTURES / "sg3_tiny32.pkl").read_bytes(), "tiny")


def test_embedded_source_that_would_write_a_file_imports_with_nothing_written(tmp_path, monkeypatch):
    def writer(path: Path) -> str:
        return f"import pathlib\npathlib.Path({str(path)!r}).write_text('module_src ran')\n"

    control = tmp_path / "control.txt"
    exec(compile(writer(control), "control", "exec"), {})  # the control: this source does write when run
    assert control.exists()
    marker = tmp_path / "marker.txt"
    source = tmp_path / "hostile.pkl"
    source.write_bytes(repickle(tiny_snapshot(), monkeypatch, module_src=writer(marker)))
    result = import_model(str(source), str(tmp_path / "out"))
    assert not marker.exists()
    bundle = load_inference(result["inference"])
    reference = read_pickle((FIXTURES / "sg3_tiny32.pkl").read_bytes(), "tiny")
    assert bundle.meta["origin"]["module_src_sha256"]["G"] == hashlib.sha256(writer(marker).encode()).hexdigest()
    assert torch.equal(bundle.w_avg, reference["G_ema"].child("mapping").attr("_buffers")["w_avg"])


def test_a_pickle_holding_os_system_is_refused_in_one_line(tmp_path, capsys):
    marker = tmp_path / "pwned"
    command = f"touch {marker}".encode()
    # protocol 2: GLOBAL 'os system', BINUNICODE argument, TUPLE1, REDUCE, STOP (what `pickle` writes for a
    # __reduce__ returning (os.system, (cmd,)), spelled out so the module is named os, not posix)
    data = b"\x80\x02cos\nsystem\nX" + struct.pack("<I", len(command)) + command + b"\x85R."
    source = tmp_path / "evil.pkl"
    source.write_bytes(data)
    with pytest.raises(UnsafePickleError, match=r"refused global os\.system"):
        import_model(str(source), str(tmp_path / "out"))
    assert main(["import", str(source), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "os.system" in err[0], err
    assert not marker.exists() and not (tmp_path / "out").exists()


def _edit(snapshot: dict, path: str, edit) -> dict:
    record = snapshot["G_ema"]
    for part in path.split(".") if path else ():
        record = record.child(part)
    edit(record)
    return snapshot


@pytest.mark.parametrize("path, edit, message", [
    ("synthesis.b32", lambda r: r.state["_parameters"].__setitem__("extra", torch.nn.Parameter(torch.ones(3))),
     r"left unmapped \['synthesis\.b32\.extra'\]"),
    ("mapping.fc0", lambda r: r.state["_parameters"].pop("bias"), r"missing \['mapping\.layers\.0\.bias'\]"),
    ("", lambda r: r.state.__setitem__("c_dim", 10), r"conditional model \(c_dim=10\) is not supported"),
    ("synthesis.b16", lambda r: r.state.__setitem__("architecture", "resnet"), r"generator architecture 'resnet'"),
])
def test_unmapped_missing_and_unsupported_tensors_fail_loudly(tmp_path, monkeypatch, path, edit, message):
    source = tmp_path / "edited.pkl"
    source.write_bytes(repickle(_edit(tiny_snapshot(), path, edit), monkeypatch))
    with pytest.raises(CheckpointError, match=message) as err:
        import_model(str(source), str(tmp_path / "out"))
    assert "\n" not in str(err.value)


def test_resnet_free_discriminator_and_stylegan3_are_refused(tmp_path, monkeypatch):
    snapshot = tiny_snapshot()
    snapshot["D"].child("b32").state["architecture"] = "skip"
    source = tmp_path / "d_skip.pkl"
    source.write_bytes(repickle(snapshot, monkeypatch))
    with pytest.raises(UnsupportedModelError, match=r"discriminator architecture 'skip'"):
        import_model(str(source), str(tmp_path / "out"))
    with pytest.raises(UnsupportedModelError, match=r"StyleGAN3 \(alias-free\) synthesis is not supported"):
        import_model(str(FIXTURES / "sg3_alias_free16.pkl"), str(tmp_path / "out3"))


# ----------------------------------------------------------------------------------------------
# Export without pickle


def test_safetensors_export_imports_back_bit_for_bit(tmp_path):
    from sdsg_ray.artifacts.checkpoint import export_inference
    from sdsg_ray.config import ModelConfig
    from sdsg_ray.models import build_networks

    torch.manual_seed(1)
    model = ModelConfig(resolution=16, channel_base=256, channel_max=16, z_dim=16, w_dim=16)
    G, _, E = build_networks(model)
    E_ema = build_networks(model)[2]
    with torch.no_grad():
        G.mapping.w_avg.normal_()
    original = str(tmp_path / "run")
    export_inference(G, E, model, {"stage": "joint", "kimg": 1.5}, original, get_storage(), E_ema=E_ema)
    assert main(["export", "--checkpoint", original, "--format", "safetensors", "--out", str(tmp_path / "st")]) == 0
    st = tmp_path / "st" / "model.safetensors"
    assert st.read_bytes()[8:9] == b"{" and b"\x80" != st.read_bytes()[:1]
    assert main(["import", str(st), "--out", str(tmp_path / "back")]) == 0
    a, b = load_inference(original), load_inference(str(tmp_path / "back"))
    assert a.model == b.model and b.meta["kimg"] == 1.5 and b.meta["imported_from"]["source_identity"] == a.identity
    assert torch.equal(a.w_avg, b.w_avg)
    for name in ("G_ema", "E", "E_ema"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) and sa[k].dtype == sb[k].dtype for k in sa), name


# ----------------------------------------------------------------------------------------------
# An imported 256-px model: cluster, generate, serve


@pytest.fixture(scope="module")
def clustered_256(imported, tmp_path_factory) -> tuple[str, str]:
    ckpt = imported["ada_paper256"]
    out = str(tmp_path_factory.mktemp("clusters256") / "clusters")
    # kept small for CI: 64 latents, 3 centers, LPIPS judged at 64 px, a short classifier fit
    argv = ["cluster", "--checkpoint", ckpt, "--out", out, "--n-latents", "64", "--clusters", "3", "--seed", "3",
            "--set", f"cluster.metric={METRIC}", "--set", "cluster.judge_resolution=64",
            "--set", "cluster.classifier_latents=64", "--set", "cluster.classifier_hidden=32",
            "--set", "cluster.classifier_steps=40"]
    assert main(argv) == 0
    return ckpt, out


def test_generate_writes_pngs_and_a_grid_from_an_imported_model(clustered_256, tmp_path):
    from sdsg_ray.truncation.sampler import load_sampler

    ckpt, clusters = clustered_256
    out = tmp_path / "gen"
    argv = ["generate", "--checkpoint", ckpt, "--seeds", "0-3", "--psi", "0.7", "--truncation", "multimodal",
            "--clusters", clusters, "--assign-by", "learned", "--out", str(out), "--batch-size", "4"]
    assert main(argv) == 0
    images = np.stack([np.asarray(Image.open(out / f"seed{s:04d}.png")) for s in range(4)])
    assert images.shape == (4, 256, 256, 3) and images.std() > 5
    grid = np.asarray(Image.open(out / "grid.png"))
    assert grid.shape == (512, 512, 3) and np.array_equal(grid[:256, 256:], images[1])
    sampler = load_sampler(ckpt, clusters, assign_by="learned", batch_size=4)
    assert np.array_equal(sampler.sample(range(4), psi=0.7, mode="multimodal"), images)
    assert not np.array_equal(sampler.sample([0], psi=1.0, mode="none")[0], images[0])  # truncation did something


def test_serve_an_imported_256px_model_with_multimodal_truncation(ray_cluster, clustered_256):
    from ray import serve

    from serve_app.app import start_app

    ckpt, clusters = clustered_256
    base = start_app(serve_config(ckpt, clusters, free_port(), max_batch_size=4, assign_resolution=64))
    try:
        with httpx.Client(base_url=base, timeout=120) as client:
            model = client.get("/v1/model").json()
            assert model["resolution"] == 256 and set(model["assignments"]) >= {"lpips", "learned"}
            assert "nvidia-stylegan2-pickle" in json.dumps(model["checkpoint"])
            seeds = [0, 1]
            by_rule = {}
            for by in ("learned", "lpips"):
                body = {"seeds": seeds, "psi": 0.5, "truncation": "multimodal", "assignment": by, "format": "npy"}
                by_rule[by] = npy(client.post("/v1/samples", json=body))
                assert by_rule[by].shape == (2, 256, 256, 3) and by_rule[by].std() > 5
            plain = npy(client.post("/v1/samples", json={"seeds": seeds, "psi": 1.0, "format": "npy"}))
            assert not np.array_equal(plain, by_rule["lpips"])
            # a forced cluster beyond this model's 3 centers is a 4xx naming the field, as for any model
            assert_names_field(client.post("/v1/samples", json={"seeds": seeds, "truncation": "multimodal", "cluster": 3}),
                               "cluster")
    finally:
        serve.shutdown()
