"""Open a KV store from a one-string spec, as used in configs and on the command line."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from infoflow_rag.store.base import KVStore
from infoflow_rag.store.disk import DiskKVStore
from infoflow_rag.store.memory import MemoryKVStore
from infoflow_rag.store.redis_store import RedisKVStore

SPEC_FORMS = (
    "'memory', 'memory:<size>' (e.g. 'memory:512MB'), 'disk:<dir>', a directory path "
    "(containing '/' or starting with '.' or '~'), 'redis://host:port/db' (also rediss://, unix://)"
)
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*(?:([KMGT])I?)?B?", re.IGNORECASE)
_UNIT_POWERS = {"K": 1, "M": 2, "G": 3, "T": 4}


def parse_size(text: str) -> int:
    """Bytes in ``text`` like ``'512MB'``, ``'1.5GiB'`` or ``'4096'``; units are powers of 1024 either way."""
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"cannot read size {text!r}; write e.g. '512MB', '2GB' or a byte count")
    number, unit = match.groups()
    return int(float(number) * 1024 ** _UNIT_POWERS.get((unit or "").upper(), 0))


def check_store_spec(spec: str) -> str:
    """``spec`` if it names a KV store, checked without opening it (before a model loads); else ValueError
    naming the spec and the accepted forms."""
    _backend(spec)
    return spec


def open_store(spec: str, **options: Any) -> KVStore:
    """The backend named by ``spec``; ``options`` (e.g. ``dtype``) go to its constructor."""
    backend, arguments = _backend(spec)
    return backend(**arguments, **options)


def _backend(spec: str) -> tuple[type[KVStore], dict[str, Any]]:
    """The store class ``spec`` names and its constructor arguments from the spec."""
    if spec == "memory":
        return MemoryKVStore, {}
    if spec.startswith("memory:"):
        return MemoryKVStore, {"max_bytes": parse_size(spec.removeprefix("memory:"))}
    if spec.startswith(("redis://", "rediss://", "unix://")):
        return RedisKVStore, {"url": spec}
    if spec.startswith("disk:"):
        if not (root := spec.removeprefix("disk:")).strip():  # Path("") is ".": KV files all over the current directory
            raise ValueError(f"{spec!r} names no directory; write disk:DIR, e.g. disk:./kv")
        return DiskKVStore, {"root": Path(root).expanduser()}
    is_url = "://" in spec  # an unsupported scheme, not a directory called "s3:"
    if not is_url and (os.sep in spec or spec.startswith((".", "~")) or Path(spec).is_dir()):
        return DiskKVStore, {"root": Path(spec).expanduser()}
    raise ValueError(f"unknown KV store spec {spec!r}; accepted forms: {SPEC_FORMS}")
