"""The training objective: StyleGAN2's adversarial loss and regularisers plus the paper's encoder terms.

Maths follows NVIDIA's stylegan2-ada-pytorch ``training/loss.py`` (non-saturating logistic loss, lazy
R1, lazy path-length regularisation, style mixing); the encoder terms are Mokady et al. 2022, Sec. 3.1:

    L = L_GAN + lambda_w * L_w + lambda_L1 * L_rec,L1 + lambda_LPIPS * L_rec,LPIPS

Which network each term updates (the phase that computes it decides, see ``SDSGLoss``):

* ``L_GAN`` (G side) updates G (mapping + synthesis); D's half updates D only.
* ``L_rec`` on real images, ``|x - G(E(x))|`` and ``LPIPS(x, G(E(x)))``, updates E and G.synthesis:
  the generator is pushed to cover every training image, the encoder to invert it. The mapping network
  is not on this path (G(w) is the synthesis alone).
* ``L_rec`` on generated images: the sample ``G_n(z)`` is a *target* (detached, like a real image), so
  the term updates E and G.synthesis through ``G(E(G_n(z)))`` only. Letting gradients reach the sample
  itself would pull G's distribution towards whatever E reconstructs well, a shortcut that fights L_GAN.
* ``L_w = |w - E(G(w))|`` updates E only (w and G(w) are detached): it is the encoder's latent-space
  cycle consistency; training G on it would reward images that are easy to encode, not realistic ones.

Stage 'encoder' (a generator trained elsewhere) runs the same encoder terms in a phase of their own,
``Emain``, against a frozen G: there they update E alone. No Ray here: only the DDP wrappers handed in
and an optional ``torch.distributed`` mean for the path-length EMA.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, ContextManager, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdsg_ray.models.networks import reconstruct

Phase = Literal["Gmain", "Greg", "Dmain", "Dreg", "Emain"]


# --- maths, one function per term -------------------------------------------------------------------


def generator_logistic(fake_logits: Tensor) -> Tensor:
    """Non-saturating G loss per sample: -log sigmoid(D(G(z))) = softplus(-D(G(z)))."""
    return F.softplus(-fake_logits).flatten()


def discriminator_logistic(logits: Tensor, real: bool) -> Tensor:
    """D's logistic loss per sample: softplus(-D(x)) on reals, softplus(D(G(z))) on fakes."""
    return F.softplus(-logits if real else logits).flatten()


def r1_penalty(real_img: Tensor, real_logits: Tensor) -> Tensor:
    """||grad_x D(x)||^2 per sample (Mescheder et al. 2018); ``real_img`` must require grad. ``create_graph``
    so the penalty itself can be differentiated w.r.t. D's weights."""
    (grad,) = torch.autograd.grad(real_logits.sum(), real_img, create_graph=True)
    return grad.square().flatten(1).sum(dim=1)


def path_lengths(img: Tensor, ws: Tensor, noise: Tensor | None = None) -> Tensor:
    """||J_w^T y||_2 per sample with y ~ N(0, I) / sqrt(H*W) (Karras et al. 2020, eq. 4).

    ``ws`` is [B, num_ws, w_dim]: the squared norm is summed over w_dim and averaged over layers, as
    NVIDIA does. The 1/sqrt(H*W) scaling makes the length independent of the image resolution.
    """
    assert ws.ndim == 3, f"ws must be [B, num_ws, w_dim], got {tuple(ws.shape)}"
    if noise is None:
        noise = torch.randn_like(img) / math.sqrt(img.shape[2] * img.shape[3])
    (grad,) = torch.autograd.grad((img * noise).sum(), ws, create_graph=True)
    return grad.square().sum(dim=2).mean(dim=1).sqrt()


def mix_styles(ws: Tensor, ws_other: Tensor, prob: float) -> Tensor:
    """Style mixing: with probability ``prob`` layers from one random crossover onward take
    ``ws_other``. One crossover for the whole batch, as in NVIDIA's loss; the randomness comes from
    the global torch RNG, which the loop seeds per step."""
    assert ws.shape == ws_other.shape and ws.ndim == 3, f"{tuple(ws.shape)} vs {tuple(ws_other.shape)}"
    num_ws = ws.shape[1]
    if prob <= 0 or num_ws < 2:
        return ws
    cutoff = int(torch.randint(1, num_ws, ()).item())
    if torch.rand(()).item() >= prob:
        return ws
    mixed = ws.clone()
    mixed[:, cutoff:] = ws_other[:, cutoff:]
    return mixed


def broadcast_ws(w: Tensor, num_ws: int) -> Tensor:
    """[B, w_dim] -> [B, num_ws, w_dim] (one w for every synthesis layer); W+ input passes through."""
    return w if w.ndim == 3 else w.unsqueeze(1).repeat(1, num_ws, 1)


def lazy_regularization_adam(lr: float, betas: tuple[float, float], interval: int | None) -> tuple[float, tuple[float, float]]:
    """NVIDIA's correction for regularising every ``interval`` steps with its own optimizer step:
    scale lr and the betas by mb_ratio = interval / (interval + 1) so that the (interval + 1) steps
    move the weights as far as ``interval`` unregularised steps would."""
    if interval is None:
        return lr, betas
    mb_ratio = interval / (interval + 1)
    return lr * mb_ratio, (betas[0] ** mb_ratio, betas[1] ** mb_ratio)


def ema_beta(global_batch: int, ema_kimg: float, cur_nimg: int, ema_rampup: float | None) -> float:
    """Per-step EMA decay of G_ema (and E_ema), as NVIDIA's stylegan2-ada-pytorch training_loop.

    The half-life is ``ema_kimg`` thousand images, capped at ``cur_nimg * ema_rampup`` images while
    training is young, so that G_ema forgets the random initialisation at any length. ``cur_nimg`` counts
    the images shown before this step; at 0 with a ramp-up the EMA copies G. ``ema_rampup=None``: fixed half-life.
    """
    ema_nimg = ema_kimg * 1000.0
    if ema_rampup is not None:
        ema_nimg = min(ema_nimg, cur_nimg * ema_rampup)
    return 0.5 ** (global_batch / max(ema_nimg, 1e-8))


def l1(x: Tensor, y: Tensor) -> Tensor:
    """Mean absolute error per sample."""
    return (x - y).abs().flatten(1).mean(dim=1)


class PathLengthMean(nn.Module):
    """The running target a of the path-length penalty (ell - a)^2, an EMA with decay ``decay``. The batch
    mean is averaged over ranks first when torch.distributed is initialised, so every replica holds the
    same a (a checkpoint from rank 0 then restores every rank exactly)."""

    def __init__(self, decay: float = 0.01):
        super().__init__()
        self.decay = decay
        self.register_buffer("value", torch.zeros([]))

    def update(self, lengths: Tensor) -> Tensor:
        batch_mean = lengths.detach().mean()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            batch_mean = batch_mean.clone()
            torch.distributed.all_reduce(batch_mean)
            batch_mean /= torch.distributed.get_world_size()
        self.value.copy_(self.value.lerp(batch_mean, self.decay))
        return self.value


# --- the phases ----------------------------------------------------------------------------------


@dataclass
class Wrapped:
    """The modules the loss calls: DDP wrappers (or the plain modules on one process) sharing their parameters
    with the plain networks the loop keeps. ``E`` is None for stage ``generator``; for stage ``encoder``, ``D``
    is None and ``mapping``/``synthesis`` are the frozen G's plain modules."""

    mapping: nn.Module
    synthesis: nn.Module
    D: nn.Module | None
    E: nn.Module | None


def ddp_sync(module: nn.Module, sync: bool) -> ContextManager:
    """``no_sync`` for a DDP module forwarded in a phase that does not train it: its reducer must not
    wait for gradients that never come. Plain modules need nothing."""
    if sync or not isinstance(module, nn.parallel.DistributedDataParallel):
        return nullcontext()
    return module.no_sync()


class SDSGLoss:
    """Computes one phase's loss and calls backward, like NVIDIA's ``StyleGAN2Loss``.

    Phases: ``Gmain`` (G's adversarial term, plus the encoder terms for stage ``joint``; steps G and E),
    ``Greg`` (path length, every ``pl_interval`` steps), ``Dmain`` (D's adversarial term), ``Dreg``
    (R1, every ``r1_interval`` steps); stage ``encoder`` runs ``Emain`` alone (the encoder terms; steps E).
    ``gain`` multiplies the loss: the lazy regularisers pass their interval, so their expected
    contribution matches an every-step regulariser.
    """

    def __init__(self, nets: Wrapped, num_ws: int, *, metric: Callable[[Tensor, Tensor], Tensor] | None,
                 r1_gamma: float, pl_weight: float, pl_batch_shrink: int = 2, pl_decay: float = 0.01,
                 style_mixing_prob: float = 0.9, lambda_w: float = 0.1, lambda_l1: float = 0.1,
                 lambda_lpips: float = 0.1):
        if nets.E is not None and metric is None:
            raise ValueError("stage 'joint' needs a perceptual metric for L_rec,LPIPS")
        self.nets, self.num_ws, self.metric = nets, num_ws, metric
        self.r1_gamma, self.style_mixing_prob = r1_gamma, style_mixing_prob
        self.pl_weight, self.pl_batch_shrink, self.pl_mean = pl_weight, pl_batch_shrink, PathLengthMean(pl_decay)
        self.lambda_w, self.lambda_l1, self.lambda_lpips = lambda_w, lambda_l1, lambda_lpips

    # forward helpers ---------------------------------------------------------------------------

    def run_G(self, z: Tensor, sync: bool, update_w_avg: bool = False) -> tuple[Tensor, Tensor]:
        """z -> (image, ws [B, num_ws, w_dim]) with style mixing; ws stays on the graph for path length."""
        with ddp_sync(self.nets.mapping, sync):
            w = self.nets.mapping(z, update_w_avg=update_w_avg)
            ws = broadcast_ws(w, self.num_ws)
            if self.style_mixing_prob > 0:
                w_other = self.nets.mapping(torch.randn_like(z))
                ws = mix_styles(ws, broadcast_ws(w_other, self.num_ws), self.style_mixing_prob)
        with ddp_sync(self.nets.synthesis, sync):
            img = self.nets.synthesis(ws, noise_mode="random")
        return img, ws

    def run_D(self, img: Tensor, sync: bool) -> Tensor:
        with ddp_sync(self.nets.D, sync):
            return self.nets.D(img)

    # phases ------------------------------------------------------------------------------------

    def accumulate_gradients(self, phase: Phase, real_img: Tensor, gen_z: Tensor, gain: float) -> dict[str, Tensor]:
        """Forward + backward for one phase; returns detached per-term means for logging.

        No autocast: the networks' blocks pick their own dtype (``models.networks.set_reduced_precision``),
        and every tensor reaching a loss or regulariser here (images, logits, w) is float32."""
        phases = {"Gmain": self._g_main, "Greg": self._g_reg, "Dmain": self._d_main, "Dreg": self._d_reg,
                  "Emain": self._e_main}
        if phase not in phases:
            raise ValueError(f"unknown phase {phase!r}")
        return phases[phase](real_img, gen_z, gain)

    def _g_main(self, real_img: Tensor, gen_z: Tensor, gain: float) -> dict[str, Tensor]:
        gen_img, _ = self.run_G(gen_z, sync=True, update_w_avg=True)
        loss_adv = generator_logistic(self.run_D(gen_img, sync=False).float()).mean()
        logs = {"loss/G_adv": loss_adv.detach()}
        total = loss_adv
        if self.nets.E is not None:
            encoder_loss, encoder_logs = self.encoder_terms(real_img, gen_z)
            total = total + encoder_loss
            logs.update(encoder_logs)
        total.mul(gain).backward()
        return logs

    def _e_main(self, real_img: Tensor, gen_z: Tensor, gain: float) -> dict[str, Tensor]:
        """Stage 'encoder': the encoder terms alone; G is frozen, so only E receives gradients."""
        loss, logs = self.encoder_terms(real_img, gen_z)
        loss.mul(gain).backward()
        return logs

    def encoder_terms(self, real_img: Tensor, gen_z: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """lambda_w L_w + lambda_L1 L_rec,L1 + lambda_LPIPS L_rec,LPIPS (see the module docstring)."""
        assert self.metric is not None
        # G_n(z) = G(mapping(z)) without style mixing: the paper's unconditional sample. It is a target,
        # so computed without a graph; its w is the target of L_w.
        with torch.no_grad(), ddp_sync(self.nets.mapping, False), ddp_sync(self.nets.synthesis, False):
            w_sample = self.nets.mapping(torch.randn_like(gen_z))
            sample = self.nets.synthesis(broadcast_ws(w_sample, self.num_ws), noise_mode="random")
        # Real images and samples go through E, G and the metric as one batch (E has no minibatch-std
        # layer, so this is exact): one large pass costs less than two halves.
        batch = real_img.shape[0]
        targets = torch.cat([real_img.float(), sample.float()])
        w_enc, rec = reconstruct(self.nets.synthesis, self.nets.E, targets)
        rec = rec.float()
        w_enc_sample = w_enc[batch:]
        w_target = broadcast_ws(w_sample, self.num_ws) if w_enc_sample.ndim == 3 else w_sample

        loss_w = l1(w_enc_sample.float(), w_target.float()).mean()
        l1_each = l1(targets, rec)
        lpips_each = self.metric(targets, rec).float().flatten()
        l1_real, l1_sample = l1_each[:batch].mean(), l1_each[batch:].mean()
        lpips_real, lpips_sample = lpips_each[:batch].mean(), lpips_each[batch:].mean()
        loss = (self.lambda_w * loss_w + self.lambda_l1 * (l1_real + l1_sample)
                + self.lambda_lpips * (lpips_real + lpips_sample))
        logs = {"loss/E_w": loss_w.detach(), "loss/rec_l1": (l1_real + l1_sample).detach(),
                "loss/rec_lpips": (lpips_real + lpips_sample).detach(), "rec_lpips_real": lpips_real.detach(),
                "rec_l1_real": l1_real.detach()}
        return loss, logs

    def _g_reg(self, real_img: Tensor, gen_z: Tensor, gain: float) -> dict[str, Tensor]:
        batch = max(1, gen_z.shape[0] // self.pl_batch_shrink)
        gen_img, gen_ws = self.run_G(gen_z[:batch], sync=True, update_w_avg=True)
        lengths = path_lengths(gen_img.float(), gen_ws)
        pl_mean = self.pl_mean.update(lengths)
        penalty = (lengths - pl_mean).square()
        # gen_img * 0 puts every synthesis weight on the graph (zero gradient) so DDP's reducer sees
        # all of them; without it the last layer's bias never gets a gradient and DDP waits forever.
        loss = (gen_img[:, 0, 0, 0].float() * 0 + penalty * self.pl_weight).mean()
        loss.mul(gain).backward()
        return {"loss/G_pl": (penalty * self.pl_weight).mean().detach(), "pl_mean": pl_mean.detach().clone()}

    def _d_main(self, real_img: Tensor, gen_z: Tensor, gain: float) -> dict[str, Tensor]:
        with torch.no_grad():
            gen_img, _ = self.run_G(gen_z, sync=False, update_w_avg=True)
        loss_fake = discriminator_logistic(self.run_D(gen_img, sync=True).float(), real=False).mean()
        real_logits = self.run_D(real_img.detach(), sync=True).float()
        loss_real = discriminator_logistic(real_logits, real=True).mean()
        (loss_fake + loss_real).mul(gain).backward()
        return {"loss/D_fake": loss_fake.detach(), "loss/D_real": loss_real.detach(),
                "D_real_sign": real_logits.sign().mean().detach()}

    def _d_reg(self, real_img: Tensor, gen_z: Tensor, gain: float) -> dict[str, Tensor]:
        real = real_img.detach().requires_grad_(True)
        real_logits = self.run_D(real, sync=True).float()
        penalty = r1_penalty(real, real_logits)
        loss = (real_logits.flatten() * 0 + penalty * (self.r1_gamma / 2)).mean()
        loss.mul(gain).backward()
        return {"loss/D_r1": (penalty * (self.r1_gamma / 2)).mean().detach(), "r1_penalty": penalty.mean().detach()}
