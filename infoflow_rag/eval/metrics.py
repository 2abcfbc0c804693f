"""Answer scoring: SQuAD/HotpotQA normalisation, exact match and token F1."""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)
_ANSWER_LABEL = re.compile(r"^\s*answer\s*:\s*", re.IGNORECASE)
# HotpotQA scores these as labels, not text: "yes" vs "yes indeed" must not earn partial credit.
_SPECIAL_ANSWERS = frozenset({"yes", "no", "noanswer"})


def normalize_answer(text: str) -> str:
    """Lower-case, drop ASCII punctuation, drop the articles a/an/the, collapse whitespace (SQuAD order)."""
    text = text.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(pred: str, gold: str) -> float:
    """1.0 if the normalised strings are equal, else 0.0."""
    return float(normalize_answer(pred) == normalize_answer(gold))


def token_f1(pred: str, gold: str) -> float:
    """Bag-of-tokens F1 of the normalised strings, HotpotQA convention.

    If either side normalises to yes/no/noanswer and the two differ, F1 is 0. If either side normalises
    to the empty string, F1 is 1.0 when both are empty and 0.0 otherwise (SQuAD v2 convention).
    """
    pred_norm, gold_norm = normalize_answer(pred), normalize_answer(gold)
    if pred_norm != gold_norm and (pred_norm in _SPECIAL_ANSWERS or gold_norm in _SPECIAL_ANSWERS):
        return 0.0
    pred_tokens, gold_tokens = pred_norm.split(), gold_norm.split()
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    overlap = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred_tokens), overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def best_f1(pred: str, golds: Sequence[str]) -> float:
    """Highest :func:`token_f1` over the gold answers."""
    return max(token_f1(pred, gold) for gold in _require_golds(golds))


def best_em(pred: str, golds: Sequence[str]) -> float:
    """Highest :func:`exact_match` over the gold answers."""
    return max(exact_match(pred, gold) for gold in _require_golds(golds))


def clean_prediction(text: str) -> str:
    """The answer part of a raw generation.

    Exactly: remove one leading ``Answer:`` label (case-insensitive, surrounding whitespace included),
    then keep the first line that is not blank, stripped of surrounding whitespace. Returns "" if
    nothing is left. Punctuation and articles are left alone: :func:`normalize_answer` handles them.
    """
    text = _ANSWER_LABEL.sub("", text, count=1)
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def _require_golds(golds: Sequence[str]) -> Sequence[str]:
    if isinstance(golds, str) or not golds:
        raise ValueError(f"golds must be a non-empty list of answer strings, got {golds!r}")
    return golds
