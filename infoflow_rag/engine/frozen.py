"""Read-only dicts and lists: the nested values of a frozen :class:`~infoflow_rag.engine.options.QueryOptions`.

A frozen pydantic model only refuses new attribute values; a dict field could still be changed in place, past
its validation (``options.selector_options["sink"] = -1`` would fail mid-query, or change every query that shares
the options). These subclasses of dict and list refuse every change and stay what callers expect: equal to plain
dicts and lists, JSON-serialisable, copyable, deep-copyable and picklable (``types.MappingProxyType`` is not).
"""

from __future__ import annotations

from typing import Any, NoReturn


def _refuse(self, *args: Any, **kwargs: Any) -> NoReturn:
    raise TypeError(
        "query options are frozen, nested values included: build changed ones with "
        "options.replace(selector_options={...}) (or compress_options, json_schema)"
    )


class FrozenDict(dict):
    __setitem__ = __delitem__ = __ior__ = clear = pop = popitem = setdefault = update = _refuse

    def __reduce__(self):  # rebuilt from a plain dict: the default would set items one by one
        return FrozenDict, (dict(self),)


class FrozenList(list):
    __setitem__ = __delitem__ = __iadd__ = __imul__ = append = extend = insert = pop = remove = _refuse
    clear = reverse = sort = _refuse

    def __reduce__(self):
        return FrozenList, (list(self),)


def frozen(value: Any) -> Any:
    """``value`` with every dict and list in it, at any depth, made read-only."""
    if isinstance(value, dict):
        return FrozenDict({key: frozen(item) for key, item in value.items()})
    if isinstance(value, list):
        return FrozenList(frozen(item) for item in value)
    return value
