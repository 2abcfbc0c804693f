"""An index directory's files: their names, index.json read and checked, the records and vectors opened, and the
errors that name the fix for each file that is missing, unreadable or not this process's to write."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path
from typing import Any

from infoflow_rag.errors import IndexIntegrityError, ReadOnlyIndexError
from infoflow_rag.index.faiss_index import IndexSpec, VectorIndex, stored_count
from infoflow_rag.index.records import PassageRecords

FORMAT_VERSION = 2  # 2: the three files carry the index identity
RECORDS_FILE = "passages.sqlite"
VECTORS_FILE = "vectors.faiss"
META_FILE = "index.json"
CREATE_LOCK = ".create.lock"  # held from the check that no index exists until index.json is written


def repair_hint(directory: Path) -> str:
    return f"rebuild the vectors from the passage records with: infoflow-rag index repair {directory}"


def reingest_hint(directory: Path) -> str:
    return (
        "the passage texts cannot be recovered from the other files: delete the directory and ingest the source "
        f"again (infoflow-rag ingest SOURCE --index {directory})"
    )


def read_only_error(directory: Path, consequence: str) -> ReadOnlyIndexError:
    return ReadOnlyIndexError(f"{directory} is read-only (this process may not write it): {consequence}")


def writable(directory: Path) -> bool:
    """Whether this process may write the index: new files in the directory, and the records file in place."""
    return allowed(os.W_OK, directory, directory / RECORDS_FILE)


def allowed(mode: int, *paths: Path) -> bool:
    """Whether this process may ``mode`` (os.R_OK, os.W_OK) every path, with the effective ids (and, for root,
    capabilities) that its reads and writes use."""
    effective = os.access in os.supports_effective_ids
    return all(os.access(path, mode, effective_ids=effective) for path in paths)


def open_records(directory: Path, create: bool = False, read_only: bool = False) -> PassageRecords:
    """The records of a new index (``create``), else of an existing one, whose schema is never created here."""
    path = directory / RECORDS_FILE
    if not create and not directory.is_dir():
        raise FileNotFoundError(
            f"no index directory {directory}; build one with: infoflow-rag ingest SOURCE --index {directory}"
        )
    if not create and not path.is_file():
        raise IndexIntegrityError(f"{path} is missing; {reingest_hint(directory)}")
    if not create and not allowed(os.R_OK, path):  # SQLite would only say "unable to open", read as a lost file
        raise PermissionError(f"{path} is not readable by this process (its permissions); give it read access")
    try:
        return PassageRecords(path, create=create, read_only=read_only)
    except PermissionError as e:  # readable only by a process that may write the directory
        raise read_only_error(directory, str(e)) from e
    except sqlite3.DatabaseError as e:
        raise IndexIntegrityError(f"{path} is unreadable ({e}); {reingest_hint(directory)}") from e


def load_vectors(directory: Path, spec: IndexSpec) -> VectorIndex:
    path = directory / VECTORS_FILE
    if not path.is_file():
        raise IndexIntegrityError(f"{path} is missing; {repair_hint(directory)}")
    try:
        return VectorIndex.load(path, spec)
    except ValueError as e:
        raise IndexIntegrityError(f"{e}; {repair_hint(directory)}") from e


def vectors_held(directory: Path) -> int:
    """How many vectors the vectors file holds; 0 if it is missing or unreadable (then it holds nothing to keep)."""
    try:
        return stored_count(directory / VECTORS_FILE)
    except (OSError, ValueError):
        return 0


def read_meta(directory: Path) -> dict[str, Any]:
    """index.json, checked; FileNotFoundError if the directory holds no index at all."""
    path = directory / META_FILE
    if not path.exists():
        if (directory / RECORDS_FILE).exists():
            raise IndexIntegrityError(f"{path} is missing; {repair_hint(directory)}")
        raise FileNotFoundError(f"{directory} is not a passage index (no {META_FILE}); use PassageIndex.create")
    meta = readable_meta(directory)
    if meta.get("format_version") == 1:
        raise IndexIntegrityError(
            f"{directory} was written by an older infoflow-rag, without the identity that ties its files "
            f"together; {repair_hint(directory)}"
        )
    fields = {"format_version", "identity", "embedder", "dim", "kind", "params"}
    if meta.get("format_version") != FORMAT_VERSION or not fields <= set(meta):
        raise IndexIntegrityError(
            f"{path} is unreadable or of an unknown format (version {meta.get('format_version')!r}, expected "
            f"{FORMAT_VERSION} with fields {sorted(fields)}); {repair_hint(directory)}"
        )
    return meta


def readable_meta(directory: Path) -> dict[str, Any]:
    """What index.json holds, or {} if it is missing or unreadable (repair then falls back to defaults)."""
    try:
        meta = json.loads((directory / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # JSON and UTF-8 errors are ValueErrors
        return {}
    return meta if isinstance(meta, dict) else {}
