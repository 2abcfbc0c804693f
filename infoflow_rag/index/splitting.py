"""Turn sources into passages: documents from files, paragraphs, fixed token windows. Model-free."""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from ..text import check_text
from .documents import TEXT_SUFFIXES, DocumentKey, file_key
from .records import content_hash

T = TypeVar("T")

logger = logging.getLogger(__name__)

MIN_WINDOW = 8  # tokens: ingest's smallest passage window (smaller ones are mostly template, not text)
_BLANK_LINE = re.compile(r"\n\s*\n")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@dataclass(frozen=True)
class Document:
    """One source text before splitting."""

    id: str  # relative path for files, the "id" field (else the line number) for jsonl
    text: str
    source: str  # file path, or "<file>:<line>" for jsonl
    title: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    key: DocumentKey | None = None  # what identifies it from one ingest to the next; None: not read from a file


@dataclass(frozen=True)
class TokenWindow:
    """``token_ids[start : start + size]`` of the full sequence."""

    start: int
    token_ids: list[int]
    text: str | None  # the window detokenized, when a detokenize callable was given


def split_paragraphs(text: str, max_chars: int | None = None) -> list[str]:
    """Blank-line separated paragraphs, stripped, empties dropped.

    With ``max_chars``, a longer paragraph is cut at sentence ends into greedy chunks of at most
    ``max_chars`` (sentences re-joined by one space); a single sentence longer than that stays whole.
    """
    if max_chars is not None and max_chars <= 0:
        raise ValueError(f"max_chars must be positive, got {max_chars}")
    paragraphs = [p.strip() for p in _BLANK_LINE.split(text.replace("\r\n", "\n"))]
    chunks = []
    for paragraph in filter(None, paragraphs):
        if max_chars is None or len(paragraph) <= max_chars:
            chunks.append(paragraph)
        else:
            chunks.extend(_pack_sentences(paragraph, max_chars))
    return chunks


def _pack_sentences(paragraph: str, max_chars: int) -> list[str]:
    chunks: list[str] = []
    current = ""
    for sentence in _SENTENCE_END.split(paragraph):
        candidate = f"{current} {sentence}" if current else sentence
        if current and len(candidate) > max_chars:
            chunks.append(current)
            current = sentence
        else:
            current = candidate
    chunks.append(current)
    return chunks


def token_windows(tokens: Sequence[T], size: int) -> list[list[T]]:
    """``tokens`` in consecutive non-overlapping windows of ``size`` (the last may be shorter)."""
    if size <= 0:
        raise ValueError(f"window size must be positive, got {size}")
    return [list(tokens[start : start + size]) for start in range(0, len(tokens), size)]


def split_token_windows(
    source: str | Sequence[int],
    size: int,
    *,
    tokenize: Callable[[str], Sequence[int]] | None = None,
    detokenize: Callable[[list[int]], str] | None = None,
) -> list[TokenWindow]:
    """Consecutive non-overlapping windows of ``size`` tokens (the last may be shorter).

    ``source`` is token ids, or text split with ``tokenize`` (e.g. a tokenizer's encode without
    special tokens); ``detokenize`` fills each window's ``text``.
    """
    if isinstance(source, str):
        if tokenize is None:
            raise ValueError("splitting text needs tokenize=...; pass the tokenizer's encode function")
        source = tokenize(source)
    ids = [int(t) for t in source]
    return [
        TokenWindow(i * size, window, detokenize(window) if detokenize else None)
        for i, window in enumerate(token_windows(ids, size))
    ]


def load_source(
    path: str | os.PathLike[str], *, strict_utf8: bool = False, follow_symlinks: bool = False
) -> list[Document]:
    """Documents from a directory of .txt/.md files (recursive, sorted), one such file, or a .jsonl file.

    jsonl lines are objects with "text" and optional "id", "title", "metadata"; blank lines are
    skipped and a malformed line raises ValueError naming its line number.

    A file (or jsonl line) that is not UTF-8 is skipped with a warning naming it, or refused with a
    ValueError when ``strict_utf8``. In a directory, files and folders whose real location is outside it (reached
    through a symlink) are skipped with a warning unless ``follow_symlinks``, which reads linked folders too.
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(_text_files(path, follow_symlinks), key=lambda p: p.relative_to(path).as_posix())
        documents = (_read_text(path, p, strict_utf8) for p in files)
        return [doc for doc in documents if doc is not None]
    if not path.exists():
        raise FileNotFoundError(
            f"no such source: {path}; pass a folder of .txt/.md files, one such file, or a .jsonl file"
        )
    if path.suffix.lower() == ".jsonl":
        return _read_jsonl(path, strict_utf8)
    if path.suffix.lower() in TEXT_SUFFIXES:
        doc = _read_text(path.parent, path, strict_utf8)
        return [doc] if doc is not None else []
    raise ValueError(f"cannot load {path}: expected a directory of .txt/.md files, a .txt/.md file or a .jsonl file")


def _text_files(folder: Path, follow_symlinks: bool) -> list[Path]:
    """The .txt/.md files under ``folder``; links leading outside it are skipped, with a warning, unless
    ``follow_symlinks`` (then linked folders are walked too, each real folder once: a link cycle ends)."""
    root, files, walked = folder.resolve(), [], set()

    def outside(p: Path) -> bool:
        if follow_symlinks or p.resolve().is_relative_to(root):
            return False
        logger.warning("skipping %s: it links to %s, outside %s (--follow-symlinks reads it)", p, p.resolve(), folder)
        return True

    for here, folders, names in os.walk(folder, followlinks=follow_symlinks):
        if (real := os.path.realpath(here)) in walked:
            folders.clear()
            continue
        walked.add(real)
        folders[:] = [name for name in folders if not outside(Path(here, name))]  # os.walk descends into these
        candidates = (Path(here, name) for name in names if Path(name).suffix.lower() in TEXT_SUFFIXES)
        files += [p for p in candidates if p.is_file() and not outside(p)]
    return files


def _not_utf8(where: str, error: UnicodeDecodeError, strict: bool) -> None:
    """Refuse (strict) or skip with a warning: either way the reader hears which file and where."""
    problem = f"{where} is not UTF-8 (byte 0x{error.object[error.start]:02x} at offset {error.start})"
    if strict:
        raise ValueError(f"{problem}; convert it to UTF-8 or drop --strict-utf8 to skip it")
    logger.warning("skipped: %s; convert it to UTF-8 to ingest it", problem)


def _read_text(root: Path, path: Path, strict_utf8: bool) -> Document | None:
    """The document of the file ``path``, read under the folder ``root``."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        _not_utf8(str(path), e, strict_utf8)
        return None
    key = DocumentKey(file_key(root, path), "")
    return Document(id=path.relative_to(root).as_posix(), text=text, source=str(path), key=key)


def _read_jsonl(path: Path, strict_utf8: bool) -> list[Document]:
    documents, file = [], file_key(path.parent, path)
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                _not_utf8(f"{path}:{line_no}", e, strict_utf8)
                continue
            if line.strip():
                documents.append(_parse_jsonl_line(line, f"{path}:{line_no}", line_no, file))
    return documents


def _parse_jsonl_line(line: str, where: str, line_no: int, file: str) -> Document:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from e
    if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
        raise ValueError(f'{where}: expected an object with a string "text" field')
    title, metadata = obj.get("title"), obj.get("metadata", {})
    if title is not None and not isinstance(title, str):
        raise ValueError(f'{where}: "title" must be a string, got {type(title).__name__}')
    if not isinstance(metadata, dict):
        raise ValueError(f'{where}: "metadata" must be an object, got {type(metadata).__name__}')
    for name in ("text", "title"):
        if obj.get(name) is not None:
            check_text(obj[name], f'{where}: "{name}"')
    doc_id = str(obj.get("id", line_no))
    # By its id, else by its text: a line number changes when a line is inserted above.
    key = DocumentKey(file, f"id={doc_id}" if "id" in obj else f"sha256={content_hash(obj['text'])}")
    return Document(id=doc_id, text=obj["text"], source=where, title=title, metadata=metadata, key=key)
