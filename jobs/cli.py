"""The ``sdsg`` command line: flags -> one layered config (:func:`sdsg_ray.config.build_config`) -> one stage.

The app layer: the one table of commands (each a stage function, or a composition such as the pipeline
followed by the sampler) lives here, and ``jobs/<name>.py`` call :func:`main` too, so the CLI and ``ray job
submit`` never drift. Progress and logs go to stderr, a stage's result as JSON to stdout, and a user error
(:class:`~sdsg_ray.errors.UserError`) is one line on stderr with exit status 1 (2 for a bad setting);
``--debug`` shows tracebacks instead.
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
from sdsg_ray.demo import DEMO_DEFAULTS, run_demo
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
    run: Callable[[SDSGConfig], Any]  # the stage, or a composition of stages, called with the resolved config
    flags: tuple[Flag, ...] = ()
    defaults: Mapping[str, Any] = field(default_factory=dict)  # the command's own layer: {"section.field": v}


# The one table of commands: each entry is its stage function with its help, flags and defaults. The
# functions import their stage when called (torch, Ray), so --help, --print-config and a bad setting
# answer at once.
COMMANDS: dict[str, Command] = {}


def command(name: str, help: str, flags: tuple[Flag, ...] = (), defaults: Mapping[str, Any] | None = None
            ) -> Callable[[Callable[[SDSGConfig], Any]], Callable[[SDSGConfig], Any]]:
    def register(run: Callable[[SDSGConfig], Any]) -> Callable[[SDSGConfig], Any]:
        COMMANDS[name] = Command(help, run, flags, defaults or {})
        return run

    return register


def _flags(section: str, *specs: tuple[str, Callable[[str], Any]]) -> tuple[Flag, ...]:
    return tuple(Flag(f"--{name}", f"{section}.{name.replace('-', '_')}", typ) for name, typ in specs)


@command("make-dataset", "Write the Internet-like synthetic dataset (inlier modes + planted outliers and their labels).",
         _flags("dataset", ("out", str), ("n", int), ("resolution", int), ("outlier-fraction", float), ("seed", int)))
def make_dataset(config: SDSGConfig) -> Any:
    from sdsg_ray.dataset.synthetic import run_make_dataset

    return run_make_dataset(config)


@command("train", "Train StyleGAN2 (+ encoder for stage 'joint'), or an encoder alone for a generator you have "
         "(--stage encoder --checkpoint DIR), on Ray Train.",
         _flags("train", ("data", str), ("out", str), ("stage", str), ("workers", int), ("gpus-per-worker", float),
                ("kimg", float), ("batch-size", int), ("seed", int), ("checkpoint", str), ("resume-from", str))
         + (Flag("--resolution", "model.resolution", int),))
def train(config: SDSGConfig) -> Any:
    from sdsg_ray.distributed.train import run_training

    return run_training(config)


@command("score", "Score every image by LPIPS(x, G(E(x))) with Ray Data.",
         _flags("score", ("data", str), ("checkpoint", str), ("out", str), ("metric", str), ("batch-size", int),
                ("actors", int), ("gpus-per-actor", float), ("cpus-per-actor", float), ("pair", str),
                ("judge-resolution", int)))
def score(config: SDSGConfig) -> Any:
    from sdsg_ray.filtering.score import run_scoring

    return run_scoring(config)


@command("select", "Choose the threshold with the paper's diversity and size bounds; write the kept manifest.",
         _flags("select", ("scores", str), ("out", str), ("target-threshold", float), ("min-size", int)))
def select(config: SDSGConfig) -> Any:
    from sdsg_ray.filtering.select import run_selection

    return run_selection(config)


@command("ingest", "Download a URL list (or the paper's JSON with boxes) into webdataset/parquet shards, resumable.",
         _flags("ingest", ("urls", str), ("out", str), ("format", str), ("resolution", int), ("shard-size", int),
                ("threads", int), ("tasks", int), ("retries", int), ("timeout-s", float)))
def ingest(config: SDSGConfig) -> Any:
    from sdsg_ray.ingest import run_ingest

    return run_ingest(config)


@command("cluster", "Fit the multi-modal truncation centers (KMeans on mapped latents).",
         _flags("cluster", ("checkpoint", str), ("out", str), ("n-latents", int), ("clusters", int), ("seed", int),
                ("judge-resolution", int)))
def cluster(config: SDSGConfig) -> Any:
    from sdsg_ray.truncation.clusters import run_clustering

    return run_clustering(config)


@command("serve", "Serve the sampler over HTTP with Ray Serve.",
         _flags("serve", ("checkpoint", str), ("clusters", str), ("port", int), ("host", str)))
def serve(config: SDSGConfig) -> int:
    from serve_app.app import run_serve

    return run_serve(config)


@command("import", "Import a generator you already have (NVIDIA StyleGAN2 .pkl, without running its code; or an "
         "sdsg .safetensors) into a checkpoint directory every stage can use.",
         (Flag("source", "importer.source", str), Flag("--out", "importer.out", str)))
def import_generator(config: SDSGConfig) -> Any:
    from sdsg_ray.export import run_import

    return run_import(config)


@command("export", "Export a checkpoint's G_ema, E and w_avg without pickle (safetensors, model config as metadata).",
         _flags("export", ("checkpoint", str), ("format", str), ("out", str)))
def export(config: SDSGConfig) -> Any:
    from sdsg_ray.export import run_export

    return run_export(config)


@command("generate", "Write one PNG per seed and a grid (mean or multi-modal truncation), like NVIDIA's gen_images.py.",
         _flags("generate", ("checkpoint", str), ("seeds", str), ("psi", float), ("truncation", str),
                ("clusters", str), ("assign-by", str), ("out", str), ("batch-size", int)))
def generate(config: SDSGConfig) -> Any:
    from sdsg_ray.truncation.generate import run_generate

    return run_generate(config)


@command("evaluate", "FID/KID and the paper's comparisons (FID vs psi, filtered vs random vs raw).",
         _flags("evaluate", ("out", str), ("num-samples", int)))
def evaluate(config: SDSGConfig) -> Any:
    from sdsg_ray.evaluation.evaluate import run_evaluation

    return run_evaluation(config)


def serve_stage2(config: SDSGConfig) -> int:
    """Serve the pipeline's stage-2 generator with its clusters until Ctrl-C (``pipeline.serve``)."""
    from sdsg_ray.artifacts.layout import RunLayout

    stage2 = RunLayout(config.pipeline.root.rstrip("/")).stage2.uri
    return serve(config.model_copy(update={"serve": config.serve.model_copy(
        update={"checkpoint": stage2, "clusters": config.cluster.out})}))


@command("pipeline", "Run every stage in order, skipping those whose outputs exist.",
         _flags("pipeline", ("root", str)))
def pipeline(config: SDSGConfig) -> dict[str, Any]:
    from sdsg_ray.pipeline import run_pipeline

    summary = run_pipeline(config)
    if config.pipeline.serve:
        serve_stage2(config)
    return summary


@command("demo", "End-to-end demo on embedded defaults: dataset, pipeline, report, then the sampler.",
         (Flag("--out", "pipeline.root", str), Flag("--no-serve", "pipeline.serve", const=False)),
         defaults={f"{section}.{name}": value for section, values in DEMO_DEFAULTS.items()
                   for name, value in values.items()})
def demo(config: SDSGConfig) -> int:
    run_demo(config)
    return serve_stage2(config) if config.pipeline.serve else 0


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


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_args(args)
    except ConfigError as err:
        parser.exit(2, f"sdsg {args.command}: {err}\n")
    from sdsg_ray.artifacts.layout import with_layout_defaults  # imports torch: not for --help

    config = with_layout_defaults(config)
    if args.print_config:
        sys.stdout.write(describe_config(config))
        return 0
    try:
        result = COMMANDS[args.command].run(config)
    except KeyboardInterrupt:
        print(f"sdsg {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        known = user_error(err)
        if known is None or args.debug:
            raise
        print(f"sdsg {args.command}: error: {known}", file=sys.stderr)
        return 2 if isinstance(known, ConfigError) else 1
    if isinstance(result, (dict, list)):
        print(json.dumps(result, indent=2, default=str))
    elif isinstance(result, str):
        print(result)
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


if __name__ == "__main__":
    sys.exit(main())
