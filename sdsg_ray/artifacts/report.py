"""The HTML report of a pipeline run (`sdsg demo` writes it)."""

from __future__ import annotations

from dataclasses import dataclass

from sdsg_ray.artifacts.base import Artifact, Member
from sdsg_ray.storage import Storage


@dataclass(frozen=True)
class Report(Artifact):
    """A report directory; the page links the figures where the stages left them."""

    index = Member("index.html", "the report page")

    def write(self, html: str, storage: Storage) -> str:
        storage.write_text(self.index, html)
        return self.index
