"""The checks every entry point applies to text before a tokenizer or an embedder sees it."""

from __future__ import annotations


def check_text(text: str, what: str) -> None:
    """Refuse ``text`` (``what`` it is: "the question", "a passage", a file's line) if it holds a lone UTF-16
    surrogate: no encoding can write one and tokenizers fail on it without saying where. It arrives from a JSON
    escape such as "\\ud800", or from a command-line argument holding bytes that are not UTF-8 (Python keeps each
    such byte as a surrogate)."""
    check_str(text, what)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        around = text[max(0, err.start - 20) : err.start + 20]
        raise ValueError(
            f"{what} is not valid text: character {err.start} is a lone surrogate ({text[err.start]!r}, in "
            f"{around!r}); send UTF-8 text (a JSON string's \\ud800-\\udfff escapes only in valid pairs)"
        ) from None


def check_str(value: object, what: str) -> None:
    """Refuse a ``value`` that is not a str (None, a number): a tokenizer or ``.strip()`` would fail without naming
    ``what`` it is."""
    if not isinstance(value, str):
        raise TypeError(f"{what} must be text (a str), got {type(value).__name__}: {value!r:.60}")


def check_text_list(items: object, name: str) -> None:
    """Refuse one text where a list of them is due (``name``: "passages", say): iterated, it would be one item per
    character."""
    if isinstance(items, str | bytes):
        raise TypeError(
            f"{name} must be a list, not one {type(items).__name__} (it would be read a character at a time): "
            f"{items!r:.60}; wrap it in a list"
        )
