"""QueryOptions: how one query is answered. The one declaration and the one validation of every query option.

Every entry point speaks this type: ``Engine.answer(question, passages, options)`` (keyword overrides are sugar
for :meth:`QueryOptions.replace`), the pipeline, the eval grammar (a method is a name plus options), the CLI
flags, the server's request fields and both framework adapters (which inherit :class:`OptionFields`). Results
carry the options whole. Adding an option means a field here and the stage that reads it (and, where results
written before it were answered otherwise than its default, that value in ``eval/results.py``'s ``_ADDED_OPTIONS``).

A pydantic model rather than a dataclass: both adapters and the server are pydantic models already, so they
inherit or derive these fields with their validation instead of copying them, and a results file or an HTTP
body round-trips through ``model_dump`` / ``model_validate``.
"""

from __future__ import annotations

import numbers
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from ..errors import InfoFlowError
from .compression import POLICIES, make_policy, validate_policy
from .constraint import json_grammar
from .frozen import frozen
from .linears import PRODUCT_DTYPES
from .placement import GEOMETRIES
from .prompt import SCORE_ROWS
from .selection import DEFAULT_RATIO, SELECTORS, make_selector, validate_selector


class InvalidOptionError(InfoFlowError, ValueError):
    """A query option has a value no stage accepts; the message names the value and what to send instead, and
    ``option`` names the option at fault where one is (the server's ``param``)."""

    def __init__(self, message: str, option: str | None = None) -> None:
        super().__init__(message)
        self.option = option


def validate_ratio(ratio: float) -> float:
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio must be in (0, 1], got {ratio!r}; e.g. 0.15 recomputes 15 % of context tokens")
    return ratio


def validate_keep(keep: float | int) -> float | int:
    """``keep`` as a ratio in (0, 1] (any float) or a token count >= 1 (any integer); else a ValueError.

    The type decides: ``keep=1.0`` keeps every passage token, ``keep=1`` keeps one. Written out (a flag, a
    method string), a whole number is a count and anything else a share.
    """
    if isinstance(keep, str):
        try:
            keep = int(keep) if keep.strip().isdigit() else float(keep)
        except ValueError:
            raise ValueError(
                f"keep {keep!r} is not a number; write a share such as 0.5 or a token count such as 256"
            ) from None
    if isinstance(keep, bool) or not isinstance(keep, numbers.Real):
        raise ValueError(f"keep must be a float ratio in (0, 1] or an int token count, got {keep!r}")
    if isinstance(keep, numbers.Integral):
        if keep < 1:
            raise ValueError(f"keep={keep} as a token count must be >= 1; pass a float such as 0.5 for a ratio")
        return int(keep)
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep={keep} as a ratio must be in (0, 1]; e.g. keep=0.5 keeps half the context tokens")
    return float(keep)


def _choice(value: str, choices: tuple[str, ...], what: str) -> str:
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; choose one of {', '.join(choices)}")
    return value


class OptionFields(BaseModel):
    """The query options as pydantic fields with their validation. :class:`QueryOptions` is the frozen value;
    the framework adapters inherit these fields, so a new option reaches them with its checks."""

    selector: str = Field(default="sinkflow", description="Tokens to recompute: " + ", ".join(SELECTORS))
    ratio: float = Field(default=DEFAULT_RATIO, description="Share of context tokens recomputed, in (0, 1].")
    reorder: bool = Field(default=False, description="Order cached passages by density (densest last).")
    geometry: str = Field(default="global", description="RoPE geometry of scoring: " + ", ".join(GEOMETRIES))
    score_rows: str = Field(
        default="question", description="Prompt rows that score the context: " + ", ".join(SCORE_ROWS)
    )
    score_dtype: str = Field(
        default="bfloat16",
        description="Weights of the question scoring pass's linear layers: "
        + ", ".join(PRODUCT_DTYPES)
        + " (bfloat16: half the bytes to read, float32 where the CPU has no bfloat16 products; float32: as published).",
    )
    selector_options: dict[str, Any] = Field(default_factory=dict, description="Keyword options of the selector.")
    compress: str = Field(default="none", description="KV compression before decoding: " + ", ".join(POLICIES))
    keep: float | int = Field(
        default=1.0, description="With compress: share (float in (0, 1]) or count (int >= 1) of passage tokens kept."
    )
    compress_options: dict[str, Any] = Field(default_factory=dict, description="Keyword options of the policy.")
    json_schema: dict[str, Any] | None = Field(
        default=None, description="Constrain the answer to JSON matching this JSON schema (decoding masks the rest)."
    )

    @field_validator("selector")
    @classmethod
    def _known_selector(cls, value: str) -> str:
        return validate_selector(value)

    @field_validator("ratio", mode="before")
    @classmethod
    def _ratio_not_a_bool(cls, value: Any) -> Any:
        if isinstance(value, bool):  # pydantic would read True as 1.0, a whole recompute (text stays: flags are text)
            raise ValueError(f"ratio must be a number in (0, 1], e.g. 0.15, got {value!r}")
        return value

    @field_validator("reorder", mode="before")
    @classmethod
    def _reorder_a_bool(cls, value: Any) -> Any:
        if not isinstance(value, bool):  # pydantic would read "yes", "off" or 1 as a bool
            raise ValueError(f"reorder must be true or false, got {value!r}")
        return value

    @field_validator("ratio")
    @classmethod
    def _ratio_in_range(cls, value: float) -> float:
        return validate_ratio(value)

    @field_validator("geometry")
    @classmethod
    def _known_geometry(cls, value: str) -> str:
        return _choice(value, GEOMETRIES, "geometry")

    @field_validator("score_rows")
    @classmethod
    def _known_score_rows(cls, value: str) -> str:
        return _choice(value, SCORE_ROWS, "score_rows")

    @field_validator("score_dtype")
    @classmethod
    def _known_score_dtype(cls, value: str) -> str:
        return _choice(value, tuple(PRODUCT_DTYPES), "score_dtype")

    @field_validator("compress")
    @classmethod
    def _known_policy(cls, value: str) -> str:
        return validate_policy(value)

    @field_validator("keep", mode="before")
    @classmethod
    def _keep_in_range(cls, value: Any) -> float | int:
        return validate_keep(value)

    @field_validator("json_schema", mode="before")
    @classmethod
    def _enforceable_schema(cls, value: Any) -> Any:
        if value is not None:
            json_grammar(value)  # compiled now so that a bad schema fails where it is given, not mid-query
        return value

    # The rules that read two options sit on the later field, which sees the earlier one in ``info.data`` (absent
    # if it failed itself), so an error names the option to change (the server's error ``param``).
    @field_validator("selector_options", mode="after")
    @classmethod
    def _options_of_the_selector(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        if "selector" in info.data:
            make_selector(info.data["selector"], **value)  # a bad selector option fails now, not mid-query
        return value

    @field_validator("keep", mode="after")
    @classmethod
    def _keep_needs_a_policy(cls, value: float | int, info: ValidationInfo) -> float | int:
        if info.data.get("compress") == "none" and (value != 1.0 or isinstance(value, int)):  # an int is a count
            raise ValueError(
                f"keep={value!r} needs a compression policy: set compress (e.g. 'snapkv'), or leave keep at 1.0"
            )
        return value

    @field_validator("compress_options", mode="after")
    @classmethod
    def _options_of_the_policy(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        if "compress" in info.data:
            make_policy(info.data["compress"], **value)
        return value

    def query_options(self) -> QueryOptions:
        """These fields as a :class:`QueryOptions` (how an adapter hands its fields to the pipeline)."""
        return QueryOptions(**{name: getattr(self, name) for name in QueryOptions.model_fields})


class QueryOptions(OptionFields):
    """The options of one query (frozen; :meth:`replace` returns a validated copy)."""

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)  # defaults frozen too

    def __init__(self, **options: Any) -> None:
        try:
            super().__init__(**options)
        except ValidationError as err:
            raise InvalidOptionError(describe(err), option=first_option(err)) from None

    @field_validator("selector_options", "compress_options", "json_schema", mode="after")
    @classmethod
    def _frozen_through(cls, value: Any) -> Any:
        return frozen(value)  # frozen means frozen: no change in place past the validation

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QueryOptions:
        """From ``model_dump`` output (a results file, a JSON body)."""
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def replace(self, **changes: Any) -> QueryOptions:
        """A validated copy with ``changes``. A new selector or policy drops the old one's options, and
        ``compress="none"`` resets ``keep``, unless they are changed too."""
        if "selector" in changes and changes["selector"] != self.selector:
            changes.setdefault("selector_options", {})
        if "compress" in changes and changes["compress"] != self.compress:
            changes.setdefault("compress_options", {})
            if changes["compress"] == "none":
                changes.setdefault("keep", 1.0)
        return QueryOptions(**{**dict(self), **changes}) if changes else self

    def split(self, overrides: dict[str, Any]) -> tuple[QueryOptions, dict[str, Any]]:
        """These options with the option-named ``overrides`` applied, and the overrides that are not options
        (generation settings, say): how keyword overrides become options at every entry point."""
        changes = {k: v for k, v in overrides.items() if k in QueryOptions.model_fields}
        return self.replace(**changes), {k: v for k, v in overrides.items() if k not in changes}

    @property
    def effective_ratio(self) -> float:
        """The share of context the selector recomputes by its budget: fixed by ``full`` (1) and ``none`` (0)."""
        fixed = fixed_ratio(self.selector)
        return self.ratio if fixed is None else fixed


def fixed_ratio(selector: str) -> float | None:
    """The share ``selector`` recomputes whatever the ratio (1 for ``full``, 0 for ``none``), else None."""
    return SELECTORS[selector].fixed_ratio if selector in SELECTORS else None


def split_overrides(options: QueryOptions | None, overrides: dict[str, Any]) -> tuple[QueryOptions, dict[str, Any]]:
    """``options`` (default: the defaults) with the option-named ``overrides`` applied, and the other overrides."""
    if options is not None and not isinstance(options, QueryOptions):
        raise TypeError(
            f"options must be a QueryOptions, got {options!r}; pass QueryOptions(...) or its fields as keywords"
        )
    return (options or DEFAULT_OPTIONS).split(overrides)


def first_option(err: ValidationError) -> str | None:
    """The option the first field error is about (None if no error names one)."""
    return next((str(e["loc"][0]) for e in err.errors() if e.get("loc")), None)


def describe(err: ValidationError) -> str:
    """A pydantic validation error as one line: our validators' messages as they are, others with the field."""
    parts = []
    for e in err.errors():
        field = ".".join(str(p) for p in e.get("loc", ()))
        if e.get("type") == "value_error":
            parts.append(str(e["ctx"]["error"]))
        elif e.get("type") == "extra_forbidden":
            parts.append(f"unknown option {field!r}; options are: {', '.join(QueryOptions.model_fields)}")
        else:
            parts.append(f"{field}: {e.get('msg')}, got {e.get('input')!r}")
    return "; ".join(parts)


DEFAULT_OPTIONS = QueryOptions()

__all__ = [
    "DEFAULT_OPTIONS",
    "DEFAULT_RATIO",
    "fixed_ratio",
    "InvalidOptionError",
    "OptionFields",
    "QueryOptions",
    "split_overrides",
]
