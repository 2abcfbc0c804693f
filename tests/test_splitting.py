"""Splitting sources into passages: paragraphs, token windows, directory and jsonl loading."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from infoflow_rag.index import Document, load_source, split_paragraphs, split_token_windows


class WhitespaceTokenizer:
    """Words <-> ids, assigned in order of first appearance."""

    def __init__(self) -> None:
        self.vocabulary: dict[str, int] = {}

    def tokenize(self, text: str) -> list[int]:
        return [self.vocabulary.setdefault(word, len(self.vocabulary)) for word in text.split()]

    def detokenize(self, ids: list[int]) -> str:
        words = {i: word for word, i in self.vocabulary.items()}
        return " ".join(words[i] for i in ids)


def test_split_paragraphs_on_blank_lines() -> None:
    text = "  First para,\nstill first.\n\n\n Second. \r\n   \r\nThird\n\n\n\n"
    assert split_paragraphs(text) == ["First para,\nstill first.", "Second.", "Third"]
    assert split_paragraphs(" \n\n ") == []


def test_split_paragraphs_cuts_long_ones_at_sentence_ends() -> None:
    long = "One two three. Four five six! Seven eight nine? Ten."
    assert split_paragraphs(f"Short one.\n\n{long}", max_chars=30) == [
        "Short one.",
        "One two three. Four five six!",
        "Seven eight nine? Ten.",
    ]
    assert split_paragraphs("A sentence far longer than the limit. Ok.", max_chars=10) == [
        "A sentence far longer than the limit.",
        "Ok.",
    ]
    with pytest.raises(ValueError, match="max_chars must be positive"):
        split_paragraphs("x", max_chars=0)


def test_split_token_windows_from_text_and_ids() -> None:
    tok = WhitespaceTokenizer()
    windows = split_token_windows("a b c d e f g h i j", 4, tokenize=tok.tokenize, detokenize=tok.detokenize)
    assert [w.start for w in windows] == [0, 4, 8]
    assert [w.token_ids for w in windows] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert [w.text for w in windows] == ["a b c d", "e f g h", "i j"]
    from_ids = split_token_windows([5, 6, 7], 2)
    assert [(w.token_ids, w.text) for w in from_ids] == [([5, 6], None), ([7], None)]
    assert split_token_windows([], 3) == []


def test_split_token_windows_names_bad_arguments() -> None:
    with pytest.raises(ValueError, match="needs tokenize"):
        split_token_windows("some text", 4)
    with pytest.raises(ValueError, match="window size must be positive, got 0"):
        split_token_windows([1, 2], 0)


def test_load_source_directory_is_recursive_sorted_and_filtered(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.md").write_text("# Zed\n\nbody", encoding="utf-8")
    (tmp_path / "a.txt").write_text("alpha", encoding="utf-8")
    (tmp_path / "b" / "c.TXT").write_text("gamma", encoding="utf-8")
    (tmp_path / "ignored.json").write_text("{}", encoding="utf-8")
    docs = load_source(tmp_path)
    assert [(d.id, d.text) for d in docs] == [
        ("a.txt", "alpha"),
        ("b/c.TXT", "gamma"),
        ("b/z.md", "# Zed\n\nbody"),
    ]
    assert docs[0].source == str(tmp_path / "a.txt")
    assert load_source(tmp_path / "a.txt") == [Document("a.txt", "alpha", str(tmp_path / "a.txt"))]


def test_load_source_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    lines = [
        json.dumps({"text": "first", "id": "d1", "title": "T", "metadata": {"year": 2020}}),
        "",
        json.dumps({"text": "second"}),
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    first, second = load_source(path)
    assert first == Document("d1", "first", f"{path}:1", "T", {"year": 2020})
    assert (second.id, second.source, second.title, second.metadata) == ("3", f"{path}:3", None, {})


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ('{"text": "unterminated', "invalid JSON"),
        ('{"title": "no text"}', 'string "text" field'),
        ('["text"]', 'string "text" field'),
        ('{"text": "x", "metadata": [1]}', '"metadata" must be an object'),
        ('{"text": "caf\\ud800 x"}', '"text" is not valid text: character 3 is a lone surrogate'),
        ('{"text": "x", "title": "\\udfff"}', '"title" is not valid text'),
    ],
)
def test_load_source_jsonl_error_names_the_line(tmp_path: Path, bad_line: str, message: str) -> None:
    path = tmp_path / "docs.jsonl"
    path.write_text(f'{{"text": "ok"}}\n\n{bad_line}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=f"docs.jsonl:3: .*{message}"):
        load_source(path)


def test_load_source_rejects_unknown_paths(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such source"):
        load_source(tmp_path / "missing.jsonl")
    (tmp_path / "data.csv").write_text("a,b", encoding="utf-8")
    with pytest.raises(ValueError, match="expected a directory of .txt/.md files"):
        load_source(tmp_path / "data.csv")
