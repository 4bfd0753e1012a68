"""One registry per extension axis (truncation modes, perceptual metrics, object stores, shard formats).

Each entry carries all of its behaviour, so adding one (a new truncation mode, a ``gs://`` store) is one
class in one file plus one ``register`` call; everything that iterates the axis (the config's choices, the
HTTP schema, the figures) reads the registry instead of a list of its own.
"""

from __future__ import annotations

from typing import Generic, Iterator, TypeVar

from sdsg_ray.errors import UserError

Entry = TypeVar("Entry")


class UnknownEntry(UserError, KeyError):
    """A name no entry of the registry has; the message lists the names that exist."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class Registry(Generic[Entry]):
    """Entries by name, in registration order (which is the order choices are shown in)."""

    def __init__(self, axis: str) -> None:
        self.axis = axis
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, entry: Entry) -> Entry:
        """Add ``entry`` under ``name``; a second entry with a name already taken is refused."""
        if name in self._entries:
            raise ValueError(f"{self.axis} {name!r} is registered already")
        self._entries[name] = entry
        return entry

    def unregister(self, name: str) -> None:
        del self._entries[name]

    def __getitem__(self, name: str) -> Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownEntry(f"unknown {self.axis} {name!r}; choose one of: {', '.join(self._entries)}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def items(self) -> list[tuple[str, Entry]]:
        return list(self._entries.items())
