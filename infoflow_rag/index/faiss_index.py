"""Inner-product vector search over passage ids with FAISS: exact, HNSW or IVF.

Every kind is wrapped in ``IndexIDMap2`` so FAISS ids are the SQLite passage ids and the stored id
set can be listed (crash repair compares it with the records).

IVF needs k-means training: vectors are kept in an exact flat index until there are at least
``IVF_TRAIN_FACTOR * nlist`` of them (39 points per centroid, FAISS's own minimum before it warns),
then the IVF is trained once on all of them. It is not retrained as it grows.

The file is FAISS's own serialisation behind a short header holding the identity of the index it belongs
to, so vectors from another index (or an older copy) are recognised instead of silently searched.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
from tqdm.auto import tqdm

from infoflow_rag.files import atomic_write

IVF_TRAIN_FACTOR = 39
REBUILD_BATCH = 4096  # vectors per add while an index is refilled after a removal, so its progress bar moves
FILE_MAGIC = b"infoflow-vectors\0"  # then a little-endian uint32 header length, the JSON header, FAISS bytes
DEFAULT_PARAMS: dict[str, dict[str, int]] = {
    "flat": {},
    "hnsw": {"M": 32, "ef_construction": 200, "ef_search": 64},
    "ivf": {"nlist": 100, "nprobe": 8},
}


@dataclass(frozen=True)
class IndexSpec:
    """Everything needed to build (or check) an index: ``kind``, vector ``dim``, kind-specific ``params``."""

    kind: str
    dim: int
    params: dict[str, int]

    @classmethod
    def build(cls, kind: str, dim: int, **params: int) -> IndexSpec:
        """Spec with defaults filled in; ValueError naming an unknown kind or parameter."""
        check_index_params(kind, params)
        if dim <= 0:
            raise ValueError(f"dim must be a positive integer, got {dim}")
        return cls(kind, dim, {**DEFAULT_PARAMS[kind], **params})


def check_index_params(kind: str, params: dict[str, int]) -> None:
    """ValueError naming an unknown index kind, a parameter ``kind`` does not take, or one that is not a positive
    integer; checked before anything loads."""
    if kind not in DEFAULT_PARAMS:
        raise ValueError(f"unknown index kind {kind!r}; use one of {', '.join(DEFAULT_PARAMS)}")
    unknown = set(params) - set(DEFAULT_PARAMS[kind])
    if unknown:
        accepted = ", ".join(DEFAULT_PARAMS[kind]) or "none"
        raise ValueError(f"unknown parameters {sorted(unknown)} for a {kind!r} index; accepted: {accepted}")
    bad = {name: value for name, value in params.items() if not isinstance(value, int) or value <= 0}
    if bad:
        raise ValueError(f"index parameters must be positive integers, got {bad}")


@dataclass(frozen=True)
class SearchResult:
    scores: np.ndarray  # (queries, k) float32 inner products; meaningless where ids is -1
    ids: np.ndarray  # (queries, k) int64 passage ids, best first; -1 pads when fewer than k exist


def _empty_index(spec: IndexSpec) -> faiss.Index:
    if spec.kind == "hnsw":
        inner = faiss.IndexHNSWFlat(spec.dim, spec.params["M"], faiss.METRIC_INNER_PRODUCT)
        inner.hnsw.efConstruction = spec.params["ef_construction"]
    else:  # flat, and IVF until it has enough vectors to train
        inner = faiss.IndexFlatIP(spec.dim)
    return faiss.IndexIDMap2(inner)


def stored_count(path: str | os.PathLike[str]) -> int:
    """How many vectors the file at ``path`` holds, whatever its kind; ValueError if it is unreadable."""
    return int(_read(path)[0].ntotal)


def _read(path: str | os.PathLike[str]) -> tuple[faiss.Index, str | None]:
    """The FAISS index saved at ``path`` and the identity in its header (None: an unstamped file)."""
    data = Path(path).read_bytes()
    identity = None
    if data.startswith(FILE_MAGIC):
        try:
            (length,) = struct.unpack_from("<I", data, len(FILE_MAGIC))
            start = len(FILE_MAGIC) + 4
            identity = json.loads(data[start : start + length])["identity"]
            data = data[start + length :]
        except (struct.error, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path} has an unreadable header: {e}") from e
    try:
        return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8)), identity
    except RuntimeError as e:  # FAISS reports a truncated or foreign file this way
        raise ValueError(f"{path} is not a readable FAISS index: {str(e).splitlines()[0]}") from e


class VectorIndex:
    """A FAISS index keyed by int64 passage ids; build with :meth:`create` or :meth:`load`."""

    def __init__(self, spec: IndexSpec, index: faiss.Index, identity: str | None = None) -> None:
        self.spec = spec
        self.identity = identity  # of the passage index these vectors belong to (None: not stamped)
        self._index = index  # IndexIDMap2 over the kind's index
        self._apply_search_params()

    @classmethod
    def create(cls, dim: int, kind: str = "flat", **params: int) -> VectorIndex:
        """An empty index.

        ``params``: hnsw ``M``, ``ef_construction``, ``ef_search``; ivf ``nlist``, ``nprobe``
        (defaults in ``DEFAULT_PARAMS``).
        """
        spec = IndexSpec.build(kind, dim, **params)
        return cls(spec, _empty_index(spec))

    @classmethod
    def load(cls, path: str | os.PathLike[str], spec: IndexSpec) -> VectorIndex:
        """The index saved at ``path``, checked against ``spec``; ValueError if it is unreadable or another kind."""
        index, identity = _read(path)
        inner = type(faiss.downcast_index(index.index)).__name__ if isinstance(index, faiss.IndexIDMap2) else None
        expected = {
            "flat": ("IndexFlatIP",),
            "hnsw": ("IndexHNSWFlat",),
            "ivf": ("IndexFlatIP", "IndexIVFFlat"),
        }
        if inner not in expected[spec.kind] or index.d != spec.dim:
            raise ValueError(
                f"{path} holds a {type(index).__name__}({inner}) of dim {index.d}, but the spec says a "
                f"{spec.kind!r} index of dim {spec.dim}: the vectors file and index.json do not belong "
                "together"
            )
        return cls(spec, index, identity)

    @property
    def is_trained(self) -> bool:
        """False only for an IVF index still holding its vectors in the exact flat buffer."""
        return self.spec.kind != "ivf" or isinstance(faiss.downcast_index(self._index.index), faiss.IndexIVFFlat)

    def __len__(self) -> int:
        return int(self._index.ntotal)

    def ids(self) -> np.ndarray:
        """Stored passage ids, (n,) int64, in insertion order."""
        return faiss.vector_to_array(self._index.id_map)

    def add(self, ids: Sequence[int] | np.ndarray, vectors: np.ndarray) -> None:
        """Add ``vectors`` (n, dim) under passage ``ids`` (n,); the caller keeps ids unique."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)  # (n,)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)  # (n, dim)
        if vectors.ndim != 2 or vectors.shape[1] != self.spec.dim or ids.shape != (vectors.shape[0],):
            raise ValueError(
                f"add() got ids {ids.shape} and vectors {vectors.shape}; expected (n,) and (n, {self.spec.dim})"
            )
        if ids.size and ids.min() < 0:
            raise ValueError("passage ids must be non-negative (FAISS uses -1 for 'no result')")
        self._index.add_with_ids(vectors, ids)
        if not self.is_trained and len(self) >= IVF_TRAIN_FACTOR * self.spec.params["nlist"]:
            self._train_ivf()

    def remove(self, ids: Collection[int], show_progress: bool = False) -> None:
        """Drop the vectors of ``ids`` (those stored).

        A flat index (and IVF before training) drops them in place. A trained IVF cannot (its lists keep positions the
        id map would no longer match) nor can HNSW: the index is emptied, keeping its training and parameters, and the
        vectors kept are added again; for HNSW that builds its graph anew, a while for a large index
        (``show_progress`` shows a bar).
        """
        drop = np.fromiter(ids, dtype=np.int64, count=len(ids))
        if isinstance(faiss.downcast_index(self._index.index), faiss.IndexFlat):
            self._index.remove_ids(drop)
            return
        vectors, stored = self._stored()
        kept = ~np.isin(stored, drop)  # (n,)
        vectors, stored = vectors[kept], stored[kept]
        self._index.reset()
        with tqdm(total=len(stored), desc=f"rebuild {self.spec.kind}", unit="vector", disable=not show_progress) as bar:
            for start in range(0, len(stored), REBUILD_BATCH):
                end = start + REBUILD_BATCH
                self._index.add_with_ids(vectors[start:end], stored[start:end])
                bar.update(len(stored[start:end]))

    def search(self, vectors: np.ndarray, k: int) -> SearchResult:
        """The ``k`` highest inner products for each row of ``vectors`` (queries, dim) or one (dim,) query."""
        queries = np.atleast_2d(np.ascontiguousarray(vectors, dtype=np.float32))  # (queries, dim)
        if k <= 0 or queries.ndim != 2 or queries.shape[1] != self.spec.dim:
            raise ValueError(f"search() got k={k} and queries {queries.shape}; expected k > 0 and (q, {self.spec.dim})")
        scores, ids = self._index.search(queries, k)
        return SearchResult(scores, ids)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write atomically, stamped with ``identity``: a reader or a crash sees the previous file or the new one."""
        header = json.dumps({"identity": self.identity}).encode()
        body = faiss.serialize_index(self._index)  # (bytes,) uint8
        atomic_write(Path(path), FILE_MAGIC + struct.pack("<I", len(header)) + header + body.tobytes())

    def _stored(self) -> tuple[np.ndarray, np.ndarray]:
        """Every stored vector (n, dim) and its passage id (n,)."""
        inner = faiss.downcast_index(self._index.index)
        if isinstance(inner, faiss.IndexIVFFlat):  # reads a vector by position only through a direct map
            inner.make_direct_map()
            vectors = inner.reconstruct_n(0, inner.ntotal)
            inner.make_direct_map(False)  # kept, it would be saved with the index and refuse later removals
            return vectors, self.ids()
        return inner.reconstruct_n(0, inner.ntotal), self.ids()

    def _train_ivf(self) -> None:
        vectors, ids = self._stored()  # (n, dim), (n,): the flat buffer's
        quantizer = faiss.IndexFlatIP(self.spec.dim)
        ivf = faiss.IndexIVFFlat(quantizer, self.spec.dim, self.spec.params["nlist"], faiss.METRIC_INNER_PRODUCT)
        ivf.train(vectors)
        self._index = faiss.IndexIDMap2(ivf)
        self._index.add_with_ids(vectors, ids)
        self._apply_search_params()

    def _apply_search_params(self) -> None:
        inner = faiss.downcast_index(self._index.index)
        if isinstance(inner, faiss.IndexHNSWFlat):
            inner.hnsw.efSearch = self.spec.params["ef_search"]
        elif isinstance(inner, faiss.IndexIVFFlat):
            inner.nprobe = self.spec.params["nprobe"]
