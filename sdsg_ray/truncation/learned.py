"""Learned multi-modal assignment: predict the paper's LPIPS-nearest center from w alone.

The paper assigns a new w to argmin_k LPIPS(G(w), G(c_k)): G(w) drawn before G(w_t), a second synthesis
pass plus a feature pass per sample (docs/benchmarks.md has the cost). The centers never change, so
`sdsg cluster` labels mapped latents once with that rule (assign.PerceptualAssigner) and fits a small
classifier w -> k; serving then costs one tiny MLP pass instead of a render and a feature pass.

Why a torch MLP rather than scikit-learn: its weights are plain tensors saved inside clusters.pt
(weights_only-loadable, no pickled estimator), it runs on the sampler's device in the same padded passes
as everything else (assign.PassRows, so a choice never depends on the batch), and a linear model (what
nearest-in-W is, in effect) agrees poorly with the LPIPS rule (docs/benchmarks.md). The quality report
holds what decides this on each generator: agreement and LPIPS regret on latents it was not fitted on.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

from sdsg_ray.truncation.assign import LatentAssigner, PassRows, PerceptualAssigner

log = logging.getLogger(__name__)

CLASSIFIER_FORMAT = "sdsg-center-mlp/1"


class CenterClassifier:
    """w [B, w_dim] -> logits [B, K]: standardise, then ReLU MLP layers. Held as plain tensors."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, weights: list[torch.Tensor],
                 biases: list[torch.Tensor]) -> None:
        assert len(weights) == len(biases) >= 1
        self.mean, self.std, self.weights, self.biases = mean, std, list(weights), list(biases)

    @property
    def num_classes(self) -> int:
        return int(self.weights[-1].shape[0])

    def to(self, device) -> "CenterClassifier":
        self.mean, self.std = self.mean.to(device), self.std.to(device)
        self.weights = [t.to(device) for t in self.weights]
        self.biases = [t.to(device) for t in self.biases]
        return self

    def logits(self, w: torch.Tensor) -> torch.Tensor:
        h = (w.float() - self.mean) / self.std
        for i, (weight, bias) in enumerate(zip(self.weights, self.biases)):
            h = F.linear(h, weight, bias)
            if i < len(self.weights) - 1:
                h = F.relu(h)
        return h

    def state(self) -> dict:
        """Tensors, ints and strings only: torch.load(weights_only=True) reads it back."""
        return {"format": CLASSIFIER_FORMAT, "mean": self.mean.detach().cpu().contiguous(),
                "std": self.std.detach().cpu().contiguous(),
                "weights": [t.detach().cpu().contiguous() for t in self.weights],
                "biases": [t.detach().cpu().contiguous() for t in self.biases]}

    @classmethod
    def from_state(cls, state: dict) -> "CenterClassifier":
        if state.get("format") != CLASSIFIER_FORMAT:
            raise ValueError(f"not a center classifier (expected format {CLASSIFIER_FORMAT!r})")
        return cls(state["mean"].float(), state["std"].float(), [t.float() for t in state["weights"]],
                   [t.float() for t in state["biases"]])


def fit_classifier(w: torch.Tensor, distances: torch.Tensor, hidden: int, steps: int, seed: int,
                   batch_size: int = 4096, lr: float = 1e-2, temperature: float = 0.0) -> CenterClassifier:
    """A one-hidden-layer MLP fitted to the LPIPS-nearest center of each w (cross-entropy, AdamW).

    ``distances`` [N, K]: LPIPS of G(w) to every center; its argmin is the label. ``temperature`` > 0
    distils all K distances instead of the argmin alone: the target is softmax(-distances / temperature),
    so a w whose two nearest centers are almost tied teaches the tie rather than a coin flip.
    """
    gen = torch.Generator().manual_seed(seed)
    n, k = distances.shape
    labels = distances.argmin(dim=1)
    targets = labels if temperature <= 0 else torch.softmax(-distances.float() / temperature, dim=1)
    mean, std = w.mean(0), w.std(0).clamp_min(1e-6)
    d_in = w.shape[1]
    w1 = (torch.randn(hidden, d_in, generator=gen) / math.sqrt(d_in)).requires_grad_()
    b1 = torch.zeros(hidden, requires_grad=True)
    w2 = (torch.randn(k, hidden, generator=gen) / math.sqrt(hidden)).requires_grad_()
    b2 = torch.zeros(k, requires_grad=True)
    model = CenterClassifier(mean, std, [w1, w2], [b1, b2])
    opt = torch.optim.AdamW([w1, w2, b1, b2], lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        idx = torch.randint(0, n, (min(batch_size, n),), generator=gen)
        loss = F.cross_entropy(model.logits(w[idx]), targets[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        train_top1 = (model.logits(w).argmax(1) == labels).float().mean().item()
    log.info("center classifier: %d latents, %d steps, temperature %g, train top-1 %.3f", n, steps, temperature,
             train_top1)
    return CenterClassifier(mean, std, [t.detach() for t in model.weights], [t.detach() for t in model.biases])


def regret(distances: torch.Tensor, chosen: torch.Tensor) -> float:
    """Mean over samples of LPIPS(G(w), G(c_chosen)) - LPIPS(G(w), G(c_lpips)) (0 for the LPIPS rule)."""
    rows = torch.arange(len(distances))
    return float((distances[rows, chosen] - distances.min(dim=1).values).mean())


def assignment_quality(distances: torch.Tensor, logits: torch.Tensor, others: dict[str, torch.Tensor]) -> dict:
    """Held-out quality of the learned assignment beside the other rules.

    ``distances`` [N, K] full-resolution LPIPS to each center (argmin = the paper's choice), ``logits`` the
    classifier's [N, K], ``others`` name -> chosen center [N] (nearest in W, coarse LPIPS, ...).
    """
    lpips = distances.argmin(dim=1)
    learned = logits.argmax(dim=1)
    top3 = logits.topk(min(3, logits.shape[1]), dim=1).indices
    majority = torch.full_like(lpips, int(torch.bincount(lpips).argmax()))  # trivial baseline
    report = {
        "held_out": int(len(distances)),
        "learned_top1": float((learned == lpips).float().mean()),
        "learned_top3": float((top3 == lpips[:, None]).any(dim=1).float().mean()),
        "learned_regret": regret(distances, learned),
        "mean_lpips_to_nearest": float(distances.min(dim=1).values.mean()),
        "majority_top1": float((majority == lpips).float().mean()),
    }
    for name, chosen in others.items():
        report[f"{name}_top1"] = float((chosen == lpips).float().mean())
        report[f"{name}_regret"] = regret(distances, chosen)
    if report.get("w_regret"):
        report["learned_regret_vs_w"] = report["learned_regret"] / report["w_regret"]
    return report


@torch.no_grad()
def fit_learned_assignment(synthesis: torch.nn.Module, centers: torch.Tensor, w: torch.Tensor, metric,
                           held_out: float, hidden: int, steps: int, seed: int, batch_size: int = 64,
                           coarse_resolutions: tuple[int, ...] = (),
                           temperature: float = 0.0) -> tuple[CenterClassifier, dict]:
    """Label ``w`` with the LPIPS rule (one render + one feature pass per batch, center features cached),
    fit the classifier on all but a ``held_out`` share, and report its quality on that share."""
    rows = PassRows([batch_size])
    perceptual = PerceptualAssigner(synthesis, centers, metric, rows)
    distances = perceptual.latent_distances(w).cpu()
    order = torch.randperm(len(w), generator=torch.Generator().manual_seed(seed))
    n_test = max(1, int(round(held_out * len(w))))
    test, train = order[:n_test], order[n_test:]
    with torch.enable_grad():
        classifier = fit_classifier(w[train].cpu(), distances[train], hidden, steps, seed, temperature=temperature)
    others = {"w": LatentAssigner(centers).assign(w[test]).cpu()}
    for r in coarse_resolutions:
        coarse = PerceptualAssigner(synthesis, centers, metric, rows, resolution=r)
        others[f"coarse_{r}px"] = coarse.assign(w[test]).cpu()
    report = assignment_quality(distances[test], classifier.logits(w[test].cpu()), others)
    report.update(labelled=int(len(w)), fitted_on=int(len(train)), hidden=hidden, steps=steps, temperature=temperature)
    log.info("learned assignment on %d held-out latents: top-1 %.3f top-3 %.3f, regret %.4g (w: top-1 %.3f "
             "regret %.4g)", n_test, report["learned_top1"], report["learned_top3"], report["learned_regret"],
             report["w_top1"], report["w_regret"])
    return classifier, report
