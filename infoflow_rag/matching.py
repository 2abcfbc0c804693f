"""Find known passages inside a ready-made prompt string, by their text — never by separator strings.

Frameworks (LlamaIndex, LangChain prompt templates) join retrieved passages into one prompt, on lines of
their own or inline (``"Notes: {context_str}"``). A passage is recognised wherever its exact text stands
without cutting a word in two: each such position is looked up by a short anchor, then the whole text is
compared.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

ANCHOR_CHARS = 32  # texts shorter than this are anchored by their whole text
RECENT_PASSAGES = 1024  # texts a RecentPassages keeps: a few hundred queries' worth of retrieved passages
# Where a quoted passage can start: a visible character not inside a word (as before, a passage is found by its
# first visible character). A passage glued to the word before it ("Parisian" holding "Paris") is not that
# passage: its tokens differ from the stored ones.
_CAN_START = re.compile(r"(?=\S)(?:(?<!\w)|(?!\w))")
_WORD = re.compile(r"\w")


@dataclass(frozen=True)
class KnownPassage:
    """A passage inside a prompt, by its text: its KV comes from the store (prefilled and stored if missing)."""

    text: str


@dataclass(frozen=True)
class Match:
    start: int  # character offsets in the prompt: prompt[start:end] is the passage's text
    end: int
    key: int  # the caller's id of the passage


class PassageMatcher:
    def __init__(self, passages: Iterable[tuple[int, str]] = ()):
        self._by_anchor: dict[str, list[tuple[int, str]]] = {}
        self._anchor_lengths: set[int] = set()
        self._write_lock = threading.Lock()  # an add in one thread and a remove in another must not lose either
        self.add(passages)

    def add(self, passages: Iterable[tuple[int, str]]) -> None:
        with self._write_lock:
            for key, text in passages:
                if text.strip():
                    anchor = text[:ANCHOR_CHARS]
                    self._by_anchor.setdefault(anchor, []).append((key, text))
                    self._anchor_lengths.add(len(anchor))

    def remove(self, keys: Iterable[int]) -> None:
        """Forget the passages of ``keys`` (removed from the index): a prompt quoting one is fresh text again."""
        gone = set(keys)
        with self._write_lock:
            for anchor, entries in list(self._by_anchor.items()):
                kept = [entry for entry in entries if entry[0] not in gone]
                if not kept:
                    del self._by_anchor[anchor]
                elif len(kept) < len(entries):  # a new list, not the old one changed: find() may be reading it
                    self._by_anchor[anchor] = kept

    def __len__(self) -> int:
        return sum(len(v) for v in self._by_anchor.values())

    def find(self, prompt: str, *more: PassageMatcher) -> list[Match]:
        """Non-overlapping matches in prompt order, of this matcher's passages and ``more``'s; at each position
        the longest known passage wins."""
        # A snapshot of the anchor lengths: add() may run in another thread (a set must not change while iterated).
        anchors = [(m._by_anchor, tuple(m._anchor_lengths)) for m in (self, *more)]
        if not any(lengths for _, lengths in anchors):
            return []
        matches: list[Match] = []
        covered = 0
        for position in _CAN_START.finditer(prompt):
            start = position.start()
            if start < covered:
                continue
            found = [
                c
                for by_anchor, lengths in anchors
                for n in lengths
                for c in by_anchor.get(prompt[start : start + n], ())
                if prompt.startswith(c[1], start) and not _cuts_a_word(prompt, start + len(c[1]))
            ]
            if found:
                key, text = max(found, key=lambda c: len(c[1]))
                matches.append(Match(start, start + len(text), key))
                covered = start + len(text)
        return matches


def _cuts_a_word(prompt: str, i: int) -> bool:
    return 0 < i < len(prompt) and bool(_WORD.match(prompt, i - 1)) and bool(_WORD.match(prompt, i))


class RecentPassages:
    """The passage texts a framework handed over lately: what its next prompts quote.

    Deduplicated and bounded (the least recently seen are dropped past ``capacity``), because frameworks
    retrieve without end; safe to share between threads, because the adapters are called concurrently.
    Texts are kept stripped: frameworks strip passages before joining them, and a stripped passage is found
    inside an unstripped one anyway.
    """

    def __init__(self, capacity: int = RECENT_PASSAGES):
        self.capacity = capacity
        self._texts: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, texts: Iterable[str]) -> None:
        with self._lock:
            for text in texts:
                if text := text.strip():
                    self._texts[text] = None
                    self._texts.move_to_end(text)
            while len(self._texts) > self.capacity:
                self._texts.popitem(last=False)

    def add_context(self, context: str) -> None:
        """A context string as a framework puts it in a prompt: the known passages in it are kept fresh, and
        every stretch no known passage covers becomes a passage of its own — a passage the framework cut to
        fit the window, or passages it quoted as a list repr. The same context in a later prompt then reuses
        all of it. Stretches shorter than an anchor are the framework's glue (separators, brackets)."""
        texts = self.texts()
        matches = PassageMatcher(enumerate(texts)).find(context)
        bounds = [0, *(b for m in matches for b in (m.start, m.end)), len(context)]
        gaps = (context[a:b] for a, b in zip(bounds[::2], bounds[1::2], strict=True))
        self.add([*(texts[m.key] for m in matches), *(g for g in gaps if len(g.strip()) >= ANCHOR_CHARS)])

    def texts(self) -> list[str]:
        with self._lock:
            return list(self._texts)
