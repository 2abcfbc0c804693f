"""The KVStore interface every backend implements, with batching and hit/miss accounting on top."""

from __future__ import annotations

import contextlib
import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

from infoflow_rag.closing import Closing
from infoflow_rag.errors import StoreUnavailableError
from infoflow_rag.kv import PassageKV
from infoflow_rag.store.codec import StorageDtype, check_dtype
from infoflow_rag.store.keys import CacheKey

logger = logging.getLogger(__name__)


@dataclass
class StoreStats:
    """Counters since the store was opened (this process only)."""

    hits: int = 0
    misses: int = 0  # includes corrupt and rejected reads
    corrupt: int = 0  # entries that failed verification (or the caller's check) and were deleted
    evictions: int = 0  # entries dropped to respect a size bound


class KVStore(Closing, ABC):
    """Maps :class:`CacheKey` to :class:`PassageKV`.

    K/V are converted to ``dtype`` on put and come back as float32 on get (see ``store.codec``).
    Backends implement ``put``, ``_get``, ``contains``, ``delete`` and ``close``; ``get``/``get_many`` add the
    statistics, and the batched methods loop unless a backend overrides them.

    A backend failure (its ``failures``: disk full, read-only directory, Redis down...) raises
    :class:`StoreUnavailableError`; callers that use the store as a cache treat it as a miss or a skipped write.
    """

    failures: tuple[type[Exception], ...] = ()  # backend exceptions that mean "the store is unavailable"

    def __init__(self, dtype: StorageDtype = "float32") -> None:
        self.dtype: StorageDtype = check_dtype(dtype)
        self.stats = StoreStats()
        self._stats_lock = threading.Lock()  # stores are shared by threads; counters must add up

    @abstractmethod
    def put(self, key: CacheKey, kv: PassageKV) -> None:
        """Store ``kv`` under ``key``, replacing any previous entry."""

    @abstractmethod
    def _get(self, key: CacheKey) -> PassageKV | None:
        """The entry, or None if absent or dropped as corrupt."""

    @abstractmethod
    def contains(self, key: CacheKey) -> bool:
        """Whether an entry exists (not verified: ``get`` may still miss on a corrupt one)."""

    @abstractmethod
    def delete(self, key: CacheKey) -> None:
        """Remove the entry if present."""

    @abstractmethod
    def close(self) -> None:
        """Release connections, handles or memory; the store is unusable afterwards."""

    def get(self, key: CacheKey) -> PassageKV | None:
        """The K/V stored under ``key`` (float32), or None on a miss."""
        return self._count(self._get(key))

    def get_many(
        self, keys: Sequence[CacheKey], check: Callable[[CacheKey, PassageKV], str | None] | None = None
    ) -> list[PassageKV | None]:
        """``get`` for each key, in order.

        ``check(key, kv)`` says why a verified entry still cannot be served (e.g. its tokens or shapes are not
        what the caller expects), or None: such an entry is dropped like a corrupt one and counts as a miss.
        """
        found = self._get_many(keys)
        if check is not None:
            for i, (key, kv) in enumerate(zip(keys, found, strict=True)):
                if kv is not None and (problem := check(key, kv)) is not None:
                    self._drop_corrupt(key, problem)
                    found[i] = None
        return [self._count(kv) for kv in found]

    def _get_many(self, keys: Sequence[CacheKey]) -> list[PassageKV | None]:
        return [self._get(key) for key in keys]

    def put_many(self, items: Iterable[tuple[CacheKey, PassageKV]]) -> None:
        """``put`` for each ``(key, kv)`` pair; one that fails does not stop the others (its error is raised after)."""
        failed: StoreUnavailableError | None = None
        for key, kv in items:
            try:
                self.put(key, kv)
            except StoreUnavailableError as e:
                failed = failed or e
        if failed is not None:
            raise failed

    @contextlib.contextmanager
    def _guard(self, action: str) -> Iterator[None]:
        """Within: a backend failure becomes a StoreUnavailableError naming the store and the action."""
        try:
            yield
        except self.failures as e:
            raise StoreUnavailableError(f"{self!r} could not {action}: {e}") from e

    def _count(self, kv: PassageKV | None) -> PassageKV | None:
        with self._stats_lock:
            if kv is None:
                self.stats.misses += 1
            else:
                self.stats.hits += 1
        return kv

    def _drop_corrupt(self, key: CacheKey, error: Exception | str) -> None:
        """Delete an entry that failed verification, so it is recomputed rather than served."""
        logger.warning("dropping corrupt KV entry %s from %s: %s", key.to_string(), self, error)
        with self._stats_lock:
            self.stats.corrupt += 1
        try:
            self.delete(key)
        except StoreUnavailableError as e:  # still never served: the caller recomputes and overwrites it
            logger.warning("could not delete it: %s", e)
