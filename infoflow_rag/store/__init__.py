"""Model-free storage of passage K/V: content-addressed keys and memory, disk and Redis backends."""

from infoflow_rag.store.base import KVStore, StoreStats
from infoflow_rag.store.codec import STORAGE_DTYPES, StorageDtype
from infoflow_rag.store.disk import DiskKVStore
from infoflow_rag.store.factory import check_store_spec, open_store, parse_size
from infoflow_rag.store.format import CorruptEntryError
from infoflow_rag.store.keys import CacheKey
from infoflow_rag.store.memory import MemoryKVStore
from infoflow_rag.store.redis_store import RedisKVStore

__all__ = [
    "STORAGE_DTYPES",
    "CacheKey",
    "CorruptEntryError",
    "DiskKVStore",
    "KVStore",
    "MemoryKVStore",
    "RedisKVStore",
    "StorageDtype",
    "StoreStats",
    "check_store_spec",
    "open_store",
    "parse_size",
]
