"""Helpers every command shares: loading the engine, and the query options from their flags."""

from __future__ import annotations

import argparse
import json
from typing import Any, get_args, get_origin

from ..engine import Engine, QueryOptions
from ..engine.lead_in import DEFAULT_LEAD_IN, NEUTRAL_LEAD_IN
from ..engine.options import DEFAULT_OPTIONS

LEAD_INS = {"none": None, "neutral": NEUTRAL_LEAD_IN}  # what --lead-in names
DEFAULT_LEAD_IN_NAME = next(name for name, text in LEAD_INS.items() if text == DEFAULT_LEAD_IN)  # the engine's


def load_engine(args: argparse.Namespace) -> Engine:
    """The engine of ``--model`` with the settings of its flags, loaded and checked by the correctness gate."""
    return Engine.load(args.model, **engine_settings(args))


def engine_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The :class:`Engine` settings the flags of ``--model`` give (``--lead-in``, where the command has it)."""
    return {"lead_in": LEAD_INS[args.lead_in]} if "lead_in" in args else {}


# The flag a command line must give with --compress: keep's default (every token) would make the policy a no-op.
KEEP_WITH_COMPRESS = "keep"


def add_option_flags(parser: argparse.ArgumentParser, what: str = "") -> None:
    """One flag per field of :class:`QueryOptions` (``--selector``, ``--ratio``, ``--keep``, ...), all unset by
    default: :func:`query_options` lays the given ones over the defaults and the options type validates them."""
    for name, field in QueryOptions.model_fields.items():
        flag = "--" + name.replace("_", "-")
        default = field.get_default(call_default_factory=True)
        shown = "required with --compress" if name == KEEP_WITH_COMPRESS else f"default: {_shown(default)}"
        help_text = f"{what}{field.description} ({shown})"
        if field.annotation is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif any(dict in (kind, get_origin(kind)) for kind in (field.annotation, *get_args(field.annotation))):
            parser.add_argument(flag, type=json_text, default=None, metavar="JSON", help=help_text)
        else:  # numbers and names reach QueryOptions as written: it parses and checks them
            parser.add_argument(flag, default=None, metavar=_metavar(field.annotation), help=help_text)


def json_text(text: str) -> Any:
    """A flag's JSON value; what is wrong with it, and where, if it does not parse (argparse alone says only
    'invalid loads value')."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(
            f"not valid JSON ({err.msg} at character {err.pos}): {text!r}; quote it for the shell, e.g. "
            """'{"type": "object"}'"""
        ) from None


def query_options(args: argparse.Namespace) -> QueryOptions:
    """The options given as flags over the defaults. With ``--compress``, ``--keep`` must be given too."""
    given = {name: value for name in QueryOptions.model_fields if (value := getattr(args, name, None)) is not None}
    options = DEFAULT_OPTIONS.replace(**given)
    if options.compress != "none" and KEEP_WITH_COMPRESS not in given:
        raise ValueError(
            f"--compress {options.compress} needs --keep: a share such as 0.5 or a token count such as 256"
        )
    return options


def _shown(value: Any) -> str:
    return json.dumps(value) if isinstance(value, dict) else str(value)


def _metavar(annotation: Any) -> str:
    kinds = get_args(annotation) or (annotation,)
    return "NUMBER" if all(k in (int, float) for k in kinds) else "NAME" if str in kinds else "VALUE"
