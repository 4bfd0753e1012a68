"""Generators in and out without pickle: ``sdsg import`` (NVIDIA pickles, sdsg safetensors) and ``sdsg export``.

``sdsg import SOURCE --out DIR`` writes ``DIR/inference.pt`` (the bundle every stage loads) and, when the
source has a discriminator, ``DIR/discriminator.pt`` (for fine-tuning). SOURCE is recognised by its bytes:
a pickle (first byte 0x80) is an NVIDIA StyleGAN2 snapshot, read by :mod:`sdsg_ray.nvidia_pickle` without
running any of its code (the bundle holds G_ema, the live G and ``meta.origin``, but no encoder yet); a
safetensors file written by ``sdsg export`` comes back bit for bit.

``sdsg export --checkpoint DIR --format safetensors`` writes G_ema, E, E_ema (when present) and w_avg, with
the model config and the bundle's meta as JSON strings in the file's metadata: tensors and strings only, so
reading one can run nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
from pydantic import ValidationError

from sdsg_ray.artifacts.checkpoint import (CheckpointError, ModelDir, _cpu_state, export_discriminator,
                                            export_inference, inference_uri, load_inference)
from sdsg_ray.config import ModelConfig, SDSGConfig
from sdsg_ray.errors import InvalidRequest
from sdsg_ray.models.networks import build_encoder, build_generator
from sdsg_ray.nvidia_pickle import convert
from sdsg_ray.storage import Storage, get_storage, join

log = logging.getLogger(__name__)

SAFETENSORS_FORMAT = "sdsg-safetensors/1"
EXPORTED_NETWORKS = ("G_ema", "E", "E_ema")  # plus the tensor "w_avg"
PICKLE_PROTO = 0x80  # first byte of every pickle of protocol >= 2
SAFETENSORS_MAX_HEADER = 100 * 1024 * 1024  # the safetensors format's own limit


def _source_kind(data: bytes, source: str) -> str:
    if data[:1] == bytes([PICKLE_PROTO]):
        return "pickle"
    if len(data) >= 9:
        (header_len,) = struct.unpack("<Q", data[:8])
        if header_len <= min(SAFETENSORS_MAX_HEADER, len(data) - 8) and data[8:9] == b"{":
            return "safetensors"
    raise CheckpointError(f"{source}: neither an NVIDIA StyleGAN2 pickle nor an sdsg safetensors file")


# ----------------------------------------------------------------------------------------------
# Export


def export_safetensors(checkpoint: str, out: str, storage: Storage | None = None) -> str:
    """Write the bundle at ``checkpoint`` as safetensors to ``out`` (a .safetensors file or a directory)."""
    storage = storage or get_storage()
    bundle = load_inference(checkpoint, storage)
    tensors = {"w_avg": bundle.w_avg.detach().to("cpu", copy=True).contiguous()}
    for name in EXPORTED_NETWORKS:
        net = getattr(bundle, name)
        if net is not None:
            tensors.update({f"{name}.{k}": v for k, v in _cpu_state(net).items()})
    metadata = {"format": SAFETENSORS_FORMAT, "model": json.dumps(bundle.model.model_dump(mode="json")),
                "meta": json.dumps(bundle.meta), "source_identity": bundle.identity}
    target = out if out.endswith(".safetensors") else ModelDir(out).export
    storage.write_bytes(target, save_safetensors_bytes(tensors, metadata=metadata))
    log.info("exported %s (identity %s) to %s: %d tensors", checkpoint, bundle.identity, target, len(tensors))
    return target


def run_export(config: SDSGConfig) -> str:
    """``sdsg export``: the bundle at --checkpoint as --format (safetensors) to --out (default: beside it)."""
    cfg = config.export
    out = cfg.out or (cfg.checkpoint.rsplit("/", 1)[0] if cfg.checkpoint.endswith(".pt") else cfg.checkpoint)
    return export_safetensors(cfg.checkpoint, out, get_storage(config.storage))


# ----------------------------------------------------------------------------------------------
# Import


def _import_safetensors(data: bytes, source: str, out: str, storage: Storage) -> dict:
    try:
        tensors = load_safetensors_bytes(data)
        (header_len,) = struct.unpack("<Q", data[:8])  # the metadata lives in the JSON header
        metadata = json.loads(data[8:8 + header_len]).get("__metadata__") or {}
    except (SafetensorError, ValueError) as err:
        raise CheckpointError(f"{source}: not a readable safetensors file ({err})") from None
    if metadata.get("format") != SAFETENSORS_FORMAT:
        raise CheckpointError(f"{source}: safetensors metadata format {metadata.get('format')!r}, "
                              f"expected {SAFETENSORS_FORMAT!r} (written by `sdsg export`)")
    try:
        model = ModelConfig.model_validate(json.loads(metadata["model"]))
        meta = json.loads(metadata.get("meta") or "{}")
    except (KeyError, ValueError, ValidationError) as err:
        raise CheckpointError(f"{source}: stored model config is invalid: {err}") from None
    states: dict[str, dict[str, torch.Tensor]] = {name: {} for name in EXPORTED_NETWORKS}
    for key, value in tensors.items():
        name, _, sub = key.partition(".")
        if name in states and sub:
            states[name][sub] = value
        elif key != "w_avg":
            raise CheckpointError(f"{source}: unexpected tensor {key!r}")
    if not states["G_ema"] or "w_avg" not in tensors:
        raise CheckpointError(f"{source}: lacks G_ema or w_avg")
    try:
        G_ema = build_generator(model)
        G_ema.load_state_dict(states["G_ema"])
        encoders = {}
        for name in ("E", "E_ema"):
            if states[name]:
                encoders[name] = build_encoder(model, G_ema.num_ws)
                encoders[name].load_state_dict(states[name])
    except RuntimeError as err:
        raise CheckpointError(f"{source}: weights do not match the stored model config: {err}") from None
    if not torch.equal(G_ema.mapping.w_avg, tensors["w_avg"]):
        raise CheckpointError(f"{source}: w_avg differs from G_ema's mapping.w_avg")
    meta["imported_from"] = {"format": SAFETENSORS_FORMAT, "source": source,
                             "sha256": hashlib.sha256(data).hexdigest(), "source_identity": metadata.get("source_identity")}
    identity = export_inference(G_ema, encoders.get("E"), model, meta, out, storage, E_ema=encoders.get("E_ema"))
    return {"inference": inference_uri(out), "identity": identity, "format": "safetensors", "model": model.model_dump()}


def _import_nvidia(data: bytes, source: str, out: str, storage: Storage) -> dict:
    nets = convert(data, source)
    meta = {"stage": "import", "kimg": 0.0, "origin": nets.origin}
    identity = export_inference(nets.G_ema, None, nets.model, meta, out, storage, G_live=nets.G)
    result = {"inference": inference_uri(out), "identity": identity, "format": "nvidia-pickle",
              "sha256": nets.origin["sha256"], "model": nets.model.model_dump()}
    if nets.D is not None:
        result["discriminator"] = export_discriminator(nets.D, nets.model, out, storage)
    return result


def import_model(source: str, out: str, storage: Storage | None = None) -> dict:
    """Read ``source`` (local path or S3 URI) and write ``out/inference.pt`` (+ ``discriminator.pt``)."""
    storage = storage or get_storage()
    if out.endswith(".pt"):
        raise InvalidRequest(f"--out must be a directory (it gets {ModelDir.inference.name} and {ModelDir.discriminator.name}), got {out}")
    data = storage.read_bytes(source)
    kind = _source_kind(data, source)
    log.info("importing %s (%s, %d bytes) into %s", source, kind, len(data), out)
    if kind == "pickle":
        return _import_nvidia(data, source, out, storage)
    return _import_safetensors(data, source, out, storage)


def run_import(config: SDSGConfig) -> dict:
    """``sdsg import SOURCE --out DIR``."""
    cfg = config.importer
    if not cfg.source:
        raise InvalidRequest("sdsg import needs a SOURCE: an NVIDIA StyleGAN2 .pkl or an sdsg .safetensors (path or s3://)")
    return import_model(cfg.source, cfg.out, get_storage(config.storage))
