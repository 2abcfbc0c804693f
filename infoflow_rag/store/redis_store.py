"""KV store in Redis: the same verified safetensors bytes as on disk, one string value per passage."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from urllib.parse import urlsplit, urlunsplit

import redis

from infoflow_rag.kv import PassageKV
from infoflow_rag.store.base import KVStore
from infoflow_rag.store.codec import StorageDtype, decode, encode
from infoflow_rag.store.format import CorruptEntryError, pack, unpack_bytes
from infoflow_rag.store.keys import CacheKey

DEFAULT_URL = "redis://127.0.0.1:6379/0"


def _without_credentials(url: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


class RedisKVStore(KVStore):
    """Entries at ``<prefix><fingerprint digest>:<token hash>``; batched calls use one pipeline round trip.

    Redis errors (server down, out of memory, a key of another type) raise StoreUnavailableError: whether
    that counts as a miss is the caller's policy. Bound memory on the server (``maxmemory`` + ``allkeys-lru``).
    """

    failures = (redis.RedisError,)

    def __init__(self, url: str = DEFAULT_URL, prefix: str = "infoflow:", dtype: StorageDtype = "float32") -> None:
        super().__init__(dtype)
        self.url = _without_credentials(url)  # it appears in logs
        self.prefix = prefix
        self._client = redis.Redis.from_url(url)

    def redis_key(self, key: CacheKey) -> str:
        """The Redis key holding the entry for ``key``."""
        return f"{self.prefix}{key.fingerprint_digest}:{key.token_hash}"

    def put(self, key: CacheKey, kv: PassageKV) -> None:
        self.put_many([(key, kv)])

    def put_many(self, items: Iterable[tuple[CacheKey, PassageKV]]) -> None:
        pipe = self._client.pipeline(transaction=False)
        for key, kv in items:
            pipe.set(self.redis_key(key), pack(key, encode(kv, self.dtype)))
        with self._guard("write"):
            pipe.execute()

    def _get(self, key: CacheKey) -> PassageKV | None:
        return self._get_many([key])[0]

    def _get_many(self, keys: Sequence[CacheKey]) -> list[PassageKV | None]:
        pipe = self._client.pipeline(transaction=False)
        for key in keys:
            pipe.get(self.redis_key(key))
        with self._guard("read"):
            found = pipe.execute()
        return [self._unpack(key, data) for key, data in zip(keys, found, strict=True)]

    def contains(self, key: CacheKey) -> bool:
        with self._guard("read"):
            return bool(self._client.exists(self.redis_key(key)))

    def delete(self, key: CacheKey) -> None:
        with self._guard("delete"):
            self._client.delete(self.redis_key(key))

    def close(self) -> None:
        self._client.close()

    def __repr__(self) -> str:
        return f"RedisKVStore({self.url!r}, prefix={self.prefix!r}, dtype={self.dtype!r})"

    def _unpack(self, key: CacheKey, data: bytes | None) -> PassageKV | None:
        if data is None:
            return None
        try:
            return decode(unpack_bytes(key, data))
        except CorruptEntryError as e:
            self._drop_corrupt(key, e)
            return None
