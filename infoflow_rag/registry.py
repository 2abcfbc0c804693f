"""Name -> class registries for the pluggable parts (recompute selectors, KV compression policies)."""

from __future__ import annotations

import functools
import inspect
from typing import Any, Generic, TypeVar, get_type_hints

from pydantic import BaseModel, ConfigDict, ValidationError, create_model

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
        """An instance of the class registered as ``name``. An option it does not take, or of the wrong type (as
        its constructor annotates it), is a ValueError naming the option and the value, and listing its options;
        the class checks the ranges itself."""
        cls = self[self.validate(name)]
        fields = _option_fields(cls)
        try:
            checked = fields.model_validate(options)
        except ValidationError as err:
            bad = "; ".join(_problem(e) for e in err.errors())
            known = ", ".join(
                n if f.is_required() else f"{n} (default {f.default!r})" for n, f in fields.model_fields.items()
            )
            known = known or "none"
            raise ValueError(f"bad options for {self.kind} {name!r}: {bad}; its options are: {known}") from None
        return cls(**{key: getattr(checked, key) for key in options})  # the others keep the class's defaults


@functools.cache
def _option_fields(cls: type) -> type[BaseModel]:
    """A model of ``cls``'s keyword options, read from its constructor: their annotated types and defaults."""
    hints = get_type_hints(cls.__init__)
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]  # without self
    fields: dict[str, Any] = {
        p.name: (hints.get(p.name, Any), ... if p.default is inspect.Parameter.empty else p.default)  # ...: required
        for p in params
        if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }
    return create_model(f"{cls.__name__}Options", __config__=ConfigDict(extra="forbid"), **fields)


def _problem(error: dict) -> str:
    """One option's problem: ``name=value (why)``, or ``name (required)`` when it was not given."""
    name = ".".join(map(str, error["loc"]))
    if error["type"] == "missing":
        return f"{name} (required)"
    why = "no such option" if error["type"] == "extra_forbidden" else error["msg"]
    return f"{name}={error['input']!r} ({why})"
