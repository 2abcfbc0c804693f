"""MethodSpec from the old flat signature (name, selector, ratio, ...), so method tables in tests stay readable."""

from infoflow_rag.engine.selection import DEFAULT_RATIO
from infoflow_rag.eval.methods import MethodSpec, fixed_ratio, method_options


def spec(name: str, selector: str, ratio: float, *args, lead_in: bool = False, **kwargs) -> MethodSpec:
    """``ratio`` is ignored for a selector that fixes its own share (``full``, ``none``), as the grammar does."""
    return MethodSpec(
        name, method_options(selector, DEFAULT_RATIO if fixed_ratio(selector) else ratio, *args, **kwargs), lead_in
    )
