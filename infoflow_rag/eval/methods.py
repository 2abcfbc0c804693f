"""What is compared: a context-reuse method, its recompute ratio, an optional KV compression, and its name.

Method strings read :data:`GRAMMAR`, for example
``full``, ``none``, ``infoflow@0.15``, ``infoflow+reorder@0.15``, ``infoflow[tail/tail]@0.1``,
``infoflow{20-23}@0.15``, ``infoflow+block@0.15``, ``cacheblend@0.15``, ``sinkflow+leadin@0.15``,
``infoflow@0.15+infokv:0.5``, ``none+snapkv:256``.
``{LAYERS}`` (InfoFlow only) is the inclusive range of scoring layers, ``{A-B}`` or ``{A}``; without it the
engine's default layers score. ``+block`` (InfoFlow only) scores with the whole question block instead of the
raw question (the engine's ``score_rows="block"``). ``+leadin`` answers over passages prefilled behind the neutral
lead-in (an engine setting, :data:`~infoflow_rag.engine.lead_in.NEUTRAL_LEAD_IN`, not a query option: the runner
prefills them on an engine of the same model with that lead-in); ``full`` reads no cache and refuses it.
``full`` (prefill everything) and ``none`` (reuse every cached passage, recompute nothing) take no ratio;
the others default to ``@0.15``. The geometry (which attention rows score the context tokens) is omitted
when it is ``global``. ``+POLICY:KEEP`` compresses the KV cache before decoding with a policy of
``infoflow_rag.engine.compression.POLICIES`` (``snapkv``, ``infokv``); KEEP is either the share of context tokens kept,
written with a decimal point and in (0, 1] (``0.5``, ``1.0``), or a whole number of context tokens (``256``).
``;OPTION=VALUE`` sets any other field of :class:`QueryOptions` (VALUE in JSON, e.g. ``sinkflow;selector_options=
{"sink":4}@0.15``), so a new option can be evaluated without touching this grammar; keys spell the options
that differ from their defaults this way.
A method is a name plus :class:`QueryOptions` (and whether its passages are prefilled behind the lead-in): the
grammar only spells options, the options type validates them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from infoflow_rag.engine.compression import POLICIES
from infoflow_rag.engine.lead_in import NEUTRAL_LEAD_IN
from infoflow_rag.engine.options import DEFAULT_RATIO, QueryOptions, validate_keep
from infoflow_rag.engine.options import fixed_ratio as _fixed

GRAMMAR = "SELECTOR[{LAYERS}][+reorder][+block][+leadin][[GEOMETRY]][;OPTION=VALUE...][@RATIO][+POLICY:KEEP]"
# Options the grammar spells with its own syntax; any other field of QueryOptions is written ``;name=value``.
_SPELLED = ("selector", "ratio", "reorder", "geometry", "score_rows", "compress", "keep")
_FLAGS = ("+reorder", "+block", "+leadin")  # in the order the grammar reads them
_LAYERS = re.compile(r"(?P<first>\d+)(?:-(?P<last>\d+))?")

_METHOD = re.compile(
    r"(?P<selector>[a-z]+)(?:\{(?P<layers>[^}]*)\})?(?P<reorder>\+reorder)?(?P<block>\+block)?(?P<leadin>\+leadin)?(?:\[(?P<geometry>[^\]]+)\])?"
    r"(?P<extra>(?:;[a-z_]+=[^;@+]*)*)(?:@(?P<ratio>[^+]+))?"
    r"(?:\+(?P<policy>[a-z0-9_]+)(?::(?P<keep>[^+]*))?)?"
)


@dataclass(frozen=True)
class MethodSpec:
    """One evaluated configuration: ``name`` labels its curve and table rows (it may be free text), ``options``
    say how every question is answered, ``lead_in`` whether its passages are prefilled behind the neutral
    lead-in."""

    name: str
    options: QueryOptions
    lead_in: bool = False

    def __post_init__(self) -> None:
        if self.lead_in and self.options.selector == "full":
            raise ValueError(f"method {self.name!r}: full prefill reads no cached passage; drop '+leadin'")

    @property
    def key(self) -> str:
        """Unique label in a results file: ``name`` plus ``@ratio`` unless the selector fixes the ratio, and
        ``:keep`` after the policy when compressing (``infoflow+infokv`` -> ``infoflow@0.15+infokv:0.5``)."""
        opts = self.options
        base = self.name.removesuffix(self._policy_suffix)
        ratio = "" if fixed_ratio(opts.selector) else f"@{opts.ratio:g}"
        keep = "" if opts.compress == "none" else f":{opts.keep}"  # str() keeps the point that marks a share
        return f"{base}{ratio}{self._policy_suffix}{keep}"

    @property
    def is_reference(self) -> bool:
        """Whether this is the plain full prefill a run measures the others against: its TTFT divides theirs,
        and its answer is the one fidelity is teacher-forced along."""
        return self.options.selector == "full" and self.options.compress == "none"

    @property
    def uncompressed(self) -> MethodSpec:
        """This method without KV compression: the baseline a compressed method is measured against."""
        name = self.name.removesuffix(self._policy_suffix)
        return MethodSpec(name, self.options.replace(compress="none"), self.lead_in)

    @property
    def _policy_suffix(self) -> str:
        return "" if self.options.compress == "none" else f"+{self.options.compress}"


def check_methods(methods: Sequence[MethodSpec]) -> None:
    """Refuse a list one run cannot hold: none, a configuration twice, or two TTFT references."""
    if not methods:
        raise ValueError("no methods to run; pass at least one MethodSpec (see parse_method)")
    keys = [m.key for m in methods]
    if duplicates := sorted({k for k in keys if keys.count(k) > 1}):
        raise ValueError(f"methods repeat {duplicates}; give each configuration once")
    if sum(m.is_reference for m in methods) > 1:
        raise ValueError(f"at most one uncompressed 'full' method, got {keys}: it is the TTFT reference")


def engines_for(engine: Any, methods: Iterable[MethodSpec]) -> dict[bool, Any]:
    """The engine each kind of method runs on, by ``MethodSpec.lead_in``: the grammar alone decides which cache a
    method reads, whatever ``engine``'s own lead-in. Plain methods run on ``engine`` or, if it prefills behind a
    lead-in, on its plain sibling; ``+leadin`` ones on ``engine`` if it prefills behind the neutral lead-in, else on
    such a sibling of the same model (``engine.replace``)."""
    wanted = {False} | {m.lead_in for m in methods}
    own = getattr(engine, "lead_in", None)
    engines = {}
    for lead_in in sorted(wanted):
        text = NEUTRAL_LEAD_IN if lead_in else None
        if own == text:
            engines[lead_in] = engine
        elif callable(getattr(engine, "replace", None)):
            engines[lead_in] = engine.replace(lead_in=text)
        else:
            raise TypeError(
                f"{type(engine).__name__} has no replace(lead_in=...), so it cannot run methods over "
                f"{'lead-in' if lead_in else 'plain'} caches; drop those methods or pass an Engine"
            )
    return engines


def fixed_ratio(selector: str) -> bool:
    """Whether ``selector`` recomputes a fixed share whatever the ratio (``full``, ``none``): it takes no ``@``."""
    return _fixed(selector) is not None


def parse_method(text: str) -> MethodSpec:
    """The :class:`MethodSpec` of a method string (grammar in the module docstring)."""
    match = _METHOD.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"cannot parse method {text!r}; expected e.g. 'infoflow+reorder[tail/tail]@0.15+infokv:0.5'")
    selector, ratio_text = match["selector"], match["ratio"]
    if fixed_ratio(selector) and ratio_text is not None:
        raise ValueError(f"method {text!r}: {selector!r} takes no ratio; write {selector!r}")
    try:
        ratio = DEFAULT_RATIO if ratio_text is None else float(ratio_text)
    except ValueError:
        raise ValueError(f"method {text!r}: ratio {ratio_text!r} is not a number; write e.g. '@0.15'") from None
    compress, keep = _parse_compression(text, match["policy"], match["keep"])
    reorder, geometry = match["reorder"] is not None, match["geometry"] or "global"
    layers = () if match["layers"] is None else _parse_layers(text, match["layers"])
    rows, lead_in = "block" if match["block"] else "question", match["leadin"] is not None
    try:
        options = method_options(selector, ratio, reorder, geometry, compress, keep, layers, rows)
        if match["extra"]:
            options = _with_extras(options, match["extra"])
    except ValueError as err:
        raise ValueError(f"method {text!r}: {err}") from None
    return MethodSpec(method_name(options, lead_in), options, lead_in)


def method_options(
    selector: str,
    ratio: float = DEFAULT_RATIO,
    reorder: bool = False,
    geometry: str = "global",
    compress: str = "none",
    keep: float | int = 1.0,
    layers: tuple[int, ...] = (),
    score_rows: str = "question",
) -> QueryOptions:
    """The options a method string spells, from its parts (InfoFlow's scoring ``layers`` as a range)."""
    return QueryOptions(
        selector=selector,
        ratio=ratio,
        reorder=reorder,
        geometry=geometry,
        score_rows=score_rows,
        selector_options={"layers": list(layers)} if layers else {},
        compress=compress,
        keep=keep,
    )


def method_name(options: QueryOptions, lead_in: bool = False) -> str:
    """The name a method string gives ``options`` (over lead-in caches with ``lead_in``): everything but the ratio
    and the keep."""
    layers = options.selector_options.get("layers")
    name = options.selector + (f"{{{layers[0]}-{layers[-1]}}}" if layers else "")
    name += ("+reorder" if options.reorder else "") + ("+block" if options.score_rows == "block" else "")
    name += "+leadin" if lead_in else ""
    name += ("" if options.geometry == "global" else f"[{options.geometry}]") + _extras(options)
    return name + ("" if options.compress == "none" else f"+{options.compress}")


def _extras(options: QueryOptions) -> str:
    """``;name=value`` for every option the grammar has no syntax for that differs from its default."""
    parts = []
    for name, field in QueryOptions.model_fields.items():
        value = getattr(options, name)
        if name == "selector_options":  # the scoring layers have their own syntax, {A-B}
            value = {k: v for k, v in value.items() if k != "layers"}
        if name not in _SPELLED and value != field.get_default(call_default_factory=True):
            parts.append(f";{name}={json.dumps(value, separators=(',', ':'))}")
    return "".join(parts)


def _with_extras(options: QueryOptions, text: str) -> QueryOptions:
    changes: dict[str, Any] = {}
    for item in text.split(";")[1:]:
        name, _, value = item.partition("=")
        if name in _SPELLED:
            raise ValueError(f";{name}= is spelled by the grammar itself (see infoflow_rag.eval.methods)")
        try:
            changes[name] = json.loads(value)
        except json.JSONDecodeError:
            changes[name] = value  # a bare name, e.g. ;option=word
    if "selector_options" in changes and isinstance(changes["selector_options"], dict):
        changes["selector_options"] = {**options.selector_options, **changes["selector_options"]}
    return options.replace(**changes)


def _parse_layers(text: str, layers: str) -> tuple[int, ...]:
    match = _LAYERS.fullmatch(layers.strip())
    if match is None or int(match["last"] or match["first"]) < int(match["first"]):
        raise ValueError(
            f"method {text!r}: scoring layers {{{layers}}} must read {{A-B}} (A <= B) or {{A}}, e.g. {{20-23}}"
        )
    return tuple(range(int(match["first"]), int(match["last"] or match["first"]) + 1))


def _parse_compression(text: str, policy: str | None, keep_text: str | None) -> tuple[str, float | int]:
    if policy is None:
        return "none", 1.0
    if f"+{policy}" in _FLAGS:
        raise ValueError(
            f"method {text!r}: '+{policy}' belongs right after the selector, in the order {''.join(_FLAGS)}"
        )
    if f"+{policy}" in _FLAGS:
        raise ValueError(
            f"method {text!r}: '+{policy}' belongs right after the selector, in the order {''.join(_FLAGS)}"
        )
    try:
        POLICIES.validate(policy)
    except ValueError as err:
        raise ValueError(f"method {text!r}: {err}") from None
    if policy == "none":
        raise ValueError(f"method {text!r}: no compression is the default; leave out '+none'")
    if keep_text is None:
        raise ValueError(f"method {text!r}: policy {policy!r} needs a keep, e.g. '+{policy}:0.5' (share kept)")
    try:
        return policy, validate_keep(keep_text)
    except ValueError as err:
        raise ValueError(f"method {text!r}: {err}") from None
