"""What the HTTP service accepts and how it says no.

Request bodies check their shape only (types, which fields go together, how many samples); the limits
of a sample (seed range, ψ range, truncation mode, cluster index) are checked in one place,
:meth:`sdsg_ray.truncation.modes.SampleSpec.check`, and its error is mapped here to a 4xx whose JSON names
the request field: ``{"detail": "psi: must be in [0, 1], got 1.5", "errors": [{"field": "psi", ...}]}``.
"""

# No `from __future__ import annotations` here: FastAPI resolves these models' annotations at runtime.
from typing import Literal

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from sdsg_ray.truncation.modes import AssignBy

ImageFormat = Literal["png", "npy"]
ASSIGNMENT_HELP = ("Rule picking the nearest center (modes toward cluster centers): lpips (the paper's), learned "
                   "(classifier fitted to it, cheaper) or w; default: the model's (GET /v1/model `assign_by`).")
DEFAULT_TRUNCATION = "multimodal"  # the paper's mode: what a request without `truncation` gets
TRUNCATION_HELP = ("A registered truncation mode, checked against the registry per request (GET /v1/model "
                   "`truncations` lists them and whether this model can draw each).")
BatchFormat = Literal["png", "grid", "npy"]
RETRY_AFTER_S = 1  # what a 503 asks clients to wait: about the time Serve needs to notice a dead replica


class ServiceUnavailable(Exception):
    """The sampler could not finish the request (its replica died or is restarting): 503, retry later."""


class FieldError(Exception):
    """Input that passed type checks but not the service's limits; becomes a 4xx naming ``field``."""

    def __init__(self, field: str, message: str, status_code: int = 422) -> None:
        super().__init__(f"{field}: {message}")
        self.field, self.message, self.status_code = field, message, status_code


class SamplesRequest(BaseModel):
    """POST /v1/samples: explicit ``seeds``, or ``count`` consecutive seeds starting at ``seed``."""

    model_config = ConfigDict(extra="forbid")

    seeds: list[int] | None = Field(None, description="Seeds, each in [0, 2^32-1].")
    count: int | None = Field(None, ge=1, description="With `seed`: draw seeds seed, seed+1, ...")
    seed: int | None = Field(None, description="First seed when `count` is given.")
    psi: float | None = Field(None, description="Truncation strength in [0, 1]; default from config.")
    truncation: str = Field(DEFAULT_TRUNCATION, description=TRUNCATION_HELP)
    cluster: int | None = Field(None, description="Force this center (modes toward cluster centers).")
    assignment: AssignBy | None = Field(None, description=ASSIGNMENT_HELP)
    format: BatchFormat = "png"

    @model_validator(mode="after")
    def _seeds_or_count(self) -> "SamplesRequest":
        if (self.seeds is None) == (self.count is None):
            raise ValueError("give either `seeds` or `count` (with `seed`), not both or neither")
        if self.count is not None and self.seed is None:
            raise ValueError("`count` needs `seed`, the first seed")
        return self

    def seed_list(self) -> list[int]:
        return list(self.seeds) if self.seeds is not None else list(range(self.seed, self.seed + self.count))

    def seed_field(self, index: int) -> str:
        """The request field that produced the index-th seed (``seeds.3``, or ``seed``/``count``)."""
        if self.seeds is not None:
            return f"seeds.{index}"
        return "seed" if index == 0 else "count"


def _field_name(loc: tuple) -> str:
    """FastAPI's ('query', 'psi') / ('body', 'seeds', 3) -> 'psi' / 'seeds.3'; a body that is not JSON -> 'body'."""
    parts = [str(p) for p in loc[1:]] if loc and loc[0] in ("query", "body", "path", "header") else list(map(str, loc))
    if loc and loc[0] == "body" and len(loc) == 2 and isinstance(loc[1], int):
        return "body"  # json_invalid reports the character offset, not a field
    return ".".join(parts) or "body"


def error_response(status_code: int, errors: list[dict[str, str]]) -> JSONResponse:
    detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
    return JSONResponse(status_code=status_code, content={"detail": detail, "errors": errors})


async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return error_response(422, [{"field": _field_name(tuple(e["loc"])), "message": e["msg"]} for e in exc.errors()])


async def on_field_error(request: Request, exc: FieldError) -> JSONResponse:
    return error_response(exc.status_code, [{"field": exc.field, "message": exc.message}])


async def on_unavailable(request: Request, exc: ServiceUnavailable) -> JSONResponse:
    response = error_response(503, [{"field": "service", "message": str(exc)}])
    response.headers["Retry-After"] = str(RETRY_AFTER_S)
    return response
