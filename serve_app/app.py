"""Building, deploying and running the sampling application (deployments: serve_app.deployments).

Deploy: ``sdsg serve --checkpoint URI --clusters URI`` (local Ray), or ``serve deploy serve_app/config.yaml``
/ KubeRay ``serveConfigV2`` with the YAML written by ``python -m serve_app.app --write-config FILE``: an
application builder (``serve_app.app:app_builder``) with the checkpoint and clusters as ``args``, and
each deployment's options from the same :func:`deployment_options` that :func:`build_app` applies. The
module-level ``app`` is the default-config application, so ``serve build serve_app.app:app`` works too
(a test checks that its deployment options equal ours).
"""

from __future__ import annotations

import argparse
import logging
import time
from typing import Any

import yaml
from ray import serve
from ray.serve import Application
from ray.serve.schema import ServeDeploySchema

from sdsg_ray.artifacts.checkpoint import inference_uri
from sdsg_ray.artifacts.clusters import ClusterFile
from sdsg_ray.artifacts.layout import with_layout_defaults
from sdsg_ray.config import SDSGConfig, ServeConfig, load_config
from sdsg_ray.ray_utils import ensure_ray, worker_env
from sdsg_ray.storage import ObjectNotFound, get_storage

from .deployments import Ingress, SamplerDeployment

log = logging.getLogger(__name__)

APP_NAME = "sdsg"
BUILDER_IMPORT_PATH = "serve_app.app:app_builder"


def autoscaling_config(s: ServeConfig) -> dict[str, Any]:
    config: dict[str, Any] = {
        "min_replicas": s.min_replicas,
        "max_replicas": s.max_replicas,
        "target_ongoing_requests": s.target_ongoing_requests,
        "upscale_delay_s": s.upscale_delay_s,
        "downscale_delay_s": s.downscale_delay_s,
        "look_back_period_s": s.look_back_period_s,
    }
    if s.metrics_interval_s != ServeConfig.model_fields["metrics_interval_s"].default:
        config["metrics_interval_s"] = s.metrics_interval_s  # Ray warns whenever it is set at all
    return config


def deployment_options(s: ServeConfig) -> dict[str, dict[str, Any]]:
    """Each deployment's Serve options: what build_app applies and what the deploy YAML states.

    The ingress only awaits the sampler; with Serve's default of 5 requests in flight per replica it
    would cap every @serve.batch at 5, so it gets the sampler's ``max_ongoing_requests``.
    """
    return {
        SamplerDeployment.name: {
            "max_ongoing_requests": s.max_ongoing_requests,
            "autoscaling_config": autoscaling_config(s),
            "ray_actor_options": {"num_cpus": s.num_cpus, "num_gpus": s.num_gpus},
        },
        Ingress.name: {
            "max_ongoing_requests": s.max_ongoing_requests,
            "ray_actor_options": {"num_cpus": s.ingress_num_cpus},
        },
    }


def build_app(config: SDSGConfig, forward_env: bool = False) -> Application:
    """The application graph for a config; constructing it touches no storage (that happens in replicas).

    ``forward_env`` passes this process's storage endpoint/credentials to the replicas (local runs only:
    a deploy config must never carry credentials; clusters provide their own)."""
    s = config.serve
    options = deployment_options(s)
    env = worker_env(config.storage) if forward_env else {}
    if env:
        options[SamplerDeployment.name]["ray_actor_options"]["runtime_env"] = {"env_vars": env}
    sampler = SamplerDeployment.options(**options[SamplerDeployment.name]).bind(config.model_dump(mode="json"))
    ingress = Ingress.options(**options[Ingress.name])
    return ingress.bind(sampler, s.max_samples_per_request, s.max_batch_size, s.default_psi)


def _config_from_args(args: dict[str, Any]) -> SDSGConfig:
    """Builder ``args``: ``config`` (a YAML path) and/or config fields, dotted (``storage.endpoint_url``)
    or bare serve fields (``checkpoint``, ``max_replicas``...)."""
    args = dict(args or {})
    path = args.pop("config", None)
    return with_layout_defaults(load_config(path, {k if "." in k else f"serve.{k}": v for k, v in args.items()}))


def app_builder(args: dict[str, Any]) -> Application:
    """Serve's application builder (``import_path: serve_app.app:app_builder`` with ``args``)."""
    return build_app(_config_from_args(args))


app = build_app(with_layout_defaults(load_config()))  # the default-config application, for `serve build serve_app.app:app`


def serve_config_yaml(args: dict[str, Any]) -> str:
    """What ``serve deploy`` and KubeRay's ``serveConfigV2`` take, for :func:`app_builder` with ``args``,
    validated by Serve's own deploy schema."""
    config = _config_from_args(args)
    application = {
        "name": APP_NAME,
        "route_prefix": config.serve.route_prefix,
        "import_path": BUILDER_IMPORT_PATH,
        "runtime_env": {},
        "deployments": [{"name": name, **opts} for name, opts in deployment_options(config.serve).items()],
        "args": args,
    }
    deploy = {
        "proxy_location": "EveryNode",
        "http_options": {"host": "0.0.0.0", "port": config.serve.port},
        "applications": [application],
    }
    ServeDeploySchema.model_validate(deploy)
    header = "# Generated by `python -m serve_app.app --write-config`; deploy with `serve deploy` or KubeRay serveConfigV2.\n"
    return header + yaml.safe_dump(deploy, sort_keys=False)


def _check_inputs(config: SDSGConfig) -> None:
    """Fail before starting Ray if the checkpoint or clusters are missing, saying how to make them."""
    storage = get_storage(config.storage)
    s = config.serve
    ckpt = inference_uri(s.checkpoint)
    if not storage.exists(ckpt):
        raise ObjectNotFound(f"{ckpt}: no checkpoint; train one with `sdsg train --out ...`")
    clusters = ClusterFile(s.clusters).file if s.clusters else None
    if clusters and not storage.exists(clusters):
        raise ObjectNotFound(f"{clusters}: no clusters; make them with "
                             f"`sdsg cluster --checkpoint {s.checkpoint} --out {s.clusters}`")


def start_app(config: SDSGConfig) -> str:
    """Deploy on the current (or a new local) Ray cluster without blocking; returns the base URL."""
    _check_inputs(config)
    ensure_ray(config.storage)
    s = config.serve
    serve.start(http_options={"host": s.host, "port": s.port})
    serve.run(build_app(config, forward_env=True), name=APP_NAME, route_prefix=s.route_prefix)
    host = "127.0.0.1" if s.host in ("0.0.0.0", "::") else s.host
    return f"http://{host}:{s.port}{s.route_prefix.rstrip('/')}"


def run_serve(config: SDSGConfig) -> int:
    """``sdsg serve``: start the app on Ray, say how to call it, block until Ctrl-C."""
    base = start_app(config)
    log.info("sampler ready at %s  (OpenAPI: %s/docs)\n  curl -o sample.png '%s/v1/sample?seed=1&psi=0.7'"
             "\n  curl -X POST %s/v1/samples -H 'content-type: application/json' "
             "-d '{\"count\": 8, \"seed\": 0, \"psi\": 0.5, \"format\": \"grid\"}' -o grid.png", base, base, base, base)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        log.info("shutting down")
    finally:
        serve.shutdown()
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description="Write the Serve deploy config for this application.")
    parser.add_argument("--write-config", required=True, metavar="FILE")
    parser.add_argument("--arg", action="append", default=[], metavar="KEY=VALUE",
                        help="app_builder argument, e.g. checkpoint=s3://bucket/stage2; repeatable.")
    ns = parser.parse_args()
    args = {k: yaml.safe_load(v) for k, v in (a.split("=", 1) for a in ns.arg)}
    with open(ns.write_config, "w") as f:
        f.write(serve_config_yaml(args))
    print(ns.write_config)


if __name__ == "__main__":
    main()
