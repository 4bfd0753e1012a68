"""The single-file inference bundle: G_ema (+ E, E_ema and the live G) and the model config, loadable anywhere.

Scoring, clustering, evaluation and Serve all start from ``inference.pt``; training exports it at every
checkpoint. The file is plain ``torch.save`` of tensors, dicts and JSON-like values, so it loads with
``torch.load(weights_only=True)`` (no pickled code runs). Its identity is the sha256 of its bytes, so
downstream artefacts (scores, clusters) can record exactly which weights produced them.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Literal

import torch
from pydantic import ValidationError
from torch import Tensor, nn

from sdsg_ray.artifacts.base import Artifact, Member
from sdsg_ray.config import ModelConfig
from sdsg_ray.errors import UserError
from sdsg_ray.models.networks import Discriminator, Encoder, Generator, build_discriminator, build_encoder, build_generator
from sdsg_ray.storage import Storage, get_storage

log = logging.getLogger(__name__)

INFERENCE_FORMAT = "sdsg-inference/1"
DISCRIMINATOR_FORMAT = "sdsg-discriminator/1"
IDENTITY_HEX_CHARS = 16
_REQUIRED_KEYS = ("format", "model", "G_ema", "E", "w_avg", "meta")


class CheckpointError(UserError, ValueError):
    """An inference file is missing pieces, corrupt, or of another format; the message names the URI."""


@dataclass
class InferenceBundle:
    G_ema: Generator
    E: Encoder | None
    w_avg: Tensor  # [w_dim], G_ema's tracked mean latent (global-mean truncation centre)
    model: ModelConfig
    identity: str  # sha256 of the file's bytes, first 16 hex chars
    meta: dict = field(default_factory=dict)  # stage, step, kimg, metric, created_at
    E_ema: Encoder | None = None  # EMA of E with G_ema's beta (stage 1); None in bundles that predate it
    G: Generator | None = None  # the live G that E was trained against (stage 1); None when not exported


ScoringPairName = Literal["ema", "live"]


def require_encoder(bundle: InferenceBundle) -> Encoder:
    """``bundle.E``, or the one CheckpointError every stage that needs E raises when there is none (an
    imported generator, or a stage-2 export)."""
    if bundle.E is None:
        origin = " (imported generator)" if bundle.meta.get("origin") else ""
        raise CheckpointError(f"checkpoint {bundle.identity}{origin}: this checkpoint has no encoder; "
                              "run `sdsg train --stage encoder --checkpoint DIR`")
    return bundle.E


def scoring_pair(bundle: InferenceBundle, pair: ScoringPairName) -> tuple[Generator, Encoder]:
    """The (G, E) that computes G(E(x)) for scoring, evaluation and examples (config ``score.pair``).

    'ema': (G_ema, E_ema), 'live': (G, E): each pair was trained together. A bundle written before E_ema
    existed falls back to (G_ema, E) with a warning; one without the live G refuses 'live'.
    """
    require_encoder(bundle)
    if pair == "live":
        if bundle.G is None:
            raise CheckpointError(f"checkpoint {bundle.identity} has no live G (exported before it was kept): "
                                  "use score.pair=ema or re-export from the training state")
        return bundle.G, bundle.E
    if pair != "ema":
        raise CheckpointError(f"unknown scoring pair {pair!r}: 'ema' or 'live'")
    if bundle.E_ema is None:
        log.warning("checkpoint %s has no E_ema (exported by an older version): scoring with (G_ema, E)",
                    bundle.identity)
        return bundle.G_ema, bundle.E
    return bundle.G_ema, bundle.E_ema


@dataclass(frozen=True)
class ModelDir(Artifact):
    """A model directory (training --out, import --out); every later stage loads its inference file."""

    inference = Member("inference.pt", "G_ema, E, E_ema, the live G, w_avg and the model config (weights_only)")
    discriminator = Member("discriminator.pt", "D, for fine-tuning (imports, --resume-from)")
    export = Member("model.safetensors", "`sdsg export`: G_ema, E and w_avg without pickle")


def inference_uri(uri: str) -> str:
    """``uri`` itself if it names a ``.pt`` file, else the inference file of the model directory ``uri``."""
    return uri if uri.endswith(".pt") else ModelDir(uri).inference


def discriminator_uri(uri: str) -> str:
    """``uri`` itself if it names a ``.pt`` file, else the discriminator file of the model directory ``uri``."""
    return uri if uri.endswith(".pt") else ModelDir(uri).discriminator


def identity_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:IDENTITY_HEX_CHARS]


def torch_bytes(payload: dict) -> bytes:
    """``payload`` as ``torch.save`` writes it: tensors and JSON-like values only, so it loads with weights_only."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


def read_torch_file(uri: str, storage: Storage, expected_format: str, what: str,
                    device: str | torch.device = "cpu") -> tuple[dict, bytes]:
    """The payload of a file this project wrote with :func:`torch_bytes`, and its bytes. ``weights_only``: no
    code runs. Raises ObjectNotFound when missing, CheckpointError naming the URI when not ``what``."""
    data = storage.read_bytes(uri)
    try:
        payload = torch.load(io.BytesIO(data), weights_only=True, map_location=device)
    except Exception as err:  # truncated zip, pickle garbage, disallowed globals: all mean "not our file"
        raise CheckpointError(f"{uri}: not a readable torch file ({type(err).__name__}: {err})") from None
    if not isinstance(payload, dict) or payload.get("format") != expected_format:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(f"{uri}: not an sdsg {what} (format {found!r}, expected {expected_format!r})")
    return payload, data


def _unwrap(module: nn.Module) -> nn.Module:
    """The plain module under DDP (``.module``) and torch.compile (``._orig_mod``) wrappers."""
    while True:
        inner = getattr(module, "module", None) or getattr(module, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return module
        module = inner


def _cpu_state(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in _unwrap(module).state_dict().items()}


def export_inference(
    G_ema: Generator, E: Encoder | None, model: ModelConfig, meta: dict, uri: str, storage: Storage,
    G_live: Generator | None = None, E_ema: Encoder | None = None,
) -> str:
    """Write the bundle atomically to ``uri`` (a .pt file or a directory); returns its identity.

    ``G_live`` and ``E_ema`` (stage 1) make both scoring pairs available (:func:`scoring_pair`).

    ``meta`` must hold JSON-like values only (they are stored as plain data so weights_only loading works);
    ``created_at`` (UTC, ISO 8601) is added when absent.
    """
    try:
        meta = json.loads(json.dumps(meta))
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{uri}: meta must be JSON-like (str/int/float/bool/None/list/dict): {err}") from None
    meta.setdefault("created_at", datetime.now(timezone.utc).isoformat(timespec="seconds"))
    G_plain = _unwrap(G_ema)
    payload = {
        "format": INFERENCE_FORMAT,
        "model": model.model_dump(mode="json"),
        "G_ema": _cpu_state(G_plain),
        "E": _cpu_state(E) if E is not None else None,
        "E_ema": _cpu_state(E_ema) if E_ema is not None else None,
        "G": _cpu_state(G_live) if G_live is not None else None,
        "w_avg": G_plain.mapping.w_avg.detach().to("cpu", copy=True),
        "meta": meta,
    }
    data = torch_bytes(payload)
    target = inference_uri(uri)
    storage.write_bytes(target, data)
    identity = identity_of(data)
    log.info("exported inference bundle %s (%d bytes, identity %s)", target, len(data), identity)
    return identity


def export_discriminator(D: Discriminator, model: ModelConfig, uri: str, storage: Storage | None = None) -> str:
    """Write D's state dict and its model config to ``uri`` (a .pt file or a directory: ``DIR/discriminator.pt``).

    Plain ``torch.save`` of tensors and JSON-like values, like the inference bundle, so it loads with
    ``weights_only=True``. Returns the written URI.
    """
    storage = storage or get_storage()
    payload = {"format": DISCRIMINATOR_FORMAT, "model": model.model_dump(mode="json"), "D": _cpu_state(D)}
    target = discriminator_uri(uri)
    storage.write_bytes(target, torch_bytes(payload))
    return target


def load_discriminator(uri: str, storage: Storage | None = None, device: str | torch.device = "cpu") -> Discriminator:
    """D written by :func:`export_discriminator` (trainable, in train mode: it is loaded to be fine-tuned).

    Raises ObjectNotFound when missing, CheckpointError (naming the URI) when unreadable or mismatched.
    """
    target = discriminator_uri(uri)
    payload, _ = read_torch_file(target, storage or get_storage(), DISCRIMINATOR_FORMAT, "discriminator file", device)
    try:
        model = ModelConfig.model_validate(payload["model"])
        D = build_discriminator(model)
        D.load_state_dict(payload["D"])
    except (KeyError, ValidationError, RuntimeError) as err:
        raise CheckpointError(f"{target}: discriminator does not match its stored model config: {err}") from None
    return D.to(device)


def _frozen(module: nn.Module, device: str | torch.device) -> nn.Module:
    module = module.to(device).eval()
    module.requires_grad_(False)
    return module


def load_inference(uri: str, storage: Storage | None = None, device: str | torch.device = "cpu") -> InferenceBundle:
    """Load a bundle written by :func:`export_inference`; networks in eval() with requires_grad False.

    Raises ObjectNotFound (a FileNotFoundError) when the file is missing and CheckpointError when it is not
    a readable sdsg inference bundle; both name the URI. ``E`` is None in a bundle without an encoder (an
    imported generator, a stage-2 export): stages that need it call :func:`require_encoder`.
    """
    target = inference_uri(uri)
    payload, data = read_torch_file(target, storage or get_storage(), INFERENCE_FORMAT, "inference bundle", device)
    missing = [k for k in _REQUIRED_KEYS if k not in payload]
    if missing:
        raise CheckpointError(f"{target}: inference bundle lacks {missing}")
    try:
        model = ModelConfig.model_validate(payload["model"])
    except ValidationError as err:
        raise CheckpointError(f"{target}: stored model config is invalid: {err}") from None

    G_ema = build_generator(model)

    def encoder(state: dict | None) -> Encoder | None:
        if state is None:
            return None
        E = build_encoder(model, G_ema.num_ws)
        E.load_state_dict(state)
        return _frozen(E, device)

    G_live = None
    try:
        G_ema.load_state_dict(payload["G_ema"])
        E, E_ema = encoder(payload["E"]), encoder(payload.get("E_ema"))
        if payload.get("G") is not None:
            G_live = build_generator(model)
            G_live.load_state_dict(payload["G"])
            G_live = _frozen(G_live, device)
    except RuntimeError as err:  # shape or key mismatch between weights and config
        raise CheckpointError(f"{target}: weights do not match the stored model config: {err}") from None
    if E is not None and E_ema is None:
        log.warning("%s: no E_ema in this bundle (written by an older version); pair 'ema' falls back to (G_ema, E)",
                    target)
    return InferenceBundle(
        G_ema=_frozen(G_ema, device),
        E=E,
        E_ema=E_ema,
        G=G_live,
        w_avg=payload["w_avg"].to(device),
        model=model,
        identity=identity_of(data),
        meta=dict(payload["meta"]),
    )

