"""Passage records in SQLite: the source of truth for passage ids, text and metadata, and for which documents hold
each passage."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from infoflow_rag.closing import Closing
from infoflow_rag.index.documents import ADDED_BY_CALLER, DocumentKey, legacy_key

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
# Which documents hold each passage (a passage, stored once per text, may be in several); made when records are
# first opened for writing, and for an index of an older version filled from its passages' sources.
_LINKS_SCHEMA = (
    "CREATE TABLE document_passages (file TEXT NOT NULL, entry TEXT NOT NULL, passage_id INTEGER NOT NULL, "
    "PRIMARY KEY (file, entry, passage_id)) WITHOUT ROWID",
    "CREATE INDEX document_passages_by_passage ON document_passages (passage_id)",
)
# The highest passage id ever given. SQLite gives a new row the highest id in the table plus one, so once the last
# passages are removed their ids would come again, and a vector a removal cut short (or another process) still holds
# for one would be found as the new passage's. Removals record it in meta; a new passage's id is above both.
_HIGHEST_ID = (
    "(SELECT MAX(n) FROM (SELECT MAX(id) AS n FROM passages "
    "UNION ALL SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'highest_id'))"
)
_COLUMNS = "id, text, source, metadata, content_hash, n_tokens, created_at"
_HELD_BY = "SELECT passage_id FROM document_passages WHERE file = ? AND entry = ?"
_HOLDERS = "SELECT 1 FROM document_passages WHERE passage_id = ? LIMIT 1"
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


@dataclass(frozen=True)
class Removal:
    documents: int  # documents gone from the source, all their links dropped
    passage_ids: list[int]  # passages removed: no document holds them any more


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


def _connect_read_only(path: Path) -> sqlite3.Connection:
    """A connection to the existing database at ``path`` that never writes it.

    ``mode=ro`` first: it keeps SQLite's locks and reads the WAL, so commits of a process writing the index
    through a writable path are seen, whole. It needs the ``-shm`` file to exist or be creatable. Where neither
    holds (a read-only mount, a directory this process may not write), ``immutable=1``: no locks, no WAL, the
    main file alone. Right only while nothing writes it, which a writer would announce by creating ``-wal`` and
    ``-shm`` next to it; so it is used only with no WAL commits there, which it would silently skip.
    """
    uri = path.absolute().as_uri()
    conn = sqlite3.connect(f"{uri}?mode=ro", uri=True, check_same_thread=False)
    try:
        conn.execute("SELECT 1 FROM sqlite_master").fetchall()  # opens the file and its WAL index now
        return conn
    except sqlite3.OperationalError as e:
        conn.close()
        if e.sqlite_errorname not in ("SQLITE_CANTOPEN", "SQLITE_READONLY_DIRECTORY"):
            raise
    wal = Path(f"{path}-wal")
    if wal.exists() and wal.stat().st_size:
        raise PermissionError(
            f"{wal} holds commits SQLite can only read after creating {path.name}-shm, and {path.parent} is not "
            f"writable: open it once with write access (that moves the commits into {path.name})"
        )
    return sqlite3.connect(f"{uri}?mode=ro&immutable=1", uri=True, check_same_thread=False)


class PassageRecords(Closing):
    """A ``passages`` table in a WAL-mode SQLite file, and which documents hold each passage (``document_passages``);
    every ``add_many`` and ``replace_documents`` is one transaction.

    Single writer per file; readers in other processes are fine (WAL). One connection may be used from
    several threads (frameworks run retrievers in thread pools): a lock serialises its use.

    ``create=False`` opens existing records only: a file without the ``passages`` table (empty, or another
    database) is a ``sqlite3.DatabaseError``, never given a schema. ``read_only=True`` (implies ``create=False``)
    reads a file this process may not write, writing nothing; ``add_many`` then fails.
    """

    def __init__(self, path: str | os.PathLike[str], *, create: bool = True, read_only: bool = False) -> None:
        self.path = path
        self.read_only = read_only
        self._lock = threading.RLock()
        self._conn = _connect_read_only(Path(path)) if read_only else sqlite3.connect(path, check_same_thread=False)
        try:
            tables = {name for (name,) in self._conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if (read_only or not create) and "passages" not in tables:
                raise sqlite3.DatabaseError("it holds no passages table: the file is empty or another database")
            self._has_meta = "meta" in tables or not read_only
            if not read_only:
                self._conn.execute("PRAGMA journal_mode=WAL")
                # FULL, not WAL's usual NORMAL: the FAISS file is written after our commit and must never
                # reference ids that a power loss could roll back (and a later insert reuse).
                self._conn.execute("PRAGMA synchronous=FULL")
                with self._conn:
                    self._conn.executescript(_SCHEMA)  # also adds the meta table records of index format 1 lack
                self._link_documents()
        except BaseException:
            self._conn.close()
            raise

    def _link_documents(self) -> None:
        """Make the document links table once, linking each stored passage to the document its source names."""
        exists = "SELECT 1 FROM sqlite_master WHERE name = 'document_passages'"
        if self._fetch(exists):  # as it mostly is: no write lock taken
            return
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")  # a second process opening at once waits, then finds the table
            try:
                if not self._conn.execute(exists).fetchall():
                    for statement in _LINKS_SCHEMA:
                        self._conn.execute(statement)
                    rows = self._conn.execute("SELECT id, source, metadata FROM passages").fetchall()
                    self._conn.executemany(
                        "INSERT INTO document_passages VALUES (?, ?, ?)",
                        ((*legacy_key(source, json.loads(meta).get("document")), i) for i, source, meta in rows),
                    )
                self._conn.commit()
            except BaseException:
                self._conn.rollback()
                raise

    def add_many(
        self,
        texts: Sequence[str],
        sources: Sequence[str | None] | None = None,
        metadatas: Sequence[dict[str, Any]] | None = None,
        n_tokens: Sequence[int | None] | None = None,
        documents: Sequence[DocumentKey | None] | None = None,
    ) -> AddResult:
        """Insert the texts not stored yet (deduplicated by content hash), all or nothing, and link each passage to
        its document (None: to :data:`ADDED_BY_CALLER`, which no ingest removes)."""
        _check_lengths(texts, sources=sources, metadatas=metadatas, n_tokens=n_tokens, documents=documents)
        created_at = datetime.now(UTC).isoformat(timespec="seconds")
        ids, new_ids = [], []
        with self._lock, self._conn:  # commits on success, rolls the whole batch back on any error
            for i, text in enumerate(texts):
                hash_ = content_hash(text)
                cursor = self._conn.execute(
                    "INSERT INTO passages (id, text, source, metadata, content_hash, n_tokens, created_at) "
                    f"VALUES ({_HIGHEST_ID} + 1, ?, ?, ?, ?, ?, ?) ON CONFLICT(content_hash) DO NOTHING",
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
            holders = documents if documents is not None else [None] * len(texts)
            self._conn.executemany(
                "INSERT OR IGNORE INTO document_passages VALUES (?, ?, ?)",
                ((*(holder or ADDED_BY_CALLER), passage_id) for holder, passage_id in zip(holders, ids, strict=True)),
            )
        return AddResult(ids, new_ids)

    def replace_documents(
        self, held: Mapping[DocumentKey, Collection[int]], covered: Callable[[DocumentKey], DocumentKey | None]
    ) -> Removal:
        """Each stored document ``covered`` names (by its key of now: see :meth:`Scope.document`) holds only the
        passage ids ``held`` gives it, none if it is not there (gone); the passages no document holds any more are
        removed. All or nothing."""
        with self._lock, self._conn:
            stored = [
                DocumentKey(*row) for row in self._conn.execute("SELECT DISTINCT file, entry FROM document_passages")
            ]
            gone: set[DocumentKey] = set()
            unlinked: set[int] = set()
            for key in stored:
                if (now := covered(key)) is None:
                    continue
                if now not in held:
                    gone.add(now)
                extra = {i for (i,) in self._fetch(_HELD_BY, key)} - set(held.get(now, ()))
                self._conn.executemany(
                    "DELETE FROM document_passages WHERE file = ? AND entry = ? AND passage_id = ?",
                    ((*key, i) for i in extra),
                )
                unlinked |= extra
            orphans = sorted(i for i in unlinked if not self._fetch(_HOLDERS, (i,)))
            if orphans:
                self._conn.execute(f"INSERT OR REPLACE INTO meta VALUES ('highest_id', {_HIGHEST_ID})")
                self._conn.execute(
                    "INSERT INTO meta VALUES ('removals', 1) ON CONFLICT (key) DO UPDATE SET value = value + 1"
                )
                self._conn.executemany("DELETE FROM passages WHERE id = ?", ((i,) for i in orphans))
        return Removal(len(gone), orphans)

    def find_many(self, ids: Sequence[int]) -> dict[int, PassageRecord]:
        """The records of those of ``ids`` that exist, by id."""
        found: dict[int, PassageRecord] = {}
        unique = list(dict.fromkeys(int(i) for i in ids))
        for start in range(0, len(unique), _MAX_PARAMS):
            chunk = unique[start : start + _MAX_PARAMS]
            rows = self._fetch(f"SELECT {_COLUMNS} FROM passages WHERE id IN ({','.join('?' * len(chunk))})", chunk)
            found.update((row[0], _record(row)) for row in rows)
        return found

    def get_many(self, ids: Sequence[int]) -> list[PassageRecord]:
        """Records for ``ids``, in that order; KeyError naming any id that does not exist."""
        found = self.find_many(ids)
        missing = [i for i in dict.fromkeys(int(i) for i in ids) if i not in found]
        if missing:
            raise KeyError(f"no passages with ids {missing[:10]}{' ...' if len(missing) > 10 else ''}")
        return [found[int(i)] for i in ids]

    def ids(self) -> list[int]:
        """All passage ids, ascending."""
        return [row[0] for row in self._fetch("SELECT id FROM passages ORDER BY id")]

    @property
    def identity(self) -> str | None:
        """The identity of the passage index these records belong to (None: never stamped)."""
        rows = self._fetch("SELECT value FROM meta WHERE key = 'identity'") if self._has_meta else []
        return rows[0][0] if rows else None

    @identity.setter
    def identity(self, value: str) -> None:
        with self._lock, self._conn:
            self._conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('identity', ?)", (value,))

    @property
    def highest_removed(self) -> int:
        """No id above this was ever removed (0: none was), so a vector of a higher id without a record is not a
        removed passage's but another index's."""
        return self._meta_int("highest_id")

    @property
    def removals(self) -> int:
        """How many removals these records have seen, by any process: a change means passages went."""
        return self._meta_int("removals")

    def _meta_int(self, key: str) -> int:
        rows = self._fetch("SELECT CAST(value AS INTEGER) FROM meta WHERE key = ?", (key,)) if self._has_meta else []
        return rows[0][0] if rows else 0

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
