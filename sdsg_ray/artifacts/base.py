"""What every artifact handle is: a URI and the named members (files, directories, other handles) under it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from sdsg_ray.storage import join


class Member:
    """A file or directory inside an artifact: on the class, the member itself (``FilteredSet.kept.name`` is
    ``"kept.parquet"``); on a handle, its URI (``FilteredSet(uri).kept``), or the handle ``kind`` makes of it."""

    def __init__(self, name: str, doc: str, kind: Callable[[str], Any] | None = None) -> None:
        self.name, self.doc, self.kind = name, doc, kind

    def __get__(self, handle: "Artifact | None", owner: type) -> Any:
        if handle is None:
            return self
        uri = join(handle.uri, self.name)
        return uri if self.kind is None else self.kind(uri)


@dataclass(frozen=True)
class Artifact:
    """A stage's output directory (or a file standing for it), typed by what it holds."""

    uri: str

    @classmethod
    def members(cls) -> dict[str, Member]:
        """Attribute name -> member, for the architecture table and the tests that check it."""
        return {attr: value for klass in reversed(cls.__mro__) for attr, value in vars(klass).items()
                if isinstance(value, Member)}
