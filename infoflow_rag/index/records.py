"""Passage records in SQLite: the source of truth for passage ids, text and metadata."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from infoflow_rag.closing import Closing

_SCHEMA = """
CREATE TABLE IF NOT EXISTS passages (
    id INTEGER PRIMARY KEY,
    text TEXT NOT NULL,
    source TEXT,
    metadata TEXT NOT NULL,
    content_hash TEXT NOT NULL UNIQUE,
    n_tokens INTEGER,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)
"""
_COLUMNS = "id, text, source, metadata, content_hash, n_tokens, created_at"
_MAX_PARAMS = 500  # ids per IN (...) query, well under SQLite's bound-parameter limit


@dataclass(frozen=True)
class PassageRecord:
    id: int
    text: str
    source: str | None
    metadata: dict[str, Any]
    content_hash: str  # sha256 hex of the UTF-8 text
    n_tokens: int | None
    created_at: str  # ISO-8601, UTC


@dataclass(frozen=True)
class AddResult:
    ids: list[int]  # one per input text, in order; a duplicate text gets the existing id
    new_ids: list[int]  # ids created by this call, in order


def content_hash(text: str) -> str:
    """The dedupe key of a passage: sha256 of its exact UTF-8 text."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _record(row: tuple[Any, ...]) -> PassageRecord:
    id_, text, source, metadata, hash_, n_tokens, created_at = row
    return PassageRecord(id_, text, source, json.loads(metadata), hash_, n_tokens, created_at)


def _check_lengths(texts: Sequence[str], **columns: Sequence[Any] | None) -> None:
    for name, values in columns.items():
        if values is not None and len(values) != len(texts):
            raise ValueError(f"{name} has {len(values)} entries for {len(texts)} texts; pass one per text or None")


class PassageRecords(Closing):
    """A ``passages`` table in a WAL-mode SQLite file; every ``add_many`` is one transaction.

    Single writer per file; readers in other processes are fine (WAL). One connection may be used from
    several threads (frameworks run retrievers in thread pools): a lock serialises its use.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = path
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(path, check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode=WAL")
        # FULL, not WAL's usual NORMAL: the FAISS file is written after our commit and must never
        # reference ids that a power loss could roll back (and a later insert reuse).
        self._conn.execute("PRAGMA synchronous=FULL")
        with self._conn:
            self._conn.executescript(_SCHEMA)

    def add_many(
        self,
        texts: Sequence[str],
        sources: Sequence[str | None] | None = None,
        metadatas: Sequence[dict[str, Any]] | None = None,
        n_tokens: Sequence[int | None] | None = None,
    ) -> AddResult:
        """Insert the texts not stored yet (deduplicated by content hash), all or nothing."""
        _check_lengths(texts, sources=sources, metadatas=metadatas, n_tokens=n_tokens)
        created_at = datetime.now(UTC).isoformat(timespec="seconds")
        ids, new_ids = [], []
        with self._lock, self._conn:  # commits on success, rolls the whole batch back on any error
            for i, text in enumerate(texts):
                hash_ = content_hash(text)
                cursor = self._conn.execute(
                    "INSERT INTO passages (text, source, metadata, content_hash, n_tokens, created_at) "
                    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(content_hash) DO NOTHING",
                    (
                        text,
                        sources[i] if sources is not None else None,
                        json.dumps(metadatas[i] if metadatas is not None else {}, ensure_ascii=False),
                        hash_,
                        n_tokens[i] if n_tokens is not None else None,
                        created_at,
                    ),
                )
                if cursor.rowcount:
                    ids.append(cursor.lastrowid)
                    new_ids.append(cursor.lastrowid)
                else:
                    ids.append(
                        self._conn.execute("SELECT id FROM passages WHERE content_hash = ?", (hash_,)).fetchone()[0]
                    )
        return AddResult(ids, new_ids)

    def get_many(self, ids: Sequence[int]) -> list[PassageRecord]:
        """Records for ``ids``, in that order; KeyError naming any id that does not exist."""
        found: dict[int, PassageRecord] = {}
        unique = list(dict.fromkeys(int(i) for i in ids))
        for start in range(0, len(unique), _MAX_PARAMS):
            chunk = unique[start : start + _MAX_PARAMS]
            rows = self._fetch(f"SELECT {_COLUMNS} FROM passages WHERE id IN ({','.join('?' * len(chunk))})", chunk)
            found.update((row[0], _record(row)) for row in rows)
        missing = [i for i in unique if i not in found]
        if missing:
            raise KeyError(f"no passages with ids {missing[:10]}{' ...' if len(missing) > 10 else ''}")
        return [found[int(i)] for i in ids]

    def ids(self) -> list[int]:
        """All passage ids, ascending."""
        return [row[0] for row in self._fetch("SELECT id FROM passages ORDER BY id")]

    @property
    def identity(self) -> str | None:
        """The identity of the passage index these records belong to (None: never stamped)."""
        rows = self._fetch("SELECT value FROM meta WHERE key = 'identity'")
        return rows[0][0] if rows else None

    @identity.setter
    def identity(self, value: str) -> None:
        with self._lock, self._conn:
            self._conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('identity', ?)", (value,))

    def count(self) -> int:
        return self._fetch("SELECT COUNT(*) FROM passages")[0][0]

    def _fetch(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    def __len__(self) -> int:
        return self.count()

    def __iter__(self) -> Iterator[PassageRecord]:
        """All records by ascending id."""
        return map(_record, self._fetch(f"SELECT {_COLUMNS} FROM passages ORDER BY id"))

    def close(self) -> None:
        self._conn.close()
