"""The ``sdsg`` command line: flags -> one layered config -> one stage function.

Each subcommand names config fields it exposes as flags; the config is built by
:func:`sdsg_ray.config.build_config` from the layers default < the command's own defaults (the demo's)
< ``--config`` files < ``--set`` overrides < named flags, and handed to the stage. ``jobs/<name>.py``
call :func:`main` too, so the CLI and ``ray job submit`` never drift.

What reaches the terminal is decided here: progress and log lines on stderr, a stage's result as JSON
on stdout, and a user error (:class:`~sdsg_ray.errors.UserError`) as one line on stderr with exit
status 1 (2 for a bad setting); ``--debug`` shows tracebacks instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from sdsg_ray.config import (
    ConfigError,
    SDSGConfig,
    build_config,
    describe_config,
    field_description,
    overrides_layer,
    yaml_layer,
)
from sdsg_ray.demo import DEMO_DEFAULTS
from sdsg_ray.errors import UserError

log = logging.getLogger("sdsg")


@dataclass(frozen=True)
class Flag:
    """A command-line flag that sets one config field (``const``: a switch that sets that value)."""

    name: str  # e.g. "--gpus-per-worker"; without leading dashes: an optional positional argument (e.g. "source")
    field: str  # e.g. "train.gpus_per_worker"
    type: Callable[[str], Any] = str
    const: Any = None


@dataclass(frozen=True)
class Command:
    help: str
    # Returns the stage function; importing the stages (torch, Ray) waits until a command runs, so that
    # --help, --print-config and a bad setting answer at once.
    run: Callable[[], Callable[[SDSGConfig], Any]]
    flags: tuple[Flag, ...] = ()
    defaults: Mapping[str, Any] = field(default_factory=dict)  # the command's own layer: {"section.field": v}


def _flags(section: str, *specs: tuple[str, Callable[[str], Any]]) -> tuple[Flag, ...]:
    return tuple(Flag(f"--{name}", f"{section}.{name.replace('-', '_')}", typ) for name, typ in specs)


def _stage(name: str) -> Callable[[], Callable[[SDSGConfig], Any]]:
    def load() -> Callable[[SDSGConfig], Any]:
        from sdsg_ray.stages import STAGES

        return STAGES[name]

    return load


def _pipeline() -> Callable[[SDSGConfig], Any]:
    from sdsg_ray.pipeline import run_pipeline

    return run_pipeline


def _demo() -> Callable[[SDSGConfig], Any]:
    from sdsg_ray.demo import run_demo

    return run_demo


COMMANDS: dict[str, Command] = {
    "make-dataset": Command(
        "Write the Internet-like synthetic dataset (inlier modes + planted outliers, labels.csv).",
        _stage("make-dataset"),
        _flags("dataset", ("out", str), ("n", int), ("resolution", int), ("outlier-fraction", float), ("seed", int)),
    ),
    "train": Command(
        "Train StyleGAN2 (+ encoder for stage 'joint'), or an encoder alone for a generator you have "
        "(--stage encoder --checkpoint DIR), on Ray Train.",
        _stage("train"),
        _flags(
            "train",
            ("data", str), ("out", str), ("stage", str), ("workers", int), ("gpus-per-worker", float),
            ("kimg", float), ("batch-size", int), ("seed", int), ("checkpoint", str), ("resume-from", str),
        )
        + (Flag("--resolution", "model.resolution", int),),
    ),
    "score": Command(
        "Score every image by LPIPS(x, G(E(x))) with Ray Data.",
        _stage("score"),
        _flags(
            "score",
            ("data", str), ("checkpoint", str), ("out", str), ("metric", str), ("batch-size", int),
            ("actors", int), ("gpus-per-actor", float), ("cpus-per-actor", float), ("pair", str),
            ("judge-resolution", int),
        ),
    ),
    "select": Command(
        "Choose the threshold with the paper's diversity and size bounds; write the kept manifest.",
        _stage("select"),
        _flags("select", ("scores", str), ("out", str), ("target-threshold", float), ("min-size", int)),
    ),
    "ingest": Command(
        "Download a URL list (or the paper's JSON with boxes) into webdataset/parquet shards, resumable.",
        _stage("ingest"),
        _flags(
            "ingest",
            ("urls", str), ("out", str), ("format", str), ("resolution", int), ("shard-size", int),
            ("threads", int), ("tasks", int), ("retries", int), ("timeout-s", float),
        ),
    ),
    "cluster": Command(
        "Fit the multi-modal truncation centers (KMeans on mapped latents).",
        _stage("cluster"),
        _flags("cluster", ("checkpoint", str), ("out", str), ("n-latents", int), ("clusters", int), ("seed", int),
               ("judge-resolution", int)),
    ),
    "serve": Command(
        "Serve the sampler over HTTP with Ray Serve.",
        _stage("serve"),
        _flags("serve", ("checkpoint", str), ("clusters", str), ("port", int), ("host", str)),
    ),
    "import": Command(
        "Import a generator you already have (NVIDIA StyleGAN2 .pkl, without running its code; or an sdsg "
        ".safetensors) into a checkpoint directory every stage can use.",
        _stage("import"),
        (Flag("source", "importer.source", str), Flag("--out", "importer.out", str)),
    ),
    "export": Command(
        "Export a checkpoint's G_ema, E and w_avg without pickle (safetensors, model config as metadata).",
        _stage("export"),
        _flags("export", ("checkpoint", str), ("format", str), ("out", str)),
    ),
    "generate": Command(
        "Write one PNG per seed and a grid (mean or multi-modal truncation), like NVIDIA's gen_images.py.",
        _stage("generate"),
        _flags(
            "generate",
            ("checkpoint", str), ("seeds", str), ("psi", float), ("truncation", str), ("clusters", str),
            ("assign-by", str), ("out", str), ("batch-size", int),
        ),
    ),
    "evaluate": Command(
        "FID/KID and the paper's comparisons (FID vs psi, filtered vs random vs raw).",
        _stage("evaluate"),
        _flags("evaluate", ("out", str), ("num-samples", int)),
    ),
    "pipeline": Command(
        "Run every stage in order, skipping those whose outputs exist.",
        _pipeline,
        _flags("pipeline", ("root", str)),
    ),
    "demo": Command(
        "End-to-end demo on embedded defaults: dataset, pipeline, report, then the sampler.",
        _demo,
        (Flag("--out", "pipeline.root", str), Flag("--no-serve", "pipeline.serve", const=False)),
        defaults={f"{section}.{name}": value for section, values in DEMO_DEFAULTS.items() for name, value in values.items()},
    ),
}


def _help(flag: Flag) -> str:
    text = field_description(flag.field)
    return f"{text} [{flag.field}]" if text else flag.field


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdsg", description="Self-Distilled StyleGAN on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, cmd in COMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.help)
        p.add_argument("--config", action="append", default=[], metavar="YAML",
                       help="Config file (any subset of sections); repeatable, later files win.")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                       help="Override any config field; repeatable; wins over --config.")
        p.add_argument("--storage-endpoint", dest="storage.endpoint_url", default=None,
                       help=f"{field_description('storage.endpoint_url')} [storage.endpoint_url]")
        for flag in cmd.flags:
            kind = {"action": "store_const", "const": flag.const} if flag.const is not None else {"type": flag.type}
            if not flag.name.startswith("-"):  # positional: argparse takes the dest as its name
                p.add_argument(flag.field, metavar=flag.name.upper(), nargs="?", default=None, help=_help(flag), **kind)
                continue
            p.add_argument(flag.name, dest=flag.field, default=None, help=_help(flag), **kind)
        p.add_argument("--print-config", action="store_true",
                       help="Print the resolved config (each value a layer set is marked with that layer) and exit.")
        p.add_argument("--debug", action="store_true", help="Show tracebacks and debug logs.")
    return parser


def config_from_args(args: argparse.Namespace) -> SDSGConfig:
    """The layers in their fixed order: command defaults < --config files < --set < named flags."""
    flags = {f.field: getattr(args, f.field) for f in COMMANDS[args.command].flags if getattr(args, f.field) is not None}
    endpoint = getattr(args, "storage.endpoint_url")
    if endpoint:
        flags["storage.endpoint_url"] = endpoint
    return build_config(
        ("command", COMMANDS[args.command].defaults),
        *(yaml_layer(path) for path in args.config),
        overrides_layer(args.overrides),
        ("flag", flags),
    )


def user_error(err: BaseException) -> UserError | None:
    """The UserError behind ``err``: itself, or one raised inside a Ray task or worker and wrapped by Ray."""
    seen: set[int] = set()
    stack = [err]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, UserError):
            return current
        stack += [getattr(current, "cause", None), current.__cause__, current.__context__]
        stack += list(getattr(current, "worker_failures", {}).values() or ())  # Ray Train's per-worker errors
    return None


def _print_result(result: Any) -> None:
    if isinstance(result, (dict, list)):
        print(json.dumps(result, indent=2, default=str))
    elif isinstance(result, str):
        print(result)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_args(args)
    except ConfigError as err:
        parser.exit(2, f"sdsg {args.command}: {err}\n")
    if args.print_config:
        sys.stdout.write(describe_config(config))
        return 0
    try:
        result = COMMANDS[args.command].run()(config)
    except KeyboardInterrupt:
        print(f"sdsg {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        known = user_error(err)
        if known is None or args.debug:
            raise
        print(f"sdsg {args.command}: error: {known}", file=sys.stderr)
        return 2 if isinstance(known, ConfigError) else 1
    _print_result(result)
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


if __name__ == "__main__":
    sys.exit(main())
