"""What identifies a document from one ingest to the next, and which stored documents an ingest of a path covers.

A .txt/.md file is one document, keyed by its absolute path (the folder ingested, resolved, then the path inside it),
so the key is the same whatever the working directory and whether the folder or the file alone is ingested. A line
of a .jsonl file is keyed by that file and its "id", or for a line without one by the sha256 of its text: a line
inserted above leaves every key as it was (a line number would not), and an edited line without an id is a new
document that replaces the old one.

An ingest of a path covers the documents that could be read from there: a folder's .txt/.md files at any depth, a
file's own document, a .jsonl file's lines. Those it covers but no longer reads are gone from the source.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

TEXT_SUFFIXES = (".txt", ".md")
_JSONL_LINE = re.compile(r"(?P<file>.+\.jsonl):(?P<line>\d+)", re.IGNORECASE)  # a source recorded before keys


class DocumentKey(NamedTuple):
    file: str  # the file the document is read from, as an absolute path ("" for ADDED_BY_CALLER)
    entry: str  # "" for a .txt/.md file; for a .jsonl line "id=<id>", else "sha256=<hash of its text>"


# What passages added without a document (through the API, or by a caller's own documents) are linked to: no ingest
# covers it, so no ingest removes them.
ADDED_BY_CALLER = DocumentKey("", "")


def file_key(root: Path, path: Path) -> str:
    """The key file of ``path`` read under the folder ``root`` (the folder ingested, or the file's own folder)."""
    return str(root.resolve() / path.relative_to(root))


@dataclass(frozen=True)
class Scope:
    """The stored documents an ingest of ``path`` covers (:meth:`of`)."""

    path: str  # absolute
    folder: bool

    @classmethod
    def of(cls, source: str | os.PathLike[str]) -> Scope:
        source = Path(source)
        if source.is_dir():
            return cls(str(source.resolve()), folder=True)
        return cls(file_key(source.parent, source), folder=False)

    def document(self, key: DocumentKey) -> DocumentKey | None:
        """The stored document ``key`` as an ingest of this path reads it (None: it does not cover it)."""
        if key == ADDED_BY_CALLER:
            return None
        # A relative file is a source an older version recorded as given on the command line: read from here.
        key = DocumentKey(os.path.abspath(key.file), key.entry)
        if not self.folder:
            return key if key.file == self.path else None
        # A folder is read for its .txt/.md files only: a .jsonl inside it is a source of its own.
        text_file = key.entry == "" and key.file.lower().endswith(TEXT_SUFFIXES)
        return key if text_file and key.file.startswith(self.path + os.sep) else None


def legacy_key(source: str | None, document_id: Any) -> DocumentKey:
    """The document a passage of an index written before documents were tracked belongs to, from its recorded
    source (a file's path as given to ingest, "<file>:<line>" for a .jsonl line; None: added by a caller) and the
    "document" of its metadata (a .jsonl line's "id", else its line number: taken as an id, the best there is)."""
    if source is None:
        return ADDED_BY_CALLER
    if line := _JSONL_LINE.fullmatch(source):
        return DocumentKey(line["file"], f"id={document_id if document_id is not None else line['line']}")
    return DocumentKey(source, "")
