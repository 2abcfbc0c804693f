"""What is compared: a context-reuse method, its recompute ratio, and its canonical name.

Method strings read ``SELECTOR[+reorder][[GEOMETRY]][@RATIO]``, for example ``full``, ``none``,
``infoflow@0.15``, ``infoflow+reorder@0.15``, ``infoflow[tail/tail]@0.1``, ``cacheblend@0.15``.
``full`` (prefill everything) and ``none`` (reuse every cached passage, recompute nothing) take no ratio;
the others default to ``@0.15``. The geometry (which attention rows score the context tokens) is omitted
when it is ``global``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from infoflow_rag.layout import GEOMETRIES
from infoflow_rag.selectors import DEFAULT_RATIO, SELECTORS

FIXED_RATIOS = {"full": 1.0, "none": 0.0}

_METHOD = re.compile(r"(?P<selector>[a-z]+)(?P<reorder>\+reorder)?(?:\[(?P<geometry>[^\]]+)\])?(?:@(?P<ratio>.+))?")


@dataclass(frozen=True)
class MethodSpec:
    """One evaluated configuration. ``name`` labels its curve and table rows and may be free text."""

    name: str
    selector: str
    ratio: float
    reorder: bool = False
    geometry: str = "global"

    def __post_init__(self) -> None:
        if self.selector not in SELECTORS:
            raise ValueError(f"unknown selector {self.selector!r}; choose one of {', '.join(SELECTORS)}")
        if self.geometry not in GEOMETRIES:
            raise ValueError(f"unknown geometry {self.geometry!r}; choose one of {', '.join(GEOMETRIES)}")
        fixed = FIXED_RATIOS.get(self.selector)
        if fixed is not None and self.ratio != fixed:
            raise ValueError(f"selector {self.selector!r} always has ratio {fixed}, got {self.ratio}")
        if not 0 <= self.ratio <= 1:
            raise ValueError(f"ratio is the fraction of context tokens recomputed, in [0, 1]; got {self.ratio}")

    @property
    def key(self) -> str:
        """Unique label in a results file: ``name``, plus ``@ratio`` unless the selector fixes the ratio."""
        return self.name if self.selector in FIXED_RATIOS else f"{self.name}@{self.ratio:g}"


def parse_method(text: str) -> MethodSpec:
    """The :class:`MethodSpec` of a method string (grammar in the module docstring)."""
    match = _METHOD.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"cannot parse method {text!r}; expected e.g. 'infoflow+reorder[tail/tail]@0.15'")
    selector, ratio_text = match["selector"], match["ratio"]
    if selector in FIXED_RATIOS and ratio_text is not None:
        raise ValueError(f"method {text!r}: {selector!r} takes no ratio; write {selector!r}")
    try:
        ratio = FIXED_RATIOS.get(selector, DEFAULT_RATIO) if ratio_text is None else float(ratio_text)
    except ValueError:
        raise ValueError(f"method {text!r}: ratio {ratio_text!r} is not a number; write e.g. '@0.15'") from None
    reorder, geometry = match["reorder"] is not None, match["geometry"] or "global"
    name = selector + ("+reorder" if reorder else "") + ("" if geometry == "global" else f"[{geometry}]")
    return MethodSpec(name=name, selector=selector, ratio=ratio, reorder=reorder, geometry=geometry)
