"""Name -> class registries for the pluggable parts (recompute selectors, KV compression policies)."""

from __future__ import annotations

from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(dict[str, type[T]], Generic[T]):
    """Classes by their ``name`` attribute; unknown names and bad options get errors that list the choices."""

    def __init__(self, kind: str, plural: str) -> None:
        super().__init__()
        self.kind, self.plural = kind, plural

    def register(self, cls: type[T]) -> type[T]:
        self[cls.name] = cls  # type: ignore[attr-defined]
        return cls

    def validate(self, name: str) -> str:
        """``name`` if registered; else ValueError listing the known names."""
        if name not in self:
            raise ValueError(f"unknown {self.kind} {name!r}; known {self.plural}: {', '.join(sorted(self))}")
        return name

    def make(self, name: str, **options) -> T:
        """An instance of the class registered as ``name``; a wrong option is a ValueError naming it."""
        cls = self[self.validate(name)]
        try:
            return cls(**options)
        except TypeError as e:
            raise ValueError(f"bad options for {self.kind} {name!r}: {e}") from None
