"""The two Serve deployments: a FastAPI ingress in front of an autoscaled, batched Sampler.

  client --HTTP--> Ingress (validates, splits into <= max_batch_size chunks, encodes the images)
                   --handle--> SamplerDeployment.sample (per-item psi/mode/cluster)
                               --@serve.batch--> one forward pass for many concurrent requests

Multi-sample responses (POST /v1/samples): ``format=png`` -> JSON ``{"seeds": [...], "images": [base64 PNG,
...], "clusters": [center index or null, ...]}``; ``format=grid`` -> one PNG grid (row-major in seed order);
``format=npy`` -> one .npy uint8 [N, R, R, 3].
``GET /`` is the sampler page (serve_app/static/index.html), a client of these same endpoints.
"""

# No `from __future__ import annotations` here: Serve's ingress rebuilds the endpoint functions and FastAPI
# could then no longer resolve string annotations (a body model silently became a required query param).
import asyncio
import base64
import io
from importlib import resources
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, Query
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from sdsg_ray.config import SDSGConfig
from sdsg_ray.imaging import encode_png, square_grid
from sdsg_ray.storage import get_storage
from sdsg_ray.truncation.modes import NO_CENTER, TRUNCATION_MODES, AssignBy, InvalidSample, SampleSpec
from sdsg_ray.truncation.sampler import load_sampler

from .schemas import (ASSIGNMENT_HELP, DEFAULT_TRUNCATION, TRUNCATION_HELP, FieldError, ImageFormat, SamplesRequest,
                      ServiceUnavailable, on_field_error, on_unavailable, on_validation_error)


# Plain HTML + JS calling this API with relative URLs (so it works under any route prefix), no CDN: offline.
SAMPLER_PAGE = resources.files(__package__).joinpath("static", "index.html").read_text(encoding="utf-8")


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _jsonable(meta: dict) -> dict:
    return {k: v if isinstance(v, (str, int, float, bool, type(None))) else str(v) for k, v in meta.items()}


def _images_in(requests: list[list[SampleSpec]]) -> int:
    """@serve.batch counts images, not calls, so one batch is one bounded forward pass."""
    return sum(len(r) for r in requests)


@serve.deployment
class SamplerDeployment:
    """Holds G_ema, the centers and the metric; renders batches of specs in one forward pass."""

    def __init__(self, config: dict) -> None:
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
            "assign_by": self.sampler.assign_by if clusters else None,  # the default rule, 'auto' resolved
            "assignments": list(self.sampler.assignments),  # the rules a request may pick instead
            "assignment_quality": clusters.assignment_quality if clusters else {},
            "assign_resolution": s.assign_resolution or self.sampler.resolution,
            "device": device,
            "pass_sizes": list(self.sampler.pass_sizes),  # forward-pass row counts verified bit-exact here
            # every registered mode, whether this model can draw it, and whether it takes a cluster/assignment
            "truncations": [{"name": name, "label": mode.label, "available": mode.available(self.sampler),
                             "clusters": mode.uses_clusters} for name, mode in TRUNCATION_MODES.items()],
            "default_truncation": DEFAULT_TRUNCATION,
            "clusters": None if clusters is None else {
                "uri": s.clusters, "identity": clusters.identity, "count": clusters.count,
                "sizes": clusters.sizes.tolist(), "seed": clusters.seed},
        }
        self._render_batch.set_max_batch_size(s.max_batch_size)
        self._render_batch.set_batch_wait_timeout_s(s.batch_wait_timeout_s)

    def info(self) -> dict[str, Any]:
        return self.info_dict

    def center_grid(self) -> bytes:
        return self.sampler.center_grid()

    async def sample(self, specs: list[SampleSpec]) -> tuple[np.ndarray, np.ndarray]:
        """uint8 [len(specs), R, R, 3] and each image's center (Sampler.render_with_centers). Validated
        before batching so one bad call cannot fail its batch."""
        for spec in specs:
            self.sampler.validate(spec)
        return await self._render_batch(specs)

    @serve.batch(batch_size_fn=_images_in)
    async def _render_batch(self, requests: list[list[SampleSpec]]) -> list[tuple[np.ndarray, np.ndarray]]:
        flat = [spec for request in requests for spec in request]
        # Off the event loop: the replica keeps collecting the next batch while this one renders.
        images, centers = await asyncio.to_thread(self.sampler.render_with_centers, flat)
        bounds = np.cumsum([len(request) for request in requests])[:-1]
        return list(zip(np.split(images, bounds), np.split(centers, bounds)))


api = FastAPI(title="sdsg-ray sampler", version="1",
              description="Self-Distilled StyleGAN samples with multi-modal truncation (Mokady et al. 2022).",
              exception_handlers={RequestValidationError: on_validation_error, FieldError: on_field_error,
                                  ServiceUnavailable: on_unavailable})


@serve.deployment
@serve.ingress(api)
class Ingress:
    """HTTP front: checks each sample against the model (SampleSpec.check), fans out chunks, encodes."""

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

    async def _specs(self, seeds: list[int], psi: float | None, truncation: str, cluster: int | None,
                     seed_field=lambda i: "seed", assignment: str | None = None) -> list[SampleSpec]:
        """SampleSpecs checked against the loaded model; an InvalidSample names the request field."""
        info = await self.model_info()
        psi = self.default_psi if psi is None else psi
        specs = [SampleSpec(seed, psi, truncation, cluster, assignment) for seed in seeds]
        for i, spec in enumerate(specs):
            try:
                spec.check(info["clusters"]["count"] if info["clusters"] else 0, info["assignments"])
            except InvalidSample as err:
                raise FieldError(seed_field(i) if err.field == "seed" else err.field, err.message) from None
        return specs

    async def _render(self, specs: list[SampleSpec]) -> tuple[np.ndarray, np.ndarray]:
        """The images and their centers, or ServiceUnavailable (503) when the sampler replica died with the
        request in flight (Serve restarts it; the client retries): never a 500, never a hung connection."""
        chunks = [specs[i:i + self.chunk] for i in range(0, len(specs), self.chunk)]
        try:
            parts = await asyncio.gather(*(self.sampler.sample.remote(c) for c in chunks))
        except (RayActorError, DeploymentUnavailableError) as err:
            raise ServiceUnavailable(f"the sampler replica is restarting ({type(err).__name__}); retry") from None
        return np.concatenate([images for images, _ in parts]), np.concatenate([centers for _, centers in parts])

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page(self) -> HTMLResponse:
        """The sampler page (serve_app/static/index.html): controls, model card, a grid of samples."""
        return HTMLResponse(SAMPLER_PAGE)

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/v1/model")
    async def model(self) -> dict[str, Any]:
        """Resolution, checkpoint identity, metric, w_dim, the clusters' identity, and the psi a request
        without one gets (the sampler page starts there)."""
        return {**await self.model_info(), "default_psi": self.default_psi}

    @api.get("/v1/clusters")
    async def clusters(self) -> dict[str, Any]:
        clusters = (await self.model_info())["clusters"]
        if clusters is None:
            raise FieldError("clusters", "no clusters loaded", status_code=404)
        return {"count": clusters["count"], "sizes": clusters["sizes"], "identity": clusters["identity"]}

    @api.get("/v1/clusters/grid.png", response_class=Response)
    async def clusters_grid(self) -> Response:
        await self.clusters()  # the same 404 without clusters
        return Response(await self.sampler.center_grid.remote(), media_type="image/png")

    @api.get("/v1/sample", response_class=Response)
    async def sample(
        self,
        seed: int = Query(..., description="Random seed of z, in [0, 2^32-1]."),
        psi: float | None = Query(None, description="Truncation strength in [0, 1] (1 = none)."),
        truncation: str = Query(DEFAULT_TRUNCATION, description=TRUNCATION_HELP),
        cluster: int | None = Query(None, description="Force this center (modes toward cluster centers)."),
        format: ImageFormat = Query("png"),
        assignment: AssignBy | None = Query(None, description=ASSIGNMENT_HELP),
    ) -> Response:
        """One image: PNG, or a .npy uint8 [R, R, 3]."""
        images, _ = await self._render(await self._specs([seed], psi, truncation, cluster, assignment=assignment))
        if format == "npy":
            return Response(_npy(images[0]), media_type="application/octet-stream")
        return Response(encode_png(images[0]), media_type="image/png")

    @api.post("/v1/samples")
    async def samples(self, spec: SamplesRequest) -> Response:
        """Many images; see the module docstring for the three formats."""
        seeds = spec.seed_list()
        if len(seeds) > self.max_samples:
            raise FieldError("seeds" if spec.seeds is not None else "count",
                             f"at most {self.max_samples} samples per request, got {len(seeds)}")
        if not seeds:
            raise FieldError("seeds", "give at least one seed")
        specs = await self._specs(seeds, spec.psi, spec.truncation, spec.cluster, spec.seed_field, spec.assignment)
        images, centers = await self._render(specs)
        if spec.format == "npy":
            return Response(_npy(images), media_type="application/octet-stream")
        if spec.format == "grid":
            return Response(encode_png(square_grid(images)), media_type="image/png")
        return JSONResponse({"seeds": seeds, "images": [base64.b64encode(encode_png(im)).decode() for im in images],
                             # the center each image was truncated toward (null where its mode has none)
                             "clusters": [None if c == NO_CENTER else int(c) for c in centers]})
