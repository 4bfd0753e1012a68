"""NVIDIA StyleGAN2 pickles -> this project's networks, without running a line of the pickle's code.

NVIDIA's snapshots (``stylegan2-ada-pytorch``'s ``training.networks`` and the StyleGAN2 networks of the
``stylegan3`` repository, ``training.networks_stylegan2``) are ``pickle.dump(dict(G=..., D=..., G_ema=...,
augment_pipe=..., training_set_kwargs=...))``. Every network in them is a ``torch_utils.persistence``
record: ``_reconstruct_persistent_obj(meta)`` with ``meta = {type, version, module_src, class_name,
state}``, where ``module_src`` is the whole Python source file of the network, which NVIDIA's loader
``exec``s. Loading a pickle from the Internet with NVIDIA's code therefore runs that pickle's code.

Here :class:`RestrictedUnpickler` resolves only the globals of :data:`ALLOWED_GLOBALS`: torch's
tensor-rebuild functions (storages read back with ``torch.load(weights_only=True)``), NVIDIA's persistence
record (replaced by :func:`_capture_record`, which keeps it as data and only hashes the source), ``EasyDict``
as a plain dict, and numpy scalar pieces. Any other global is refused in one line that names it, before
anything is called.

:func:`convert` then reads the architecture from the records' own attributes (so neither repository's
defaults matter), refuses what this project does not implement in one line each, rebuilds the project's
Generator and Discriminator, and maps every parameter and buffer by name:

    G  mapping.fc{i}.*           -> mapping.layers.{i}.*        mapping.w_avg -> mapping.w_avg
       synthesis.b{R}.*          -> synthesis.blocks.{k}.*      (k: the block at resolution R)
    D  b{R}.{fromrgb,conv0,conv1,skip}.* -> trunk.blocks.{k}.*  (R > 4)
       b4.{conv,fc,out}.*        -> {conv,fc,out}.*             (the epilogue; minibatch-std has no weights)

``resample_filter`` buffers are not weights: each must equal the fixed [1, 3, 3, 1] low-pass filter the
project builds itself. A tensor left unmapped, or one of the project's left unfilled, is an error. The
networks are built on the meta device and take the pickle's tensors as their own (no random init, no copy).
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

try:
    from numpy._core import multiarray  # numpy >= 2
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core import multiarray

from sdsg_ray.artifacts.checkpoint import CheckpointError
from sdsg_ray.config import ModelConfig
from sdsg_ray.models.networks import (
    MAPPING_LR_MUL,
    Discriminator,
    Generator,
    build_discriminator,
    build_generator,
    channels_at,
    fir_filter,
)

PICKLE_FORMAT = "nvidia-stylegan2-pickle"
PERSISTENCE_VERSIONS = (6,)  # torch_utils.persistence._version in both repositories


class UnsafePickleError(CheckpointError):
    """The pickle names a global outside the allow-list: refused before anything from it is called."""


class UnsupportedModelError(CheckpointError):
    """An NVIDIA network this project does not implement (StyleGAN3, conditional, other architectures)."""


@dataclass
class PersistentRecord:
    """What NVIDIA's ``_reconstruct_persistent_obj`` receives, kept as data: the class name and the
    module's ``__dict__`` (``_parameters``, ``_buffers``, ``_modules``, ``_init_kwargs``, attributes).
    The embedded module source is only hashed (for the origin record), never compiled."""

    class_name: str
    state: dict
    source_sha256: str

    def attr(self, name: str, default: Any = None) -> Any:
        return self.state.get(name, default)

    def child(self, name: str) -> "PersistentRecord | None":
        return self.children().get(name)

    def children(self) -> dict[str, "PersistentRecord"]:
        return {k: v for k, v in (self.state.get("_modules") or {}).items() if isinstance(v, PersistentRecord)}


def _capture_record(meta: dict) -> PersistentRecord:
    """Stands in for ``torch_utils.persistence._reconstruct_persistent_obj``: data only, no exec."""
    if not isinstance(meta, dict) or meta.get("type") != "class" or not isinstance(meta.get("state"), dict):
        found = sorted(meta) if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointError(f"malformed NVIDIA persistence record (found {found})")
    if meta.get("version") not in PERSISTENCE_VERSIONS:
        raise CheckpointError(f"NVIDIA persistence record version {meta.get('version')!r} is not one of {PERSISTENCE_VERSIONS}")
    source = meta.get("module_src") or ""
    return PersistentRecord(
        class_name=str(meta.get("class_name")),
        state=dict(meta["state"]),
        source_sha256=hashlib.sha256(source.encode("utf-8", "surrogatepass")).hexdigest(),
    )


def _load_storage(data: bytes):
    """``torch.storage._load_from_bytes`` (how a plain ``pickle.dump`` stores a tensor's storage: a nested
    legacy ``torch.save``), but with ``weights_only=True``: the nested file can hold storages only."""
    return torch.load(io.BytesIO(data), weights_only=True)


# (module, name) -> what the name resolves to. Nothing else resolves.
ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): torch._utils._rebuild_parameter_with_state,
    ("torch.storage", "_load_from_bytes"): _load_storage,
    ("torch", "Size"): torch.Size,
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "set"): set,  # nn.Module's _non_persistent_buffers_set under pickle protocols < 4
    ("builtins", "frozenset"): frozenset,
    ("_codecs", "encode"): lambda text, encoding="latin1": text.encode(encoding),  # bytes under protocol 2
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _capture_record,
    ("dnnlib.util", "EasyDict"): dict,
    ("dnnlib", "EasyDict"): dict,
    # numpy scalars (NVIDIA's weight_gain floats) and arrays (StyleGAN3's attributes, so that a StyleGAN3
    # pickle reaches the one-line "not supported" instead of a refused global); an object array's items
    # come through this same unpickler
    ("numpy", "dtype"): np.dtype,
    ("numpy", "ndarray"): np.ndarray,
    **{(f"numpy{core}.multiarray", name): getattr(multiarray, name)
       for core in (".core", "._core") for name in ("scalar", "_reconstruct")},
}


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves :data:`ALLOWED_GLOBALS` only; ``source`` names the file in errors."""

    def __init__(self, file, source: str):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"{self.source}: refused global {module}.{name}: an NVIDIA StyleGAN2 pickle needs only tensors, "
                "NVIDIA's persistence records and plain values (nothing from this pickle was run)"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"{self.source}: refused persistent id {str(pid)[:80]!r}: not an NVIDIA pickle")


def read_pickle(data: bytes, source: str) -> dict:
    """The snapshot dict of an NVIDIA pickle, networks as :class:`PersistentRecord`; nothing from it runs."""
    try:
        snapshot = RestrictedUnpickler(io.BytesIO(data), source).load()
    except CheckpointError:
        raise
    except Exception as err:  # truncated, corrupt, or not a pickle at all
        raise CheckpointError(f"{source}: not a readable NVIDIA pickle ({type(err).__name__}: {err})") from None
    if not isinstance(snapshot, dict) or not isinstance(snapshot.get("G_ema"), PersistentRecord):
        keys = sorted(snapshot) if isinstance(snapshot, dict) else type(snapshot).__name__
        raise CheckpointError(f"{source}: not an NVIDIA snapshot: expected a dict with a network 'G_ema', found {keys}")
    return snapshot


# ----------------------------------------------------------------------------------------------
# Records -> flat state dicts and the architecture


def flat_tensors(record: PersistentRecord, prefix: str = "") -> dict[str, Tensor]:
    """NVIDIA's ``state_dict()`` of a record tree: parameters and buffers by dotted name."""
    out: dict[str, Tensor] = {}
    for kind in ("_parameters", "_buffers"):
        for name, value in (record.attr(kind) or {}).items():
            if value is not None:
                out[prefix + name] = value.detach() if isinstance(value, Tensor) else value
    for name, child in (record.attr("_modules") or {}).items():
        if isinstance(child, PersistentRecord):
            out.update(flat_tensors(child, f"{prefix}{name}."))
        elif child is not None:
            raise UnsupportedModelError(f"submodule {prefix}{name} is a {type(child).__name__}, not an NVIDIA network")
    return out


def _walk(record: PersistentRecord, prefix: str = ""):
    yield prefix.rstrip("."), record
    for name, child in record.children().items():
        yield from _walk(child, f"{prefix}{name}.")


def _jsonable(value: Any) -> Any:
    """Init kwargs as JSON (EasyDicts are dicts already; numpy scalars become floats)."""
    return json.loads(json.dumps(value, default=lambda v: v.item() if hasattr(v, "item") else str(v)))


def _refuse(what: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"{what} is not supported by sdsg (it implements NVIDIA's StyleGAN2 config F: "
                                 "skip generator, residual discriminator, unconditional)")


def _tensor(tensors: dict[str, Tensor], name: str, what: str) -> Tensor:
    if name not in tensors:
        raise CheckpointError(f"{what}: NVIDIA tensor {name} is missing")
    return tensors[name]


def _channel_rule(channels: dict[int, int]) -> tuple[int, int]:
    """(channel_base, channel_max) that give ``channels[r] = min(channel_base // r, channel_max)``."""
    channel_max = max(channels.values())
    below = sorted(r for r, c in channels.items() if c < channel_max)
    channel_base = channels[below[0]] * below[0] if below else channel_max * max(channels)
    if any(channels_at(r, channel_base, channel_max) != c for r, c in channels.items()):
        raise _refuse(f"a channel layout outside min(channel_base // r, channel_max) ({channels})")
    return channel_base, channel_max


def model_config(G: PersistentRecord, D: PersistentRecord | None) -> ModelConfig:
    """The ModelConfig that rebuilds these networks, read from the records' attributes and shapes."""
    synthesis, mapping = G.child("synthesis"), G.child("mapping")
    if synthesis is None or mapping is None:
        raise _refuse(f"a generator without synthesis/mapping networks (class {G.class_name})")
    if synthesis.child("input") is not None or any(r.class_name == "SynthesisInput" for _, r in _walk(synthesis)):
        raise _refuse("StyleGAN3 (alias-free) synthesis")
    c_dim = int(G.attr("c_dim") or 0)
    if c_dim or (D is not None and int(D.attr("c_dim") or 0)):
        raise _refuse(f"a conditional model (c_dim={c_dim or D.attr('c_dim')})")
    if int(G.attr("img_channels", 3)) != 3:
        raise _refuse(f"img_channels={G.attr('img_channels')}")
    if not G.attr("z_dim"):
        raise _refuse("z_dim=0")
    resolution = int(G.attr("img_resolution"))
    tensors = flat_tensors(synthesis)
    blocks = {int(name[1:]): rec for name, rec in synthesis.children().items() if re.fullmatch(r"b\d+", name)}
    for res, block in blocks.items():
        if block.attr("architecture", "skip") != "skip":
            raise _refuse(f"generator architecture {block.attr('architecture')!r} (block b{res})")
    layers = [(f"synthesis.{path}", rec) for path, rec in _walk(synthesis) if rec.class_name in ("SynthesisLayer", "ToRGBLayer")]
    for path, rec in layers:
        if rec.class_name == "SynthesisLayer" and (rec.attr("activation", "lrelu") != "lrelu" or not rec.attr("use_noise", True)
                                                   or rec.attr("kernel_size", 3) != 3):
            raise _refuse(f"{path}: activation {rec.attr('activation')!r}, use_noise {rec.attr('use_noise')}, "
                          f"kernel {rec.attr('kernel_size')}")
    clamps = {rec.attr("conv_clamp") for _, rec in layers}
    channels = {res: int(_tensor(tensors, f"b{res}.conv1.weight", "G.synthesis").shape[0]) for res in blocks}
    num_fp16 = sum(bool(b.attr("use_fp16")) for b in blocks.values())
    fc_layers = [rec for name, rec in mapping.children().items() if re.fullmatch(r"fc\d+", name)]
    lr_muls = {float(rec.attr("bias_gain", MAPPING_LR_MUL)) for rec in fc_layers}
    if lr_muls != {MAPPING_LR_MUL}:
        raise _refuse(f"mapping lr_multiplier {sorted(lr_muls)} (sdsg uses {MAPPING_LR_MUL})")
    if any(rec.attr("activation", "lrelu") != "lrelu" for rec in fc_layers):
        raise _refuse("a mapping activation other than lrelu")
    mbstd_group, mbstd_channels = 4, 1
    if D is not None:
        d_blocks = {int(n[1:]): rec for n, rec in D.children().items() if re.fullmatch(r"b\d+", n)}
        for res, block in d_blocks.items():
            if block.attr("architecture", "resnet") != "resnet":
                raise _refuse(f"discriminator architecture {block.attr('architecture')!r} (block b{res})")
        epilogue = d_blocks.get(4)
        mbstd = epilogue.child("mbstd") if epilogue is not None else None
        if mbstd is None or not mbstd.attr("group_size") or not mbstd.attr("num_channels"):
            raise _refuse("a discriminator without a fixed-size minibatch-std layer")
        mbstd_group, mbstd_channels = int(mbstd.attr("group_size")), int(mbstd.attr("num_channels"))
        d_layers = [rec for _, rec in _walk(D) if rec.class_name == "Conv2dLayer" and rec.attr("activation") == "lrelu"]
        clamps |= {rec.attr("conv_clamp") for rec in d_layers}
        d_tensors = flat_tensors(D)
        d_channels = {res: int(_tensor(d_tensors, f"b{res}.conv0.weight", "D").shape[0]) for res in d_blocks if res > 4}
        d_channels[4] = int(_tensor(d_tensors, "b4.conv.weight", "D").shape[0])
        if any(channels.get(r) != c for r, c in d_channels.items()):
            raise _refuse(f"a discriminator whose channels {d_channels} differ from the generator's {channels}")
    if len(clamps) != 1:
        raise _refuse(f"conv_clamp differing between layers ({sorted(map(str, clamps))})")
    conv_clamp = next(iter(clamps))
    channel_base, channel_max = _channel_rule(channels)
    return ModelConfig(
        resolution=resolution, z_dim=int(G.attr("z_dim")), w_dim=int(G.attr("w_dim")), mapping_layers=len(fc_layers),
        channel_base=channel_base, channel_max=channel_max, num_fp16_res=num_fp16,
        conv_clamp=float(conv_clamp) if conv_clamp is not None else None,
        mbstd_group=mbstd_group, mbstd_channels=mbstd_channels,
    )


# ----------------------------------------------------------------------------------------------
# The name map


_FILTER = "resample_filter"


def _renamed(nvidia: str, block_index: dict[int, int], fixed: tuple[str, str], blocks: tuple[str, str]) -> str:
    """NVIDIA's state-dict name -> this project's: ``fixed`` is (pattern, template) for the names outside the
    numbered resolution blocks, ``blocks`` (NVIDIA's block prefix pattern, ours) for those inside them."""
    pattern, template = fixed
    if m := re.fullmatch(pattern, nvidia):
        return m.expand(template)
    prefix, ours = blocks
    if (m := re.fullmatch(rf"{prefix}(\d+)\.(.+)", nvidia)) and int(m[1]) in block_index:
        return f"{ours}.{block_index[int(m[1])]}.{m[2]}"
    return nvidia  # mapping.w_avg and anything unknown (then reported as unmapped)


def load_mapped(net: torch.nn.Module, tensors: dict[str, Tensor], rename: Callable[[str], str], what: str) -> None:
    """Copy NVIDIA's tensors into ``net`` by the name map; every tensor on both sides must be accounted for."""
    reference_filter = fir_filter()
    ours = net.state_dict()
    mapped: dict[str, Tensor] = {}
    unmapped = []
    for name, value in tensors.items():
        if name.endswith(_FILTER):
            if not torch.allclose(value.float(), reference_filter, rtol=0, atol=1e-7):
                raise _refuse(f"{what}.{name}: a resample filter other than [1, 3, 3, 1]")
            continue
        target = rename(name)
        if target not in ours:
            unmapped.append(name)
            continue
        if tuple(ours[target].shape) != tuple(value.shape):
            raise CheckpointError(f"{what}.{name} has shape {tuple(value.shape)}, sdsg's {target} {tuple(ours[target].shape)}")
        mapped[target] = value.to(ours[target].dtype)
    missing = [k for k in ours if k not in mapped and not k.endswith("w_avg_count")]
    if unmapped or missing:
        raise CheckpointError(f"{what}: NVIDIA tensors left unmapped {unmapped[:8]}, sdsg tensors missing {missing[:8]}")
    if "mapping.w_avg_count" in ours:  # NVIDIA's w_avg is a plain EMA that has long been running
        mapped["mapping.w_avg_count"] = torch.tensor(10**6, dtype=torch.int64)
    net.load_state_dict(mapped, strict=True, assign=True)  # the pickle's tensors become the weights: no copy


@dataclass
class ImportedNetworks:
    model: ModelConfig
    G_ema: Generator
    G: Generator | None
    D: Discriminator | None
    origin: dict  # JSON-like: format, sha256, NVIDIA class names and init kwargs, persistence source hashes


def _built_from(record: PersistentRecord, build: Callable[[], torch.nn.Module], blocks: Callable[[Any], Any],
                fixed: tuple[str, str], block_names: tuple[str, str], what: str) -> Any:
    """A network built empty, filled with the record's tensors by the name map (:func:`_renamed`), every
    parameter accounted for.

    Built on the meta device (no random init of the weights :func:`load_mapped` assigns), except the fixed
    FIR filters, which are in no state dict and are built here as the network would build them."""
    with torch.device("meta"):
        net = build()
    for module in net.modules():
        if isinstance(dict(module.named_buffers(recurse=False)).get(_FILTER), Tensor):
            module.register_buffer(_FILTER, fir_filter(), persistent=False)
    index = {block.resolution: i for i, block in enumerate(blocks(net))}
    load_mapped(net, flat_tensors(record), lambda n: _renamed(n, index, fixed, block_names), what)
    left = [n for n, t in (*net.named_parameters(), *net.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointError(f"{what}: sdsg tensors left without weights {left[:8]}")
    return net


def build_generator_from(record: PersistentRecord, model: ModelConfig, what: str) -> Generator:
    return _built_from(record, lambda: build_generator(model), lambda G: G.synthesis.blocks,
                       (r"mapping\.fc(\d+)\.(weight|bias)", r"mapping.layers.\1.\2"),
                       (r"synthesis\.b", "synthesis.blocks"), what)


def build_discriminator_from(record: PersistentRecord, model: ModelConfig, what: str) -> Discriminator:
    return _built_from(record, lambda: build_discriminator(model), lambda D: D.trunk.blocks,
                       (r"b4\.(conv|fc|out)\.(.+)", r"\1.\2"), ("b", "trunk.blocks"), what)


def convert(data: bytes, source: str) -> ImportedNetworks:
    """An NVIDIA snapshot pickle's bytes -> this project's G_ema (+ G, D when present), never running its code."""
    snapshot = read_pickle(data, source)
    G_ema_rec = snapshot["G_ema"]
    G_rec = snapshot.get("G") if isinstance(snapshot.get("G"), PersistentRecord) else None
    D_rec = snapshot.get("D") if isinstance(snapshot.get("D"), PersistentRecord) else None
    model = model_config(G_ema_rec, D_rec)
    G_ema = build_generator_from(G_ema_rec, model, f"{source}:G_ema")
    G = build_generator_from(G_rec, model, f"{source}:G") if G_rec is not None else None
    D = build_discriminator_from(D_rec, model, f"{source}:D") if D_rec is not None else None
    mapping = G_ema_rec.child("mapping")
    records = {k: rec for k, rec in (("G", G_ema_rec), ("D", D_rec)) if rec is not None}
    origin = {
        "format": PICKLE_FORMAT,
        "source": source,
        "sha256": hashlib.sha256(data).hexdigest(),
        "networks": sorted(k for k, v in snapshot.items() if isinstance(v, PersistentRecord)),
        "init_kwargs": {k: _jsonable(rec.attr("_init_kwargs") or {}) for k, rec in records.items()},
        "w_avg_beta": _jsonable(mapping.attr("w_avg_beta")) if mapping is not None else None,
        "module_src_sha256": {k: rec.source_sha256 for k, rec in records.items()},
        "training_set_kwargs": _jsonable(snapshot.get("training_set_kwargs") or {}),
    }
    return ImportedNetworks(model=model, G_ema=G_ema, G=G, D=D, origin=origin)
