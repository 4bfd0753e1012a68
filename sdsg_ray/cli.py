"""The ``sdsg`` command line. Each subcommand maps its flags onto config fields and calls one library
function; ``jobs/<name>.py`` call this same entry point, so CLI and ``ray job submit`` never drift."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from sdsg_ray.config import ConfigError, SDSGConfig, load_config


@dataclass(frozen=True)
class Flag:
    """A command-line flag that sets one config field."""

    name: str  # e.g. "--gpus-per-worker"
    field: str  # e.g. "train.gpus_per_worker"
    type: Callable[[str], Any] = str
    help: str = ""


@dataclass(frozen=True)
class Command:
    help: str
    target: str  # "module:function", called with (config, args)
    flags: tuple[Flag, ...] = ()


def _flags(section: str, *specs: tuple[str, Callable[[str], Any]]) -> tuple[Flag, ...]:
    return tuple(Flag(f"--{name}", f"{section}.{name.replace('-', '_')}", typ) for name, typ in specs)


COMMANDS: dict[str, Command] = {
    "make-dataset": Command(
        "Write the Internet-like synthetic dataset (inlier modes + planted outliers, labels.csv).",
        "sdsg_ray.dataset.synthetic:run_make_dataset",
        _flags("dataset", ("out", str), ("n", int), ("resolution", int), ("outlier-fraction", float), ("seed", int)),
    ),
    "train": Command(
        "Train StyleGAN2 (+ encoder for stage 'joint') on Ray Train.",
        "sdsg_ray.distributed.train:run_training",
        _flags(
            "train",
            ("data", str), ("out", str), ("stage", str), ("workers", int), ("gpus-per-worker", float),
            ("kimg", float), ("batch-size", int), ("seed", int),
        )
        + (Flag("--resolution", "model.resolution", int),),
    ),
    "score": Command(
        "Score every image by LPIPS(x, G(E(x))) with Ray Data.",
        "sdsg_ray.filtering.pipeline:run_scoring",
        _flags(
            "score",
            ("data", str), ("checkpoint", str), ("out", str), ("metric", str), ("batch-size", int),
            ("actors", int), ("gpus-per-actor", float), ("cpus-per-actor", float),
        ),
    ),
    "select": Command(
        "Choose the threshold with the paper's diversity and size bounds; write the kept manifest.",
        "sdsg_ray.filtering.selection:run_selection",
        _flags("select", ("scores", str), ("out", str), ("target-threshold", float), ("min-size", int)),
    ),
    "cluster": Command(
        "Fit the multi-modal truncation centers (KMeans on mapped latents).",
        "sdsg_ray.truncation.clusters:run_clustering",
        _flags("cluster", ("checkpoint", str), ("out", str), ("n-latents", int), ("clusters", int), ("seed", int)),
    ),
    "serve": Command(
        "Serve the sampler over HTTP with Ray Serve.",
        "serve_app.app:run_serve",
        _flags("serve", ("checkpoint", str), ("clusters", str), ("port", int), ("host", str)),
    ),
    "evaluate": Command(
        "FID/KID and the paper's comparisons (FID vs psi, filtered vs random vs raw).",
        "sdsg_ray.evaluation.evaluate:run_evaluation",
        _flags("evaluate", ("out", str), ("num-samples", int)),
    ),
    "pipeline": Command(
        "Run every stage in order, skipping those whose outputs exist.",
        "sdsg_ray.pipeline:run_pipeline",
        _flags("pipeline", ("root", str)),
    ),
    "demo": Command(
        "End-to-end demo on embedded defaults: dataset, pipeline, report, then the sampler.",
        "sdsg_ray.demo:run_demo",
        (Flag("--out", "pipeline.root", str, "Working directory of the demo."),),
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdsg", description="Self-Distilled StyleGAN on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, cmd in COMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.help)
        p.add_argument("--config", help="YAML config file (any subset of sections).")
        p.add_argument(
            "--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
            help="Override any config field; repeatable.",
        )
        p.add_argument("--storage-endpoint", dest="storage_endpoint", help="S3-compatible endpoint URL.")
        for flag in cmd.flags:
            p.add_argument(flag.name, dest=flag.field, type=flag.type, default=None, help=flag.help or flag.field)
        if name == "demo":
            p.add_argument("--no-serve", action="store_true", help="Stop after the report (for scripts).")
    return parser


def config_from_args(args: argparse.Namespace) -> SDSGConfig:
    """YAML first, then --set, then the explicit flags (the most specific wins)."""
    overrides: list[str] = list(args.overrides)
    explicit: dict[str, Any] = {}
    for flag in COMMANDS[args.command].flags:
        value = getattr(args, flag.field)
        if value is not None:
            explicit[flag.field] = value
    if args.storage_endpoint:
        explicit["storage.endpoint_url"] = args.storage_endpoint
    config = load_config(args.config, overrides)
    if not explicit:
        return config
    tree = config.model_dump(mode="json")
    for key, value in explicit.items():
        section, field = key.split(".", 1)
        tree[section][field] = value
    return load_config(None, {k: v for k, v in _flatten(tree).items()})


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
    except ConfigError as err:
        parser.exit(2, f"sdsg {args.command}: {err}\n")
    module_name, func_name = COMMANDS[args.command].target.split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    result = func(config, args)
    return int(result) if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
