"""What is compared: a context-reuse method, its recompute ratio, an optional KV compression, and its name.

Method strings read ``SELECTOR[{LAYERS}][+reorder][+block][[GEOMETRY]][@RATIO][+POLICY:KEEP]``, for example
``full``, ``none``, ``infoflow@0.15``, ``infoflow+reorder@0.15``, ``infoflow[tail/tail]@0.1``,
``infoflow{20-23}@0.15``, ``infoflow+block@0.15``, ``cacheblend@0.15``, ``infoflow@0.15+infokv:0.5``,
``none+snapkv:256``.
``{LAYERS}`` (InfoFlow only) is the inclusive range of scoring layers, ``{A-B}`` or ``{A}``; without it the
engine's default layers score. ``+block`` (InfoFlow only) scores with the whole question block instead of the
raw question (the engine's ``score_rows="block"``).
``full`` (prefill everything) and ``none`` (reuse every cached passage, recompute nothing) take no ratio;
the others default to ``@0.15``. The geometry (which attention rows score the context tokens) is omitted
when it is ``global``. ``+POLICY:KEEP`` compresses the KV cache before decoding with a policy of
``infoflow_rag.compress.POLICIES`` (``snapkv``, ``infokv``); KEEP is either the share of context tokens kept,
written with a decimal point and in (0, 1] (``0.5``, ``1.0``), or a whole number of context tokens (``256``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from infoflow_rag.engine.placement import GEOMETRIES
from infoflow_rag.engine.selection import DEFAULT_RATIO, validate_selector

FIXED_RATIOS = {"full": 1.0, "none": 0.0}
_LAYERS = re.compile(r"(?P<first>\d+)(?:-(?P<last>\d+))?")

_METHOD = re.compile(
    r"(?P<selector>[a-z]+)(?:\{(?P<layers>[^}]*)\})?(?P<reorder>\+reorder)?(?P<block>\+block)?(?:\[(?P<geometry>[^\]]+)\])?(?:@(?P<ratio>[^+]+))?"
    r"(?:\+(?P<policy>[a-z0-9_]+)(?::(?P<keep>[^+]*))?)?"
)


@dataclass(frozen=True)
class MethodSpec:
    """One evaluated configuration. ``name`` labels its curve and table rows and may be free text.

    ``keep`` is what a compressing method keeps of the context KV: a share (float) or a token count (int).
    """

    name: str
    selector: str
    ratio: float
    reorder: bool = False
    geometry: str = "global"
    compress: str = "none"
    keep: float | int = 1.0
    layers: tuple[int, ...] = ()  # InfoFlow's scoring layers; () = the engine's default
    score_rows: str = "question"  # which prompt tokens score the context: "question" or "block"

    def __post_init__(self) -> None:
        validate_selector(self.selector)
        if self.layers and self.selector != "infoflow":
            raise ValueError(
                f"only infoflow takes scoring layers, got layers {list(self.layers)} for {self.selector!r}"
            )
        if self.score_rows != "question" and self.selector != "infoflow":
            raise ValueError(f"only infoflow scores with the question block (+block), not {self.selector!r}")
        if self.geometry not in GEOMETRIES:
            raise ValueError(f"unknown geometry {self.geometry!r}; choose one of {', '.join(GEOMETRIES)}")
        fixed = FIXED_RATIOS.get(self.selector)
        if fixed is not None and self.ratio != fixed:
            raise ValueError(f"selector {self.selector!r} always has ratio {fixed}, got {self.ratio}")
        if not 0 <= self.ratio <= 1:
            raise ValueError(f"ratio is the fraction of context tokens recomputed, in [0, 1]; got {self.ratio}")
        if self.compress != "none":
            _check_compression(self.compress, self.keep)
        elif self.keep != 1.0 or isinstance(self.keep, int):  # an int keep is a token count, even 1
            raise ValueError(f"keep={self.keep!r} needs a compression policy; with compress='none' keep is 1.0")

    @property
    def key(self) -> str:
        """Unique label in a results file: ``name`` plus ``@ratio`` unless the selector fixes the ratio, and
        ``:keep`` after the policy when compressing (``infoflow+infokv`` -> ``infoflow@0.15+infokv:0.5``)."""
        base = self.name.removesuffix(self._policy_suffix)
        ratio = "" if self.selector in FIXED_RATIOS else f"@{self.ratio:g}"
        keep = "" if self.compress == "none" else f":{self.keep}"  # str() keeps the point that marks a share
        return f"{base}{ratio}{self._policy_suffix}{keep}"

    @property
    def uncompressed(self) -> MethodSpec:
        """This method without KV compression: the baseline a compressed method is measured against."""
        return replace(self, name=self.name.removesuffix(self._policy_suffix), compress="none", keep=1.0)

    @property
    def _policy_suffix(self) -> str:
        return "" if self.compress == "none" else f"+{self.compress}"


def parse_keep(text: str) -> float | int:
    """The keep written in ``text``: a whole number is a token count (int), anything else a share (float).

    Only the type is decided here; :class:`MethodSpec` (or the engine) checks the range.
    """
    try:
        return int(text) if text.strip().isdigit() else float(text)
    except ValueError:
        raise ValueError(
            f"keep {text!r} is not a number; write a share such as 0.5 or a token count such as 256"
        ) from None


def parse_method(text: str) -> MethodSpec:
    """The :class:`MethodSpec` of a method string (grammar in the module docstring)."""
    match = _METHOD.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"cannot parse method {text!r}; expected e.g. 'infoflow+reorder[tail/tail]@0.15+infokv:0.5'")
    selector, ratio_text = match["selector"], match["ratio"]
    if selector in FIXED_RATIOS and ratio_text is not None:
        raise ValueError(f"method {text!r}: {selector!r} takes no ratio; write {selector!r}")
    try:
        ratio = FIXED_RATIOS.get(selector, DEFAULT_RATIO) if ratio_text is None else float(ratio_text)
    except ValueError:
        raise ValueError(f"method {text!r}: ratio {ratio_text!r} is not a number; write e.g. '@0.15'") from None
    compress, keep = _parse_compression(text, match["policy"], match["keep"])
    reorder, geometry = match["reorder"] is not None, match["geometry"] or "global"
    layers = () if match["layers"] is None else _parse_layers(text, match["layers"])
    name = selector + (f"{{{layers[0]}-{layers[-1]}}}" if layers else "")
    rows = "block" if match["block"] else "question"
    name += ("+reorder" if reorder else "") + ("+block" if match["block"] else "")
    name += ("" if geometry == "global" else f"[{geometry}]") + ("" if compress == "none" else f"+{compress}")
    return MethodSpec(name, selector, ratio, reorder, geometry, compress, keep, layers, rows)


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
    if policy == "none":
        raise ValueError(f"method {text!r}: no compression is the default; leave out '+none'")
    if keep_text is None:
        raise ValueError(f"method {text!r}: policy {policy!r} needs a keep, e.g. '+{policy}:0.5' (share kept)")
    try:
        return policy, parse_keep(keep_text)
    except ValueError as err:
        raise ValueError(f"method {text!r}: {err}") from None


def _check_compression(policy: str, keep: float | int) -> None:
    # Imported on use: the policies pull in transformers, which reports and uncompressed methods never need.
    from infoflow_rag.engine.compression import validate_keep, validate_policy

    validate_policy(policy)
    validate_keep(keep)
