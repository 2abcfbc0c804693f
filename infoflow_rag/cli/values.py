"""Flag value types: each turns the flag's text into its value, or refuses it naming the value and what to pass,
before any model loads (argparse prints the message with the flag's name)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from ..engine.options import validate_ratio
from ..index.faiss_index import DEFAULT_PARAMS
from ..store import check_store_spec

MAX_PORT = 65535
INDEX_PARAMS = tuple(dict.fromkeys(name for params in DEFAULT_PARAMS.values() for name in params))


def at_least(minimum: int) -> Callable[[str], int]:
    """A whole-number type refusing values below ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return value

    return parse


positive_int = at_least(1)  # counts: --top-k, --repeats, --max-new-tokens, ...
non_negative_int = at_least(0)  # offsets and thresholds: --start, --min-context-tokens


def port(text: str) -> int:
    """A TCP port to listen on, 1-65535."""
    if not text.isdigit() or not 1 <= int(text) <= MAX_PORT:
        raise argparse.ArgumentTypeError(f"expected a TCP port in 1..{MAX_PORT}, got {text!r}; e.g. --port 8000")
    return int(text)


def positive_float(text: str) -> float:
    """A duration or amount that must be above 0 (``--timeout``)."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0:  # nan fails too
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def ratio(text: str) -> float:
    """A share of context tokens recomputed, in (0, 1], checked by the options type's own rule."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a share in (0, 1] such as 0.15, got {text!r}") from None
    try:
        return validate_ratio(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def store_spec(text: str) -> str:
    """A KV store spec (``memory[:SIZE]``, ``disk:DIR``, a directory, ``redis://...``), checked without opening it."""
    try:
        return check_store_spec(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def index_param(text: str) -> tuple[str, int]:
    """A FAISS index parameter, ``KEY=INTEGER`` with a key some index kind takes and the integer >= 1
    (``--index-param M=32``); whether the kind in use takes it is checked where the kind is known."""
    key, _, value = text.partition("=")
    if key not in INDEX_PARAMS or not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(
            f"expected KEY=INTEGER >= 1 with KEY one of {', '.join(INDEX_PARAMS)} (e.g. M=32), got {text!r}"
        )
    return key, int(value)
