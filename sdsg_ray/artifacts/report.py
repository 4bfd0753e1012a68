"""The HTML report of a pipeline run (`sdsg demo` writes it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from sdsg_ray.storage import Storage, join


@dataclass(frozen=True)
class Report:
    """A report directory: index.html, linking the figures where they lie."""

    uri: str
    INDEX_FILE: ClassVar[str] = "index.html"

    @property
    def index(self) -> str:
        return join(self.uri, self.INDEX_FILE)

    def write(self, html: str, storage: Storage) -> str:
        storage.write_text(self.index, html)
        return self.index
