"""In-process KV store: an LRU bounded by the bytes of what it holds."""

from __future__ import annotations

import threading
from collections import OrderedDict

from infoflow_rag.kv import PassageKV
from infoflow_rag.store.base import KVStore
from infoflow_rag.store.codec import EncodedKV, StorageDtype, decode, encode
from infoflow_rag.store.keys import CacheKey

DEFAULT_MAX_BYTES = 1 << 30


class MemoryKVStore(KVStore):
    """LRU cache of encoded entries; ``max_bytes`` bounds their tensor bytes (in the storage dtype).

    Thread-safe. An entry larger than ``max_bytes`` is silently not stored: keeping it would evict
    everything else and still not fit.
    """

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES, dtype: StorageDtype = "float32") -> None:
        super().__init__(dtype)
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.max_bytes = max_bytes
        self.nbytes = 0  # bytes currently held
        self._entries: OrderedDict[CacheKey, EncodedKV] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()

    def put(self, key: CacheKey, kv: PassageKV) -> None:
        enc = encode(kv, self.dtype)
        with self._lock:
            self._discard(key)
            if enc.nbytes > self.max_bytes:
                return
            self._entries[key] = enc
            self.nbytes += enc.nbytes
            while self.nbytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self.nbytes -= evicted.nbytes
                self.stats.evictions += 1

    def _get(self, key: CacheKey) -> PassageKV | None:
        with self._lock:
            enc = self._entries.get(key)
            if enc is None:
                return None
            self._entries.move_to_end(key)
        return decode(enc)

    def contains(self, key: CacheKey) -> bool:
        with self._lock:
            return key in self._entries

    def delete(self, key: CacheKey) -> None:
        with self._lock:
            self._discard(key)

    def close(self) -> None:
        with self._lock:
            self._entries.clear()
            self.nbytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"MemoryKVStore(max_bytes={self.max_bytes}, dtype={self.dtype!r})"

    def _discard(self, key: CacheKey) -> None:
        enc = self._entries.pop(key, None)
        if enc is not None:
            self.nbytes -= enc.nbytes
