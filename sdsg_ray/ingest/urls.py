"""URL lists in the forms users have them: a text file (one URL per line), a CSV or parquet with a
``url`` column (img2dataset's input), or the paper's JSON list of ``{"image_name", "bounding_box"}``."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass

import pyarrow.parquet as pq

from sdsg_ray.errors import InvalidRequest
from sdsg_ray.storage import Storage

URL_COLUMNS = ("url", "URL", "image_name", "image_url")


@dataclass(frozen=True)
class UrlItem:
    url: str
    box: tuple[int, int, int, int] | None = None  # the paper's order: y0, y1, x0, x1


def _box(value) -> tuple[int, int, int, int] | None:
    if value is None or value == "":
        return None
    if isinstance(value, str):
        value = json.loads(value)
    if len(value) != 4:
        raise InvalidRequest(f"bounding_box must be [y0, y1, x0, x1], got {value!r}")
    return tuple(int(v) for v in value)  # type: ignore[return-value]


def _column(names: list[str], uri: str) -> str:
    for name in URL_COLUMNS:
        if name in names:
            return name
    raise InvalidRequest(f"{uri}: no url column (looked for {', '.join(URL_COLUMNS)}; columns: {names})")


def read_url_list(uri: str, storage: Storage) -> list[UrlItem]:
    """Every entry of the list, in order (its position is the sample's index and key)."""
    lower = uri.lower()
    if lower.endswith(".parquet"):
        with storage.open_read(uri) as f:
            table = pq.read_table(f)
        col = _column(table.column_names, uri)
        boxes = table.column("bounding_box").to_pylist() if "bounding_box" in table.column_names else None
        return [UrlItem(str(u), _box(boxes[i]) if boxes else None) for i, u in enumerate(table.column(col).to_pylist())]
    text = storage.read_text(uri)
    if lower.endswith(".json"):
        try:
            entries = json.loads(text)
        except json.JSONDecodeError as err:
            raise InvalidRequest(f"{uri}: not valid JSON: {err}") from None
        if not isinstance(entries, list):
            raise InvalidRequest(f"{uri}: expected a JSON list of {{image_name, bounding_box}} objects")
        items = []
        for entry in entries:
            if isinstance(entry, str):
                items.append(UrlItem(entry))
                continue
            url = next((entry[c] for c in URL_COLUMNS if c in entry), None)
            if url is None:
                raise InvalidRequest(f"{uri}: entry without image_name/url: {entry!r}")
            items.append(UrlItem(str(url), _box(entry.get("bounding_box"))))
        return items
    if lower.endswith((".csv", ".tsv")):
        reader = csv.DictReader(io.StringIO(text), delimiter="\t" if lower.endswith(".tsv") else ",")
        col = _column(list(reader.fieldnames or []), uri)
        return [UrlItem(row[col].strip(), _box(row.get("bounding_box"))) for row in reader if row[col].strip()]
    return [UrlItem(line.strip()) for line in text.splitlines() if line.strip() and not line.startswith("#")]
