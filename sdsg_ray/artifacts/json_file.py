"""Reading and writing the JSON artifacts (summaries, reports, results, markers): one place for the encoding."""

from __future__ import annotations

import json
from typing import Any

from sdsg_ray.storage import ObjectNotFound, Storage


def read_json(uri: str, storage: Storage, missing: str | None = None) -> Any:
    """The decoded file; ``missing`` (a hint naming the command that writes it) turns a missing file into
    an :class:`ObjectNotFound` that says so."""
    try:
        return json.loads(storage.read_text(uri))
    except ObjectNotFound:
        if missing is None:
            raise
        raise ObjectNotFound(f"{uri}: not found; {missing}") from None


def read_json_or_none(uri: str, storage: Storage) -> Any | None:
    return json.loads(storage.read_text(uri)) if storage.exists(uri) else None


def write_json(uri: str, value: Any, storage: Storage) -> str:
    storage.write_text(uri, json.dumps(value, indent=2))
    return uri
