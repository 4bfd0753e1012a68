"""Build tests/fixtures/nvidia/ from NVIDIA's own code: pickles in the snapshot layout + NVIDIA's outputs.

Run by hand against checkouts of NVIDIA's repositories that are never committed (nothing of them is
copied into this repository; the fixtures hold tensors, kwargs and NVIDIA's numbers only)::

    git --git-dir=<mirror of NVlabs/stylegan2-ada-pytorch> archive HEAD | tar -x -C /tmp/nv-ada
    git --git-dir=<mirror of NVlabs/stylegan3> archive HEAD | tar -x -C /tmp/nv-sg3
    python bench/make_nvidia_fixtures.py --ada /tmp/nv-ada --sg3 /tmp/nv-sg3 --out tests/fixtures/nvidia

Each NVIDIA process imports one repository (both name their packages ``training``/``torch_utils``), so the
script re-runs itself once per config. For every config it writes

* ``<name>.pkl``: ``pickle.dump(dict(G=..., D=..., G_ema=..., augment_pipe=None, training_set_kwargs=...))``
  exactly as NVIDIA's ``training_loop.py`` does, except that each persistence record's ``module_src``
  (NVIDIA's source file, which NVIDIA's loader ``exec``s) is replaced by :data:`SOURCE_PLACEHOLDER`;
* ``<name>.expected.pt`` (``torch.load(weights_only=True)``): the fixed inputs (z, low-resolution real
  images and path-length noise, upsampled exactly on both sides), and NVIDIA's outputs for them: mapped w,
  G_ema's images at psi = 1 and 0.7 (noise_mode='const', float32), D's logits, and the loss values of
  NVIDIA's ``StyleGAN2Loss`` (G main, D main, R1, path length) for one batch with style mixing off and
  constant noise (so both sides see the same randomness).

Weights are NVIDIA's random init with biases, noise strengths and w_avg moved off their init values (a
zero bias would hide a wrongly mapped one) and G_ema != G.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import io
import json
import pickle
import subprocess
import sys
import types
from pathlib import Path

SOURCE_PLACEHOLDER = "# NVIDIA module source removed from this fixture (never needed: sdsg does not execute it)\n"

# name -> (repository, G kwargs, D kwargs, loss kwargs, forward batch)
CONFIGS = {
    # a tiny 32-px StyleGAN2 from the stylegan3 repository (training.networks_stylegan2), no fp16, no clamp
    "sg3_tiny32": ("sg3",
                   dict(class_name="training.networks_stylegan2.Generator", z_dim=32, w_dim=32,
                        mapping_kwargs=dict(num_layers=2), channel_base=256, channel_max=16, num_fp16_res=0,
                        conv_clamp=None, fused_modconv_default="inference_only"),
                   dict(class_name="training.networks_stylegan2.Discriminator", channel_base=256, channel_max=16,
                        num_fp16_res=0, conv_clamp=None, block_kwargs=dict(), mapping_kwargs=dict(),
                        epilogue_kwargs=dict(mbstd_group_size=4)),
                   dict(r1_gamma=1.0, pl_weight=2.0), 32, 4),
    # 64 px from stylegan2-ada-pytorch with num_fp16_res=2 and a conv_clamp small enough to bite
    "ada_fp16_64": ("ada",
                    dict(class_name="training.networks.Generator", z_dim=32, w_dim=32, mapping_kwargs=dict(num_layers=2),
                         synthesis_kwargs=dict(channel_base=512, channel_max=16, num_fp16_res=2, conv_clamp=1.0)),
                    dict(class_name="training.networks.Discriminator", channel_base=512, channel_max=16, num_fp16_res=2,
                         conv_clamp=1.0, block_kwargs=dict(), mapping_kwargs=dict(),
                         epilogue_kwargs=dict(mbstd_group_size=4)),
                    dict(r1_gamma=10.0, pl_weight=2.0), 64, 2),
    # train.py's paper256 layout (8 mapping layers, mbstd 8, num_fp16_res 4, conv_clamp 256) at reduced width
    "ada_paper256": ("ada",
                     dict(class_name="training.networks.Generator", z_dim=32, w_dim=32, mapping_kwargs=dict(num_layers=8),
                          synthesis_kwargs=dict(channel_base=512, channel_max=16, num_fp16_res=4, conv_clamp=256)),
                     dict(class_name="training.networks.Discriminator", channel_base=512, channel_max=16, num_fp16_res=4,
                          conv_clamp=256, block_kwargs=dict(), mapping_kwargs=dict(),
                          epilogue_kwargs=dict(mbstd_group_size=8)),
                     dict(r1_gamma=1.0, pl_weight=2.0), 256, 1),  # one image per psi: 256-px float32 images dominate the 5 MB
}
# A StyleGAN3 (alias-free) generator: the importer must refuse it in one line.
SG3_ALIAS_FREE = dict(class_name="training.networks_stylegan3.Generator", z_dim=16, w_dim=16,
                      mapping_kwargs=dict(num_layers=2), channel_base=128, channel_max=8, magnitude_ema_beta=0.999)
LOSS_BATCH = 8
LOWRES = 8  # real images and pl noise are stored at 8x8 and upsampled by pixel repetition (exact) to full size
PSIS = (1.0, 0.7)


def upsample_exact(x, resolution: int):
    """[B, C, 8, 8] -> [B, C, R, R] by pixel repetition; the test side does the same."""
    factor = resolution // x.shape[-1]
    return x.repeat_interleave(factor, dim=2).repeat_interleave(factor, dim=3)


def _import_nvidia(repo_path: str):
    sys.path.insert(0, repo_path)
    try:
        import pkg_resources  # noqa: F401  (the stylegan3 repository's torch_utils imports it)
    except ImportError:  # a Python without setuptools: the one function it uses
        from packaging.version import parse as parse_version
        sys.modules["pkg_resources"] = types.SimpleNamespace(parse_version=parse_version)
    import dnnlib
    from torch_utils import persistence
    return dnnlib, persistence


def _perturb(module, gen) -> None:
    import torch
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias") or name.endswith("noise_strength") or name.endswith("const"):
                p.add_(0.2 * torch.randn(p.shape, generator=gen))
        for name, b in module.named_buffers():
            if name.endswith("w_avg"):
                b.copy_(0.5 * torch.randn(b.shape, generator=gen))


@contextlib.contextmanager
def _sources_stripped(persistence):
    """While pickling: every persistence record carries the placeholder instead of NVIDIA's module source
    (restored afterwards: deepcopy goes through the same records and needs the real source)."""
    originals = {decorator: decorator._orig_module_src for decorator in list(persistence._decorators)}
    for decorator in originals:
        decorator._orig_module_src = SOURCE_PLACEHOLDER
    try:
        yield
    finally:
        for decorator, src in originals.items():
            decorator._orig_module_src = src


def _dump_stripped(persistence, obj) -> bytes:
    buffer = io.BytesIO()
    with _sources_stripped(persistence):
        pickle.dump(obj, buffer)
    return buffer.getvalue()


def build_one(name: str, repos: dict[str, str], out: Path) -> dict:
    import torch
    repo, g_kwargs, d_kwargs, loss_kwargs, resolution, batch = CONFIGS[name]
    dnnlib, persistence = _import_nvidia(repos[repo])
    gen = torch.Generator().manual_seed(29)
    torch.manual_seed(29)
    common = dict(c_dim=0, img_resolution=resolution, img_channels=3)
    G = dnnlib.util.construct_class_by_name(**dnnlib.EasyDict(g_kwargs), **common).eval().requires_grad_(False)
    D = dnnlib.util.construct_class_by_name(**dnnlib.EasyDict(d_kwargs), **common).eval().requires_grad_(False)
    _perturb(G, gen)
    _perturb(D, gen)
    G_ema = copy.deepcopy(G)
    with torch.no_grad():
        for p in G_ema.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    snapshot = dict(training_set_kwargs=dict(resolution=resolution, use_labels=False))
    for key, module in (("G", G), ("D", D), ("G_ema", G_ema), ("augment_pipe", None)):
        snapshot[key] = module
    (out / f"{name}.pkl").write_bytes(_dump_stripped(persistence, snapshot))

    # NVIDIA's outputs for fixed inputs, fp32 everywhere (force_fp32), constant noise
    z = torch.randn([batch, G.z_dim], generator=gen)
    c = torch.zeros([batch, 0])
    expected = {"z": z, "kwargs": json.dumps({"G": g_kwargs, "D": d_kwargs, "loss": loss_kwargs, "resolution": resolution})}
    with torch.no_grad():
        expected["w"] = G_ema.mapping(z, c)[:, 0].clone()
        for psi in PSIS:
            ws = G_ema.mapping(z, c, truncation_psi=psi)
            expected[f"img_psi{psi}"] = G_ema.synthesis(ws, noise_mode="const", force_fp32=True)
        real_low = torch.rand([LOSS_BATCH, 3, LOWRES, LOWRES], generator=gen) * 2 - 1
        expected["real_low"] = real_low
        expected["D_logits"] = D(upsample_exact(real_low, resolution), torch.zeros([LOSS_BATCH, 0]), force_fp32=True)
    expected.update(_nvidia_losses(repo, G, D, loss_kwargs, resolution, gen, expected))
    torch.save(expected, out / f"{name}.expected.pt")
    return {k: (list(v.shape) if hasattr(v, "shape") else v) for k, v in expected.items() if k != "kwargs"}


def _nvidia_losses(repo: str, G, D, loss_kwargs: dict, resolution: int, gen, expected: dict) -> dict:
    """G main, D main, R1 and path length from NVIDIA's StyleGAN2Loss, its reports captured.

    Style mixing off; synthesis and D forced to fp32 with constant noise (so the project's side can see
    the same inputs); the pl noise is the stored one (NVIDIA draws it with ``torch.randn_like``).
    """
    import torch
    from torch_utils import training_stats
    from training import loss as nv_loss
    G, D = copy.deepcopy(G).train().requires_grad_(True), copy.deepcopy(D).train().requires_grad_(True)
    synth_forward = G.synthesis.forward
    G.synthesis.forward = functools.partial(synth_forward, noise_mode="const", force_fp32=True)
    d_forward = D.forward
    D.forward = functools.partial(d_forward, force_fp32=True)
    reports: dict[str, torch.Tensor] = {}
    real_report = training_stats.report

    def capture(name, value):
        reports[name] = torch.as_tensor(value).detach().clone().float()
        return real_report(name, value)
    nv_loss.training_stats.report = capture
    gen_z = torch.randn([LOSS_BATCH, G.z_dim], generator=gen)
    pl_low = torch.randn([LOSS_BATCH // 2, 3, LOWRES, LOWRES], generator=gen)
    real = upsample_exact(expected["real_low"], resolution)
    c = torch.zeros([LOSS_BATCH, 0])
    common = dict(r1_gamma=loss_kwargs["r1_gamma"], pl_weight=loss_kwargs["pl_weight"], style_mixing_prob=0.0,
                  pl_batch_shrink=2, pl_decay=0.01)
    if repo == "ada":
        loss = nv_loss.StyleGAN2Loss(device=torch.device("cpu"), G_mapping=G.mapping, G_synthesis=G.synthesis, D=D,
                                     augment_pipe=None, **common)
        run = lambda phase: loss.accumulate_gradients(phase, real, c, gen_z, c, sync=True, gain=1.0)  # noqa: E731
    else:
        loss = nv_loss.StyleGAN2Loss(device=torch.device("cpu"), G=G, D=D, augment_pipe=None, **common)
        run = lambda phase: loss.accumulate_gradients(phase, real, c, gen_z, c, gain=1.0, cur_nimg=0)  # noqa: E731
    pl_mean_before = torch.tensor(0.3)
    loss.pl_mean.copy_(pl_mean_before)
    original_randn_like = torch.randn_like

    def stored_noise(x, *args, **kwargs):  # NVIDIA: pl_noise = randn_like(img) / sqrt(H*W)
        if x.ndim == 4 and x.shape[0] == pl_low.shape[0]:
            return upsample_exact(pl_low, resolution).to(x.dtype)
        return original_randn_like(x, *args, **kwargs)
    for phase in ("Gmain", "Dmain", "Dreg"):
        run(phase)
    torch.randn_like = stored_noise
    try:
        run("Greg")
    finally:
        torch.randn_like = original_randn_like
    return {
        "gen_z": gen_z, "pl_low": pl_low, "pl_mean_before": pl_mean_before,
        "loss_G_main": reports["Loss/G/loss"].mean(),  # softplus(-D(G(z))), mean over the batch
        "loss_D_main": reports["Loss/D/loss"].mean(),  # softplus(D(G(z))) + softplus(-D(x))
        "r1_penalty": reports["Loss/r1_penalty"].mean(),
        "loss_D_r1": reports["Loss/D/reg"].mean(),  # r1_penalty * r1_gamma / 2
        "pl_penalty": reports["Loss/pl_penalty"].mean(),
        "loss_G_pl": reports["Loss/G/reg"].mean(),  # pl_penalty * pl_weight
        "pl_mean_after": loss.pl_mean.detach().clone(),
    }


def build_alias_free(repos: dict[str, str], out: Path) -> None:
    """A tiny StyleGAN3 generator pickle (for the refusal test), sources stripped."""
    import torch
    dnnlib, persistence = _import_nvidia(repos["sg3"])
    torch.manual_seed(3)
    G = dnnlib.util.construct_class_by_name(**dnnlib.EasyDict(SG3_ALIAS_FREE), c_dim=0, img_resolution=16, img_channels=3)
    (out / "sg3_alias_free16.pkl").write_bytes(_dump_stripped(persistence, dict(G=G, G_ema=G)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ada", required=True, help="checkout of NVlabs/stylegan2-ada-pytorch")
    parser.add_argument("--sg3", required=True, help="checkout of NVlabs/stylegan3")
    parser.add_argument("--out", default="tests/fixtures/nvidia")
    parser.add_argument("--only", default=None, help="(internal) build one config in this process")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    repos = {"ada": args.ada, "sg3": args.sg3}
    if args.only == "alias_free":
        build_alias_free(repos, out)
        return
    if args.only:
        print(json.dumps({args.only: build_one(args.only, repos, out)}))
        return
    for name in [*CONFIGS, "alias_free"]:  # one process per config: each repository has its own `training`
        subprocess.run([sys.executable, __file__, "--ada", args.ada, "--sg3", args.sg3, "--out", args.out,
                        "--only", name], check=True)
    total = sum(p.stat().st_size for p in out.iterdir())
    print(f"fixtures in {out}: {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
