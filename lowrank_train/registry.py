"""Name -> class registries for the plug points, with close-match suggestions."""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


def suggest(word: str, choices: list[str]) -> str:
    """' (did you mean X?)' for the closest choice, or '' when nothing is close."""
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


class UnknownName(KeyError):
    """Raised by `Registry.get`; the config layer turns it into a ConfigError naming the key."""

    def __init__(self, kind: str, name: str, known: list[str]):
        self.message = (
            f"unknown {kind} {name!r}; registered: {', '.join(known)}{suggest(name, known)}"
        )
        super().__init__(self.message)

    def __str__(self) -> str:
        return self.message


class Registry(Generic[T]):
    """A named set of classes. Each class carries its registry key as `cls.name`."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, type[T]] = {}

    def register(self, cls: type[T]) -> type[T]:
        """Class decorator; refuses a second class under the same name."""
        name = cls.name  # type: ignore[attr-defined]
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._entries[name] = cls
        return cls

    def get(self, name: str) -> type[T]:
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownName(self.kind, name, self.names()) from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[type[T]]:
        return iter(self._entries[n] for n in self.names())
