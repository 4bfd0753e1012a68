"""Ray Serve sampling service: a FastAPI ingress in front of an autoscaled, batched Sampler deployment.

  client --HTTP--> Ingress (validates, splits into <= max_batch_size chunks)
                   --handle--> SamplerDeployment.sample (per-item psi/mode/cluster)
                               --@serve.batch--> one forward pass for many concurrent requests

Every request is validated in the ingress; bad input gets a 4xx whose JSON names the field:
``{"detail": "psi: Input should be less than or equal to 1", "errors": [{"field": "psi", ...}]}``.

Multi-sample responses (POST /v1/samples): ``format=png`` -> JSON ``{"seeds": [...], "images": [base64 PNG,
...]}``; ``format=grid`` -> one PNG grid (row-major in seed order); ``format=npy`` -> one .npy uint8 [N, R, R, 3].

Deploy: ``sdsg serve --checkpoint URI --clusters URI`` (local Ray), or ``serve deploy serve_app/config.yaml``
/ KubeRay ``serveConfigV2`` with the YAML written by ``python -m serve_app.app --write-config FILE``
(``serve build`` in Ray 2.60 only accepts a built Application, not a builder with args).
"""

# No `from __future__ import annotations` here: Serve's ingress rebuilds the endpoint functions and FastAPI
# could then no longer resolve string annotations (a body model silently became a required query param).
import argparse
import asyncio
import base64
import io
import logging
import math
import time
from typing import Any, Literal

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray import serve
from ray.serve.deployment import Application
from ray.serve.handle import DeploymentHandle

from sdsg_ray.config import SDSGConfig, ServeConfig, load_config
from sdsg_ray.truncation.sampler import SEED_MAX, SampleSpec

log = logging.getLogger(__name__)

Truncation = Literal["none", "mean", "multimodal"]
APP_NAME = "sdsg"


# ----------------------------------------------------------------------------------------------
# Errors that name the field


class FieldError(Exception):
    """Input that passed type checks but not the service's limits; becomes a 4xx naming ``field``."""

    def __init__(self, field: str, message: str, status_code: int = 422) -> None:
        super().__init__(f"{field}: {message}")
        self.field, self.message, self.status_code = field, message, status_code


def _field_name(loc: tuple) -> str:
    """FastAPI's ('query', 'psi') / ('body', 'seeds', 3) -> 'psi' / 'seeds.3'; a body that is not JSON -> 'body'."""
    parts = [str(p) for p in loc[1:]] if loc and loc[0] in ("query", "body", "path", "header") else list(map(str, loc))
    if loc and loc[0] == "body" and len(loc) == 2 and isinstance(loc[1], int):
        return "body"  # json_invalid reports the character offset, not a field
    return ".".join(parts) or "body"


def _error_response(status_code: int, errors: list[dict[str, str]]) -> JSONResponse:
    detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
    return JSONResponse(status_code=status_code, content={"detail": detail, "errors": errors})


async def _on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return _error_response(422, [{"field": _field_name(tuple(e["loc"])), "message": e["msg"]} for e in exc.errors()])


async def _on_field_error(request: Request, exc: FieldError) -> JSONResponse:
    return _error_response(exc.status_code, [{"field": exc.field, "message": exc.message}])


# ----------------------------------------------------------------------------------------------
# Request bodies


class SamplesRequest(BaseModel):
    """POST /v1/samples: explicit ``seeds``, or ``count`` consecutive seeds starting at ``seed``."""

    model_config = ConfigDict(extra="forbid")

    seeds: list[int] | None = Field(None, description="Seeds, each in [0, 2^32-1].")
    count: int | None = Field(None, ge=1, description="With `seed`: draw seeds seed, seed+1, ...")
    seed: int | None = Field(None, ge=0, le=SEED_MAX, description="First seed when `count` is given.")
    psi: float | None = Field(None, ge=0.0, le=1.0, description="Truncation strength; default from config.")
    truncation: Truncation = "multimodal"
    cluster: int | None = Field(None, ge=0, description="Force this center (truncation=multimodal).")
    format: Literal["png", "grid", "npy"] = "png"

    @model_validator(mode="after")
    def _seeds_or_count(self) -> "SamplesRequest":
        if (self.seeds is None) == (self.count is None):
            raise ValueError("give either `seeds` or `count` (with `seed`), not both or neither")
        if self.count is not None and self.seed is None:
            raise ValueError("`count` needs `seed`, the first seed")
        return self

    def seed_list(self) -> list[int]:
        if self.seeds is not None:
            return list(self.seeds)
        return [self.seed + i for i in range(self.count)]


# ----------------------------------------------------------------------------------------------
# Encoding


def _png(image: np.ndarray) -> bytes:
    from sdsg_ray.imaging import encode_png

    return encode_png(image)


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _jsonable(meta: dict) -> dict:
    return {k: v if isinstance(v, (str, int, float, bool, type(None))) else str(v) for k, v in meta.items()}


# ----------------------------------------------------------------------------------------------
# Deployments


def _images_in(requests: list[list[SampleSpec]]) -> int:
    """@serve.batch counts images, not calls, so one batch is one bounded forward pass."""
    return sum(len(r) for r in requests)


@serve.deployment
class SamplerDeployment:
    """Holds G_ema, the centers and the metric; renders batches of specs in one forward pass."""

    def __init__(self, config: dict) -> None:
        import torch

        from sdsg_ray.storage import get_storage
        from sdsg_ray.truncation.sampler import load_sampler

        cfg = SDSGConfig.model_validate(config)
        s = cfg.serve
        device = "cuda" if torch.cuda.is_available() and s.num_gpus > 0 else "cpu"
        self.sampler = load_sampler(s.checkpoint, s.clusters or None, get_storage(cfg.storage), s.assign_by,
                                    device, batch_size=s.max_batch_size, assign_resolution=s.assign_resolution)
        bundle, clusters = self.sampler.bundle, self.sampler.clusters
        self.info_dict = {
            "resolution": self.sampler.resolution,
            "z_dim": int(bundle.G_ema.z_dim),
            "w_dim": int(bundle.G_ema.w_dim),
            "checkpoint": {"uri": s.checkpoint, "identity": bundle.identity, "meta": _jsonable(bundle.meta)},
            "metric": clusters.metric if clusters else None,
            "assign_by": s.assign_by,
            "assign_resolution": s.assign_resolution or self.sampler.resolution,
            "device": device,
            "pass_sizes": list(self.sampler.pass_sizes),  # forward-pass row counts verified bit-exact here
            "clusters": None if clusters is None else {
                "uri": s.clusters, "identity": clusters.identity, "count": clusters.count,
                "sizes": clusters.sizes.tolist(), "seed": clusters.seed,
            },
        }
        self._render_batch.set_max_batch_size(s.max_batch_size)
        self._render_batch.set_batch_wait_timeout_s(s.batch_wait_timeout_s)

    def info(self) -> dict[str, Any]:
        return self.info_dict

    def center_grid(self) -> bytes:
        return self.sampler.center_grid()

    async def sample(self, specs: list[SampleSpec]) -> np.ndarray:
        """uint8 [len(specs), R, R, 3]. Validated before batching so one bad call cannot fail its batch."""
        for spec in specs:
            self.sampler.validate(spec)
        return await self._render_batch(specs)

    @serve.batch(batch_size_fn=_images_in)
    async def _render_batch(self, requests: list[list[SampleSpec]]) -> list[np.ndarray]:
        flat = [spec for request in requests for spec in request]
        # Off the event loop: the replica keeps collecting the next batch while this one renders.
        images = await asyncio.to_thread(self.sampler.render_specs, flat)
        out, start = [], 0
        for request in requests:
            out.append(images[start:start + len(request)])
            start += len(request)
        return out


api = FastAPI(
    title="sdsg-ray sampler",
    description="Self-Distilled StyleGAN samples with multi-modal truncation (Mokady et al. 2022).",
    version="1",
)
api.add_exception_handler(RequestValidationError, _on_validation_error)
api.add_exception_handler(FieldError, _on_field_error)


@serve.deployment
@serve.ingress(api)
class Ingress:
    """HTTP front: validates input against the model's limits, fans out chunks, encodes the images."""

    def __init__(self, sampler: DeploymentHandle, max_samples_per_request: int, max_batch_size: int,
                 default_psi: float) -> None:
        self.sampler = sampler
        self.max_samples = max_samples_per_request
        self.chunk = max_batch_size
        self.default_psi = default_psi
        self._info: dict[str, Any] | None = None

    async def model_info(self) -> dict[str, Any]:
        if self._info is None:  # fetched once: the model behind a deployment never changes
            self._info = await self.sampler.info.remote()
        return self._info

    async def _specs(self, seeds: list[int], psi: float | None, truncation: str, cluster: int | None) -> list[SampleSpec]:
        info = await self.model_info()
        for i, seed in enumerate(seeds):
            if not 0 <= seed <= SEED_MAX:
                raise FieldError(f"seeds.{i}", f"seed must be in [0, {SEED_MAX}], got {seed}")
        clusters = info["clusters"]
        if truncation == "multimodal" and clusters is None:
            raise FieldError("truncation", "no clusters loaded; use 'mean' or 'none'")
        if cluster is not None:
            if truncation != "multimodal":
                raise FieldError("cluster", "a cluster can only be forced with truncation=multimodal")
            if cluster >= clusters["count"]:
                raise FieldError("cluster", f"must be in [0, {clusters['count'] - 1}], got {cluster}")
        psi = self.default_psi if psi is None else psi
        return [SampleSpec(seed, psi, truncation, cluster) for seed in seeds]

    async def _render(self, specs: list[SampleSpec]) -> np.ndarray:
        chunks = [specs[i:i + self.chunk] for i in range(0, len(specs), self.chunk)]
        parts = await asyncio.gather(*(self.sampler.sample.remote(c) for c in chunks))
        return np.concatenate(parts)

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/v1/model")
    async def model(self) -> dict[str, Any]:
        """Resolution, checkpoint identity, metric, w_dim and the clusters' identity."""
        return await self.model_info()

    @api.get("/v1/clusters")
    async def clusters(self) -> dict[str, Any]:
        clusters = (await self.model_info())["clusters"]
        if clusters is None:
            raise FieldError("clusters", "no clusters loaded", status_code=404)
        return {"count": clusters["count"], "sizes": clusters["sizes"], "identity": clusters["identity"]}

    @api.get("/v1/clusters/grid.png", response_class=Response)
    async def clusters_grid(self) -> Response:
        if (await self.model_info())["clusters"] is None:
            raise FieldError("clusters", "no clusters loaded", status_code=404)
        return Response(await self.sampler.center_grid.remote(), media_type="image/png")

    @api.get("/v1/sample", response_class=Response)
    async def sample(
        self,
        seed: int = Query(..., ge=0, le=SEED_MAX, description="Random seed of z."),
        psi: float | None = Query(None, ge=0.0, le=1.0, description="Truncation strength (1 = none)."),
        truncation: Truncation = Query("multimodal"),
        cluster: int | None = Query(None, ge=0, description="Force this center (multimodal)."),
        format: Literal["png", "npy"] = Query("png"),
    ) -> Response:
        """One image: PNG, or a .npy uint8 [R, R, 3]."""
        images = await self._render(await self._specs([seed], psi, truncation, cluster))
        if format == "npy":
            return Response(_npy(images[0]), media_type="application/octet-stream")
        return Response(_png(images[0]), media_type="image/png")

    @api.post("/v1/samples")
    async def samples(self, spec: SamplesRequest) -> Response:
        """Many images; see the module docstring for the three formats."""
        seeds = spec.seed_list()
        if len(seeds) > self.max_samples:
            raise FieldError("seeds" if spec.seeds is not None else "count",
                             f"at most {self.max_samples} samples per request, got {len(seeds)}")
        if spec.count is not None and seeds[-1] > SEED_MAX:
            raise FieldError("count", f"seed + count - 1 must be <= {SEED_MAX}")
        if not seeds:
            raise FieldError("seeds", "give at least one seed")
        images = await self._render(await self._specs(seeds, spec.psi, spec.truncation, spec.cluster))
        if spec.format == "npy":
            return Response(_npy(images), media_type="application/octet-stream")
        if spec.format == "grid":
            from sdsg_ray.imaging import image_grid

            return Response(_png(image_grid(images, ncols=math.ceil(math.sqrt(len(images))))),
                            media_type="image/png")
        return JSONResponse({"seeds": seeds, "images": [base64.b64encode(_png(im)).decode() for im in images]})


# ----------------------------------------------------------------------------------------------
# Building, running, config generation


def autoscaling_config(s: ServeConfig) -> dict[str, Any]:
    config: dict[str, Any] = {
        "min_replicas": s.min_replicas,
        "max_replicas": s.max_replicas,
        "target_ongoing_requests": s.target_ongoing_requests,
        "upscale_delay_s": s.upscale_delay_s,
        "downscale_delay_s": s.downscale_delay_s,
        "look_back_period_s": s.look_back_period_s,
    }
    if s.metrics_interval_s != 10.0:  # Ray's default; setting it at all draws a deprecation warning
        config["metrics_interval_s"] = s.metrics_interval_s
    return config


def build_app(config: SDSGConfig, forward_env: bool = False) -> Application:
    """The application graph for a config; constructing it touches no storage (that happens in replicas).

    ``forward_env`` passes this process's storage endpoint/credentials to the replicas (local runs only:
    a deploy config must never carry credentials; clusters provide their own)."""
    from sdsg_ray.ray_utils import worker_env

    s = config.serve
    actor_options: dict[str, Any] = {"num_cpus": s.num_cpus, "num_gpus": s.num_gpus}
    env = worker_env(config.storage) if forward_env else {}
    if env:
        actor_options["runtime_env"] = {"env_vars": env}
    sampler = SamplerDeployment.options(
        autoscaling_config=autoscaling_config(s),
        max_ongoing_requests=s.max_ongoing_requests,
        ray_actor_options=actor_options,
    ).bind(config.model_dump(mode="json"))
    # The ingress only awaits the sampler; with Serve's default of 5 in flight per replica it would cap
    # every @serve.batch at 5 requests (measured: batching then ran at 0.44x of batching off).
    ingress = Ingress.options(
        max_ongoing_requests=s.max_ongoing_requests, ray_actor_options={"num_cpus": s.ingress_num_cpus}
    )
    return ingress.bind(sampler, s.max_samples_per_request, s.max_batch_size, s.default_psi)


def app_builder(args: dict[str, Any]) -> Application:
    """Serve's application builder. ``args``: ``config`` (a YAML path) and/or config fields, either
    dotted (``storage.endpoint_url``) or bare serve fields (``checkpoint``, ``max_replicas``...)."""
    args = dict(args or {})
    path = args.pop("config", None)
    overrides = {k if "." in k else f"serve.{k}": v for k, v in args.items()}
    return build_app(load_config(path, overrides))


def serve_config_yaml(args: dict[str, Any]) -> str:
    """What ``serve deploy`` and KubeRay's ``serveConfigV2`` take, for ``app_builder`` with ``args``."""
    import yaml
    from ray.serve._private.build_app import build_app as build_deployments
    from ray.serve.deployment import deployment_to_schema
    from ray.serve.schema import ServeApplicationSchema, ServeDeploySchema

    config = load_config(args.get("config"), {k if "." in k else f"serve.{k}": v
                                              for k, v in args.items() if k != "config"})
    built = build_deployments(app_builder(args), name=APP_NAME)
    application = ServeApplicationSchema(
        name=APP_NAME, route_prefix=config.serve.route_prefix, import_path="serve_app.app:app_builder",
        runtime_env={}, args=args, deployments=[deployment_to_schema(d) for d in built.deployments],
    ).model_dump(exclude_unset=True)
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
    from sdsg_ray.checkpoint import inference_uri
    from sdsg_ray.storage import get_storage
    from sdsg_ray.truncation.clusters import clusters_uri

    storage = get_storage(config.storage)
    s = config.serve
    ckpt = inference_uri(s.checkpoint)
    if not storage.exists(ckpt):
        raise SystemExit(f"sdsg serve: no checkpoint at {ckpt}; train one with `sdsg train --out ...`")
    if s.clusters and not storage.exists(clusters_uri(s.clusters)):
        raise SystemExit(
            f"sdsg serve: no clusters at {clusters_uri(s.clusters)}; make them with\n"
            f"  sdsg cluster --checkpoint {s.checkpoint} --out {s.clusters}"
        )


def start_app(config: SDSGConfig) -> str:
    """Deploy on the current (or a new local) Ray cluster without blocking; returns the base URL."""
    from sdsg_ray.ray_utils import ensure_ray

    _check_inputs(config)
    ensure_ray(config.storage)
    s = config.serve
    serve.start(http_options={"host": s.host, "port": s.port})
    serve.run(build_app(config, forward_env=True), name=APP_NAME, route_prefix=s.route_prefix)
    host = "127.0.0.1" if s.host in ("0.0.0.0", "::") else s.host
    return f"http://{host}:{s.port}{s.route_prefix.rstrip('/')}"


def run_serve(config: SDSGConfig, args=None) -> int:
    """``sdsg serve``: start the app on Ray, print how to call it, block until Ctrl-C."""
    base = start_app(config)
    print(f"sampler ready at {base}  (OpenAPI: {base}/docs)")
    print(f"  curl -o sample.png '{base}/v1/sample?seed=1&psi=0.7&truncation=multimodal'")
    print(f"  curl -X POST {base}/v1/samples -H 'content-type: application/json' "
          "-d '{\"count\": 8, \"seed\": 0, \"psi\": 0.5, \"format\": \"grid\"}' -o grid.png")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("shutting down")
    finally:
        serve.shutdown()
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description="Write the Serve deploy config for this application.")
    parser.add_argument("--write-config", required=True, metavar="FILE")
    parser.add_argument("--arg", action="append", default=[], metavar="KEY=VALUE",
                        help="app_builder argument, e.g. checkpoint=s3://bucket/stage2; repeatable.")
    ns = parser.parse_args()
    import yaml

    args = {k: yaml.safe_load(v) for k, v in (a.split("=", 1) for a in ns.arg)}
    with open(ns.write_config, "w") as f:
        f.write(serve_config_yaml(args))
    print(ns.write_config)


if __name__ == "__main__":
    main()
