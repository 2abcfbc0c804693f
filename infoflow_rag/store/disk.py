"""KV store on a local file system: one verified safetensors file per passage."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from infoflow_rag.files import atomic_write, remove_stale_temps
from infoflow_rag.kv import PassageKV
from infoflow_rag.store.base import KVStore
from infoflow_rag.store.codec import StorageDtype, decode, encode
from infoflow_rag.store.format import CorruptEntryError, pack, unpack_file
from infoflow_rag.store.keys import CacheKey

logger = logging.getLogger(__name__)


class DiskKVStore(KVStore):
    """Entries at ``root/<fingerprint digest>/<token hash>.safetensors``.

    Writes are atomic (temp file + fsync + rename), so concurrent writers of one key, in any number
    of processes, leave exactly one complete file. Reads memory-map the file and verify its
    checksum; a torn or corrupt file is logged, deleted, counted in ``stats.corrupt`` and reported
    as a miss. The directory needs no locking and can be shared by processes on one host. Opening it deletes what
    writes killed midway left (temp files over an hour old: :func:`~infoflow_rag.files.remove_stale_temps`).
    Any other OS error on a write or delete (read-only directory, disk full, I/O error) raises
    StoreUnavailableError; on a read it makes that entry a miss (logged once per store), so one unreadable file
    does not cost the other entries of a batch their reuse.
    """

    failures = (OSError,)

    def __init__(self, root: str | os.PathLike[str], dtype: StorageDtype = "float32") -> None:
        super().__init__(dtype)
        self._read_failed = False  # a read error was logged
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        # Entries sit one directory down (one per model fingerprint); a write killed midway left its temp file there.
        with os.scandir(self.root) as entries:
            stale = sum(remove_stale_temps(Path(d.path)) for d in entries if d.is_dir(follow_symlinks=False))
        if stale:
            logger.info("KV store %s: deleted %d temp files of writes cut short", self.root, stale)

    def path_for(self, key: CacheKey) -> Path:
        """Where the entry for ``key`` lives (whether or not it exists)."""
        return self.root / key.fingerprint_digest / f"{key.token_hash}.safetensors"

    def put(self, key: CacheKey, kv: PassageKV) -> None:
        path = self.path_for(key)
        data = pack(key, encode(kv, self.dtype))
        with self._guard("write"):
            path.parent.mkdir(exist_ok=True)
            atomic_write(path, data)

    def _get(self, key: CacheKey) -> PassageKV | None:
        try:
            return decode(unpack_file(key, self.path_for(key)))
        except FileNotFoundError:  # a miss, not a failure
            return None
        except CorruptEntryError as e:
            self._drop_corrupt(key, e)
            return None
        except OSError as e:  # this file, not the store: a directory in its place, its permissions, a bad sector
            if not self._read_failed:
                self._read_failed = True
                logger.warning("KV store %s could not read an entry, recomputed instead (said once): %s", self, e)
            return None

    def contains(self, key: CacheKey) -> bool:
        return self.path_for(key).is_file()

    def delete(self, key: CacheKey) -> None:
        with self._guard("delete"):
            self.path_for(key).unlink(missing_ok=True)

    def close(self) -> None:
        """Nothing to release: every call opens and closes its own file."""

    def __repr__(self) -> str:
        return f"DiskKVStore({str(self.root)!r}, dtype={self.dtype!r})"
