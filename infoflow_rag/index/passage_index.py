"""A passage index in one directory: SQLite records + FAISS vectors + index.json.

Layout: ``passages.sqlite`` (ids, text, metadata; the source of truth), ``vectors.faiss`` (one
vector per passage id) and ``index.json`` (format version, embedder name, dim, index kind and
params; written last by ``create``, so its presence marks a complete index).

Crash-safety rule: records are committed before vectors are written, and the FAISS file is only
ever replaced atomically. So at any instant the FAISS ids are a subset of the record ids, and a
kill between the two writes leaves records without vectors. ``PassageIndex.open`` repairs that by
embedding and adding exactly those records, so the two files never disagree once opened.

One writer at a time per directory.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from infoflow_rag.closing import Closing
from infoflow_rag.index.embedder import Embedder, TextEmbedder
from infoflow_rag.index.faiss_index import IndexSpec, VectorIndex
from infoflow_rag.index.records import PassageRecord, PassageRecords
from infoflow_rag.store.files import atomic_write

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
RECORDS_FILE = "passages.sqlite"
VECTORS_FILE = "vectors.faiss"
META_FILE = "index.json"


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

    @classmethod
    def create(
        cls,
        directory: str | os.PathLike[str],
        embedder: TextEmbedder | None = None,
        kind: str = "flat",
        **params: int,
    ) -> PassageIndex:
        """A new empty index in ``directory`` (default embedder: the bundled all-MiniLM-L6-v2).

        ``kind`` and ``params`` as in :meth:`VectorIndex.create`.
        """
        directory = Path(directory)
        if (directory / META_FILE).exists():
            raise FileExistsError(f"{directory} already holds a passage index; use PassageIndex.open")
        directory.mkdir(parents=True, exist_ok=True)
        embedder = embedder if embedder is not None else Embedder()
        vectors = VectorIndex.create(embedder.dim, kind, **params)
        vectors.save(directory / VECTORS_FILE)
        records = PassageRecords(directory / RECORDS_FILE)
        meta = {
            "format_version": FORMAT_VERSION,
            "embedder": embedder.name,
            "dim": vectors.spec.dim,
            "kind": vectors.spec.kind,
            "params": vectors.spec.params,
        }
        atomic_write(directory / META_FILE, json.dumps(meta, indent=2).encode())
        return cls(directory, records, vectors, embedder)

    @classmethod
    def open(cls, directory: str | os.PathLike[str], embedder: TextEmbedder | None = None) -> PassageIndex:
        """The index in ``directory``, repaired if an add was interrupted (see the module docstring).

        Without ``embedder``, the one named in index.json is loaded (lazily, on first use).
        """
        directory = Path(directory)
        meta_path = directory / META_FILE
        if not meta_path.exists():
            raise FileNotFoundError(f"{directory} is not a passage index (no {META_FILE}); use PassageIndex.create")
        meta = json.loads(meta_path.read_text())
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{meta_path}: format version {meta.get('format_version')!r}, expected {FORMAT_VERSION}")
        if embedder is None:
            embedder = Embedder(meta["embedder"])
        elif embedder.name != meta["embedder"]:
            raise ValueError(
                f"{directory} was built with embedder {meta['embedder']!r}, not {embedder.name!r}; "
                "pass a matching embedder or none"
            )
        spec = IndexSpec.build(meta["kind"], meta["dim"], **meta["params"])
        index = cls(
            directory,
            PassageRecords(directory / RECORDS_FILE),
            VectorIndex.load(directory / VECTORS_FILE, spec),
            embedder,
        )
        repaired = index._embed_missing()
        if repaired:
            logger.warning("%s: embedded %d passages missing from %s", directory, len(repaired), VECTORS_FILE)
        return index

    def add_passages(
        self,
        texts: Sequence[str],
        sources: Sequence[str | None] | None = None,
        metadatas: Sequence[dict[str, Any]] | None = None,
        *,
        batch_size: int = 64,
        show_progress: bool = False,
    ) -> list[int]:
        """Passage ids for ``texts``, in order; texts already present keep their id and are not re-embedded.

        Embeds every record still without a vector (the new ones, plus any left by an earlier call
        that failed after its commit) and rewrites the FAISS file, so add in large batches.
        """
        ids = self._records.add_many(texts, sources, metadatas).ids
        self._embed_missing(batch_size, show_progress)
        return ids

    def search(self, query: str, k: int = 5) -> list[Hit]:
        """The ``k`` passages most similar to ``query``, best first (fewer if the index is smaller)."""
        found = self._vectors.search(self.embedder.encode([query]), k)
        pairs = [(int(i), float(s)) for i, s in zip(found.ids[0], found.scores[0], strict=True) if i >= 0]
        records = self._records.get_many([i for i, _ in pairs])
        return [Hit(r.id, score, r.text, r.source, r.metadata) for r, (_, score) in zip(records, pairs, strict=True)]

    def get(self, ids: Sequence[int]) -> list[PassageRecord]:
        """Records for ``ids``, in order; KeyError naming unknown ids."""
        return self._records.get_many(ids)

    def __iter__(self) -> Iterator[PassageRecord]:
        """Every stored passage record, in id order."""
        return iter(self._records)

    def __len__(self) -> int:
        return len(self._records)

    def close(self) -> None:
        self._records.close()

    def _embed_missing(self, batch_size: int = 64, show_progress: bool = False) -> list[int]:
        """Embed the records that have no vector yet, add them to FAISS and save it; their ids."""
        # FAISS ids are always a subset of record ids, so equal counts mean nothing is missing.
        if len(self._vectors) == len(self._records):
            return []
        missing = sorted(set(self._records.ids()) - set(self._vectors.ids().tolist()))
        texts = [r.text for r in self._records.get_many(missing)]
        vectors = self.embedder.encode(texts, batch_size, show_progress)  # (len(missing), dim)
        self._vectors.add(np.asarray(missing, dtype=np.int64), vectors)
        self._vectors.save(self.directory / VECTORS_FILE)
        return missing
