"""Splitting sources into passages: paragraphs, token windows, directory and jsonl loading."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from infoflow_rag.index import Document, load_source, split_paragraphs, split_token_windows
from infoflow_rag.index.documents import ADDED_BY_CALLER, DocumentKey, Scope, legacy_key


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
    key = DocumentKey(str(tmp_path.resolve() / "a.txt"), "")
    assert load_source(tmp_path / "a.txt") == [Document("a.txt", "alpha", str(tmp_path / "a.txt"), key=key)]


def test_load_source_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    lines = [
        json.dumps({"text": "first", "id": "d1", "title": "T", "metadata": {"year": 2020}}),
        "",
        json.dumps({"text": "second"}),
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    first, second = load_source(path)
    key = DocumentKey(str(path.resolve()), "id=d1")
    assert first == Document("d1", "first", f"{path}:1", "T", {"year": 2020}, key)
    assert (second.id, second.source, second.title, second.metadata) == ("3", f"{path}:3", None, {})
    assert second.key == DocumentKey(str(path.resolve()), f"sha256={hashlib.sha256(b'second').hexdigest()}")


def test_document_keys_do_not_depend_on_the_working_directory_or_on_lines_inserted_above(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "docs" / "sub").mkdir(parents=True)
    (tmp_path / "docs" / "sub" / "a.md").write_text("alpha", encoding="utf-8")
    (tmp_path / "docs" / "lines.jsonl").write_text('{"text": "x"}\n{"id": 7, "text": "y"}\n', encoding="utf-8")
    expected = DocumentKey(os.path.realpath(tmp_path / "docs" / "sub" / "a.md"), "")
    monkeypatch.chdir(tmp_path)
    keys = [load_source("docs")[0].key, load_source("docs/sub/a.md")[0].key]
    monkeypatch.chdir(tmp_path / "docs" / "sub")
    keys += [load_source("..")[0].key, load_source("a.md")[0].key, load_source(tmp_path / "docs")[0].key]
    assert keys == [expected] * 5
    before = [d.key for d in load_source(tmp_path / "docs" / "lines.jsonl")]
    (tmp_path / "docs" / "lines.jsonl").write_text(
        '{"text": "new first line"}\n{"text": "x"}\n{"id": 7, "text": "y edited"}\n', encoding="utf-8"
    )
    after = [d.key for d in load_source(tmp_path / "docs" / "lines.jsonl")]
    assert after[1:] == before and after[0] not in before


def test_an_ingest_covers_the_documents_that_could_be_read_from_its_path(tmp_path: Path) -> None:
    docs = os.path.realpath(tmp_path / "docs")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "data.jsonl").write_text("")
    a, b = DocumentKey(f"{docs}/a.md", ""), DocumentKey(f"{docs}/sub/b.txt", "")
    line = DocumentKey(f"{docs}/data.jsonl", "id=1")
    elsewhere = DocumentKey(f"{docs}-other/c.md", "")  # a folder whose name starts with the same letters
    folder, single, jsonl = Scope.of(tmp_path / "docs"), Scope.of(tmp_path / "docs" / "a.md"), Scope.of(line.file)
    assert [folder.document(k) for k in (a, b, line, elsewhere, ADDED_BY_CALLER)] == [a, b, None, None, None]
    assert [single.document(k) for k in (a, b, line)] == [a, None, None]
    other_line = DocumentKey(f"{docs}/data.jsonl", "sha256=00")
    assert [jsonl.document(k) for k in (a, line, other_line)] == [None, line, other_line]


def test_sources_recorded_before_document_keys_name_their_document(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "docs").mkdir()
    here = os.getcwd()
    assert legacy_key(None, None) == ADDED_BY_CALLER
    assert legacy_key("docs/a.md", "a.md") == DocumentKey("docs/a.md", "")
    assert legacy_key("docs/x.JSONL:12", "d7") == DocumentKey("docs/x.JSONL", "id=d7")  # the line's id
    assert legacy_key("notes:12", "notes") == DocumentKey("notes:12", "")  # not a .jsonl line
    # Relative, as ingest was given them: read from the working directory.
    assert Scope.of(tmp_path / "docs").document(legacy_key("docs/a.md", "a.md")) == (f"{here}/docs/a.md", "")
    assert Scope.of("docs/x.JSONL").document(legacy_key("docs/x.JSONL:12", "d7")) == (f"{here}/docs/x.JSONL", "id=d7")
    assert Scope.of("docs").document(legacy_key("docs/x.JSONL:12", "d7")) is None
