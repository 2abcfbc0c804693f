"""Find known passages inside a ready-made prompt string, by their text — never by separator strings.

Frameworks (LlamaIndex, LangChain prompt templates) join retrieved passages into one prompt. A passage
is recognised where its exact text starts at the beginning of a line (the frameworks join passages
with newlines): each line start is looked up by a short anchor, then the whole text is compared.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

ANCHOR_CHARS = 32  # texts shorter than this are anchored by their whole text


@dataclass(frozen=True)
class KnownPassage:
    """A passage inside a prompt, by its text: its KV comes from the store (prefilled and stored if missing)."""

    text: str


@dataclass(frozen=True)
class Match:
    start: int  # character offsets in the prompt
    end: int
    key: int  # the caller's id of the passage


class PassageMatcher:
    def __init__(self, passages: Iterable[tuple[int, str]] = ()):
        self._by_anchor: dict[str, list[tuple[int, str]]] = {}
        self._anchor_lengths: set[int] = set()
        self.add(passages)

    def add(self, passages: Iterable[tuple[int, str]]) -> None:
        for key, text in passages:
            if text.strip():
                anchor = text[:ANCHOR_CHARS]
                self._by_anchor.setdefault(anchor, []).append((key, text))
                self._anchor_lengths.add(len(anchor))

    def __len__(self) -> int:
        return sum(len(v) for v in self._by_anchor.values())

    def find(self, prompt: str) -> list[Match]:
        """Non-overlapping matches in prompt order; at each line start the longest known passage wins."""
        matches: list[Match] = []
        covered = 0
        for line in re.finditer(r"^[ \t]*", prompt, flags=re.MULTILINE):
            start = line.end()
            if start < covered:
                continue
            candidates = [c for n in self._anchor_lengths for c in self._by_anchor.get(prompt[start : start + n], ())]
            best = max(
                (c for c in candidates if prompt.startswith(c[1], start)),
                key=lambda c: len(c[1]),
                default=None,
            )
            if best is not None:
                matches.append(Match(start, start + len(best[1]), best[0]))
                covered = start + len(best[1])
        return matches
