"""A passage index in one directory: SQLite records + FAISS vectors + index.json.

Layout: ``passages.sqlite`` (ids, text, metadata; the source of truth), ``vectors.faiss`` (one
vector per passage id) and ``index.json`` (format version, embedder name, dim, index kind and
params; written last by ``create``, so its presence marks a complete index), beside an empty ``.create.lock``.

Crash-safety rule: records are committed before vectors are written, and the FAISS file is only
ever replaced atomically. So at any instant every FAISS id is a record's or a removed passage's: a kill between
the two writes leaves records without vectors, or vectors of passages removed. Search
returns only passages with a record, and ``PassageIndex.open`` repairs the rest: it embeds and adds exactly the
records without a vector, and drops the vectors without a record. Removed ids are never given again.

Removal: a passage goes when no document holds it any more (:meth:`replace_documents`, which ingest calls). Flat and
IVF drop its vector at once. HNSW cannot remove one without building its graph anew, which costs about as much as
building the index, so its vectors of removed passages stay, skipped by search (which fetches more to still return
k hits), until they are more than the live ones: the graph is then rebuilt from the vectors kept. So the rebuilds
cost little per removed passage, and a search rarely has to fetch more than twice k.

Identity: ``create`` draws a random identity and writes it into all three files. ``open`` refuses files that
do not share it (a recreated ``passages.sqlite`` next to old vectors would retrieve the wrong passages with
high scores), and any missing or unreadable file, with an :class:`IndexIntegrityError` that names the fix.
``repair`` rebuilds the vectors and ``index.json`` from the records, under a new identity.

Read-only: an index this process may not write (a read-only mount, a copy it does not own) opens for search and
reading, writing nothing; adding to it or repairing it is a :class:`ReadOnlyIndexError`.

Threads may share one ``PassageIndex``: its lock keeps FAISS from being searched while it grows (FAISS releases
the GIL, and a search during an add reads freed memory) and keeps two adds from adding the same vectors twice.
Processes: creates are one at a time per directory (a lock file, ``.create.lock``; the second finds the first's
index and :meth:`create` refuses, ``Pipeline.open`` opens it); two processes adding at once keep the records whole,
and vectors one wrote over the other's are embedded again by the next :meth:`open`, as after a kill.
"""

from __future__ import annotations

import json
import logging
import numbers
import os
import threading
import uuid
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock

from infoflow_rag.closing import Closing
from infoflow_rag.errors import IndexIntegrityError
from infoflow_rag.files import atomic_write, remove_stale_temps
from infoflow_rag.index.documents import DocumentKey, Scope
from infoflow_rag.index.embedder import DEFAULT_MODEL, Embedder, TextEmbedder
from infoflow_rag.index.faiss_index import IndexSpec, VectorIndex, check_index_params
from infoflow_rag.index.index_files import (
    CREATE_LOCK,
    FORMAT_VERSION,
    META_FILE,
    RECORDS_FILE,
    VECTORS_FILE,
    load_vectors,
    open_records,
    read_meta,
    read_only_error,
    readable_meta,
    reingest_hint,
    repair_hint,
    vectors_held,
    writable,
)
from infoflow_rag.index.records import AddResult, PassageRecord, PassageRecords, Removal

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Hit:
    id: int
    score: float  # inner product of normalised embeddings = cosine similarity
    text: str
    source: str | None
    metadata: dict[str, Any]


class PassageIndex(Closing):
    """Dense retrieval over deduplicated passages; build with :meth:`create` or :meth:`open`."""

    def __init__(self, directory: Path, records: PassageRecords, vectors: VectorIndex, embedder: TextEmbedder) -> None:
        self.directory = directory
        self.embedder = embedder
        self._records = records
        self._vectors = vectors
        self._lock = threading.RLock()  # around every FAISS read and write; embedding runs outside it
        self._dead = 0  # vectors of removed passages kept (HNSW, between rebuilds), as far as this process knows
        self._removals = -1  # records.removals when _dead was counted (-1: never counted)

    @classmethod
    def create(
        cls,
        directory: str | os.PathLike[str],
        embedder: TextEmbedder | None = None,
        kind: str = "flat",
        **params: int,
    ) -> PassageIndex:
        """A new empty index in ``directory`` (default embedder: the bundled all-MiniLM-L6-v2); ``kind`` and
        ``params`` as in :meth:`VectorIndex.create`."""
        directory = Path(directory)
        _refuse_existing(directory)  # before the directory is touched
        check_index_params(kind, params)  # before the directory is made or the embedder loads
        directory.mkdir(parents=True, exist_ok=True)
        # Two creates at once (two ingests into a new directory) each stamped an identity of their own, and the
        # files ended up disagreeing; under the lock the second finds index.json and is refused.
        with FileLock(directory / CREATE_LOCK):
            _refuse_existing(directory)
            return cls._create(directory, embedder, kind, params)

    @classmethod
    def _create(cls, directory: Path, embedder: TextEmbedder | None, kind: str, params: dict[str, int]) -> PassageIndex:
        records = open_records(directory, create=True)
        # Passages without index.json (a create killed before its end, or a lost file) are kept, never overwritten.
        # A create killed before it stored any passage is simply finished.
        if n := len(records):
            records.close()
            raise IndexIntegrityError(
                f"{directory / META_FILE} is missing, though {RECORDS_FILE} holds {n} passages; "
                f"{repair_hint(directory)}"
            )
        try:
            embedder = embedder if embedder is not None else Embedder()
            index = cls(directory, records, VectorIndex.create(embedder.dim, kind, **params), embedder)
            index._stamp(uuid.uuid4().hex)
        except BaseException:
            records.close()
            raise
        return index

    @classmethod
    def open(cls, directory: str | os.PathLike[str], embedder: TextEmbedder | None = None) -> PassageIndex:
        """The index in ``directory``, repaired if an add was interrupted (see the module docstring). Without
        ``embedder``, the one named in index.json is loaded (lazily, on first use)."""
        directory = Path(directory)
        meta = read_meta(directory)
        if embedder is None:
            embedder = Embedder(meta["embedder"])
        elif embedder.name != meta["embedder"]:
            raise ValueError(
                f"{directory} was built with embedder {meta['embedder']!r}, not {embedder.name!r}; "
                "pass a matching embedder or none"
            )
        spec = IndexSpec.build(meta["kind"], meta["dim"], **meta["params"])
        records = open_records(directory, read_only=not writable(directory))
        try:
            index = cls(directory, records, load_vectors(directory, spec), embedder)
            index._check_identity(meta["identity"])
        except IndexIntegrityError:
            records.close()
            raise
        if records.read_only:
            if unembedded := len(set(records.ids()) - set(index._vectors.ids().tolist())):
                logger.warning(
                    "%s is read-only: %d passages without vectors (an add cut short) are not searchable until it is "
                    "opened with write access",
                    directory,
                    unembedded,
                )
            return index
        if stale := remove_stale_temps(directory):  # what a kill mid-write left: a whole vectors file, say
            logger.info("%s: deleted %d temp files of writes cut short", directory, stale)
        if dropped := index._drop_removed():
            logger.warning("%s: dropped %d vectors of passages removed from %s", directory, dropped, RECORDS_FILE)
        repaired = index._embed_missing()
        if repaired:
            logger.warning("%s: embedded %d passages missing from %s", directory, len(repaired), VECTORS_FILE)
        return index

    @classmethod
    def repair(
        cls,
        directory: str | os.PathLike[str],
        embedder: TextEmbedder | None = None,
        kind: str | None = None,
        *,
        batch_size: int = 64,
        show_progress: bool = False,
        **params: int,
    ) -> PassageIndex:
        """Rebuild ``vectors.faiss`` and ``index.json`` from ``passages.sqlite``, the source of truth.

        Fixes a lost, corrupt or foreign vectors file or index.json (and upgrades an index of an older format).
        The embedder, kind and params not given come from index.json when it is readable, else the defaults.
        Every passage is embedded again; the three files get a new identity.
        """
        directory = Path(directory)
        records = open_records(directory, read_only=not writable(directory))
        if records.read_only:
            records.close()
            raise read_only_error(directory, "it cannot be repaired in place; repair a writable copy of it")
        if not len(records) and (held := vectors_held(directory)):
            records.close()
            raise IndexIntegrityError(
                f"{directory / RECORDS_FILE} holds no passages but {directory / VECTORS_FILE} holds {held}: "
                f"rebuilding the vectors from the records would empty the index, so nothing was changed; "
                f"{reingest_hint(directory)}"
            )
        old = readable_meta(directory)
        embedder = embedder if embedder is not None else Embedder(old.get("embedder", DEFAULT_MODEL))
        kind = kind or old.get("kind", "flat")
        params = {**(old.get("params", {}) if kind == old.get("kind") else {}), **params}
        try:
            check_index_params(kind, params)  # before the embedder loads
            index = cls(directory, records, VectorIndex.create(embedder.dim, kind, **params), embedder)
            index._embed_missing(batch_size, show_progress)  # every record: the new vectors start empty
            index._stamp(uuid.uuid4().hex)  # a crash before its end leaves a mismatch that open reports
        except BaseException:
            records.close()
            raise
        logger.warning("%s: rebuilt %d vectors from %s", directory, len(index), RECORDS_FILE)
        return index

    def add_passages(
        self,
        texts: Sequence[str],
        sources: Sequence[str | None] | None = None,
        metadatas: Sequence[dict[str, Any]] | None = None,
        *,
        documents: Sequence[DocumentKey | None] | None = None,
        batch_size: int = 64,
        show_progress: bool = False,
    ) -> AddResult:
        """Passage ids for ``texts``, in order, and the ids this call created (``new_ids``: exact even when other
        processes add at the same time); texts already present keep their id and are not re-embedded.

        ``documents``: the document each text is from, for :meth:`replace_documents` (ingest's); passages added
        without one are never removed by it.

        Embeds every record still without a vector (the new ones, plus any left by an earlier call
        that failed after its commit) and rewrites the FAISS file, so add in large batches.
        """
        self.check_writable()
        added = self._records.add_many(texts, sources, metadatas, documents=documents)
        self._embed_missing(batch_size, show_progress)
        return added

    def replace_documents(
        self, scope: Scope, held: Mapping[DocumentKey, Collection[int]], *, show_progress: bool = False
    ) -> Removal:
        """Each document of ``held`` now holds exactly those passage ids, and the other stored documents ``scope``
        covers hold none (gone from the source); passages no document holds any more are removed: from the records,
        committed first, then from the vectors (see the module docstring)."""
        self.check_writable()
        removal = self._records.replace_documents(held, scope.document)
        if removal.passage_ids:
            self._drop_removed(show_progress)
        return removal

    def check_writable(self) -> None:
        """Refuse (:class:`ReadOnlyIndexError`) to add to an index this process may not write, before any work."""
        if self._records.read_only:
            raise read_only_error(self.directory, "passages cannot be added to it; add them to a writable copy of it")

    def search(self, query: str, k: int = 5) -> list[Hit]:
        """The ``k`` passages most similar to ``query``, best first (fewer if the index is smaller)."""
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
            raise ValueError(f"k must be an integer >= 1, got {k!r}")
        query_vector = self.embedder.encode([query])
        wanted = k
        while True:
            with self._lock:
                stored = len(self._vectors)
                if stored == 0:
                    return []
                # never ask FAISS for more rows than exist: it allocates them all
                found = self._vectors.search(query_vector, min(wanted, stored))
            pairs = [(int(i), float(s)) for i, s in zip(found.ids[0], found.scores[0], strict=True) if i >= 0]
            # Vectors of removed passages (kept by HNSW, or by a process that opened before another removed them)
            # have no record: skipped, and more are fetched until k hits are found or every vector was searched.
            records = self._records.find_many([i for i, _ in pairs])
            hits = [Hit(i, score, r.text, r.source, r.metadata) for i, score in pairs if (r := records.get(i))]
            if len(hits) >= k or wanted >= stored:
                return hits[:k]
            wanted *= 2

    def get(self, ids: Sequence[int]) -> list[PassageRecord]:
        """Records for ``ids``, in order; KeyError naming unknown ids."""
        return self._records.get_many(ids)

    def __iter__(self) -> Iterator[PassageRecord]:
        """Every stored passage record, in id order."""
        return iter(self._records)

    def __len__(self) -> int:
        return len(self._records)

    @property
    def spec(self) -> IndexSpec:
        """The FAISS index's kind, vector dim and parameters."""
        return self._vectors.spec

    def check_same_spec(self, kind: str | None = None, **params: int) -> None:
        """ValueError if ``kind`` or ``params`` (options that shape a new index) differ from this index's own,
        naming the command that rebuilds it with them; silence would leave the user on the index they had."""
        have = self.spec
        check_index_params(kind or have.kind, params)
        if (kind is None or kind == have.kind) and {**have.params, **params} == have.params:
            return
        asked = " ".join([f"--index-kind {kind or have.kind}", *(f"--index-param {k}={v}" for k, v in params.items())])
        raise ValueError(
            f"{self.directory} is a {have.kind!r} index with {have.params or 'no parameters'}; the index kind and "
            f"parameters are set when an index is created. To change them: infoflow-rag index repair "
            f"{self.directory} {asked}"
        )

    def close(self) -> None:
        self._records.close()

    def _stamp(self, identity: str) -> None:
        """Write ``identity`` into the records, the vectors and (last, marking completion) index.json."""
        self._records.identity = self._vectors.identity = identity
        self._vectors.save(self.directory / VECTORS_FILE)
        spec = self._vectors.spec
        meta = {
            "format_version": FORMAT_VERSION,
            "identity": identity,
            "embedder": self.embedder.name,
            "dim": spec.dim,
            "kind": spec.kind,
            "params": spec.params,
        }
        atomic_write(self.directory / META_FILE, json.dumps(meta, indent=2).encode())

    def _check_identity(self, identity: str) -> None:
        """The records and vectors must be this index's, and the vectors those of records or of removed passages."""
        for name, found in ((RECORDS_FILE, self._records.identity), (VECTORS_FILE, self._vectors.identity)):
            if found != identity:
                raise IndexIntegrityError(
                    f"{self.directory / name} belongs to another index (identity {found}, {META_FILE} says "
                    f"{identity}): searching would return the wrong passages; {repair_hint(self.directory)}"
                )
        # An id no higher than the highest removed may be a removed passage's (a removal cut short, or HNSW's).
        highest_removed = self._records.highest_removed
        unknown = [i for i in set(self._vectors.ids().tolist()) - set(self._records.ids()) if i > highest_removed]
        if unknown:
            raise IndexIntegrityError(
                f"{self.directory / VECTORS_FILE} holds {len(unknown)} passage ids missing from {RECORDS_FILE}; "
                f"{repair_hint(self.directory)}"
            )

    def _embed_missing(self, batch_size: int = 64, show_progress: bool = False) -> list[int]:
        """Embed the records that have no vector yet, add them to FAISS and save it; their ids."""
        with self._lock:
            # FAISS ids are record ids, plus the removed passages' kept: equal counts mean nothing is missing, unless
            # passages were removed since they were counted (by another process, say: counts may then meet by chance).
            removals = self._records.removals
            if removals == self._removals and len(self._vectors) == len(self._records) + self._dead:
                return []
            stored, recorded = set(self._vectors.ids().tolist()), set(self._records.ids())
            missing, self._dead, self._removals = sorted(recorded - stored), len(stored - recorded), removals
            if not missing:
                return []
        texts = [r.text for r in self._records.get_many(missing)]
        vectors = self.embedder.encode(texts, batch_size, show_progress)  # (len(missing), dim)
        with self._lock:  # another thread may have added some of them meanwhile: add each id once
            have = set(self._vectors.ids().tolist())
            new = [row for row, passage_id in enumerate(missing) if passage_id not in have]
            if new:
                self._vectors.add(np.asarray(missing, dtype=np.int64)[new], vectors[new])
                self._vectors.save(self.directory / VECTORS_FILE)
        return missing

    def _drop_removed(self, show_progress: bool = False) -> int:
        """Drop the vectors of passages removed from the records, and save them; how many were dropped. HNSW keeps
        them until they are more than the live ones (see the module docstring)."""
        with self._lock:
            dead = set(self._vectors.ids().tolist()) - set(self._records.ids())
            if self.spec.kind == "hnsw" and 2 * len(dead) <= len(self._vectors):
                self._dead = len(dead)
                return 0
            if dead:
                self._vectors.remove(dead, show_progress)
                self._vectors.save(self.directory / VECTORS_FILE)
            self._dead = 0
            return len(dead)


def _refuse_existing(directory: Path) -> None:
    if (directory / META_FILE).exists():
        raise FileExistsError(f"{directory} already holds a passage index; use PassageIndex.open")
