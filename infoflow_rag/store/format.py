"""The on-disk / on-wire entry format: one safetensors blob per passage, self-verifying.

Header metadata holds ``format_version``, the full ``key`` string, the storage ``dtype``, the
``offset`` and ``checksum``: sha256 over those fields and every tensor's name, dtype, shape and
bytes. Anything that fails to parse or verify raises :class:`CorruptEntryError`; stores then drop
the entry and report a miss, so a torn or bit-flipped entry is never served.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import struct
from collections.abc import Mapping

import safetensors.torch
import torch

from infoflow_rag.errors import InfoFlowError
from infoflow_rag.store.codec import SIGNAL_PREFIX, STORAGE_DTYPES, EncodedKV
from infoflow_rag.store.keys import CacheKey

FORMAT_VERSION = "1"
_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class CorruptEntryError(InfoFlowError):
    """A stored entry failed to parse or verify; drop it, never serve it."""


def _checksum(tensors: Mapping[str, torch.Tensor], fields: Mapping[str, str]) -> str:
    digest = hashlib.sha256(json.dumps(dict(fields), sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name]
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)};".encode())
        digest.update(t.contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def pack(key: CacheKey, enc: EncodedKV) -> bytes:
    """``enc`` as safetensors bytes, stamped with ``key`` and a checksum."""
    fields = {
        "format_version": FORMAT_VERSION,
        "key": key.to_string(),
        "dtype": enc.dtype,
        "offset": str(enc.offset),
    }
    return safetensors.torch.save(enc.tensors, metadata={**fields, "checksum": _checksum(enc.tensors, fields)})


def _verify(key: CacheKey, tensors: dict[str, torch.Tensor], metadata: Mapping[str, str]) -> EncodedKV:
    fields = {name: value for name, value in metadata.items() if name != "checksum"}
    if metadata.get("checksum") != _checksum(tensors, fields):
        raise CorruptEntryError("checksum mismatch")
    # Past the checksum the fields are the writer's own, so only semantic checks remain.
    if fields.get("format_version") != FORMAT_VERSION:
        raise CorruptEntryError(f"format version {fields.get('format_version')!r}, expected {FORMAT_VERSION}")
    if fields.get("key") != key.to_string():
        raise CorruptEntryError(f"entry holds key {fields.get('key')!r}, not {key.to_string()!r}")
    dtype = fields.get("dtype")
    if dtype not in STORAGE_DTYPES:
        raise CorruptEntryError(f"unknown storage dtype {dtype!r}")
    required = ["token_ids", "keys", "values"] + (["keys_scale", "values_scale"] if dtype == "int8" else [])
    missing = [name for name in required if name not in tensors]
    if missing:
        raise CorruptEntryError(f"missing tensors {missing}")
    _check_shapes(tensors)
    return EncodedKV(tensors, int(fields["offset"]), dtype)  # type: ignore[arg-type]


def _check_shapes(tensors: Mapping[str, torch.Tensor]) -> None:
    """The tensors must form one passage: ids (n,), keys/values (layers, kv_heads, n, head_dim), per-token rest."""
    ids, keys, values = tensors["token_ids"], tensors["keys"], tensors["values"]
    if ids.dim() != 1 or ids.dtype != torch.int64:
        raise CorruptEntryError(f"token_ids of shape {tuple(ids.shape)} and dtype {ids.dtype}, expected (n,) int64")
    n = ids.shape[0]
    if keys.dim() != 4 or keys.shape != values.shape or keys.shape[2] != n:
        raise CorruptEntryError(
            f"keys {tuple(keys.shape)} and values {tuple(values.shape)} are not (layers, kv_heads, {n}, head_dim)"
        )
    for name, t in tensors.items():
        if name.endswith("_scale") and t.shape != (*keys.shape[:3], 1):
            raise CorruptEntryError(f"{name} of shape {tuple(t.shape)} does not match keys {tuple(keys.shape)}")
        if name.startswith(SIGNAL_PREFIX) and t.shape != (n,):
            raise CorruptEntryError(f"{name} of shape {tuple(t.shape)}, expected ({n},)")


def _parse(buffer: bytearray | mmap.mmap) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors (views into ``buffer``) and header metadata of a safetensors blob.

    Read here rather than with ``safetensors.safe_open``, which opens the file a second time by path
    for the tensor data: a concurrent atomic replace between the two opens pairs one file's header
    with another's data. ``buffer`` must be writable (torch warns otherwise); views never write to it.
    """
    (length,) = struct.unpack_from("<Q", buffer, 0)
    header = json.loads(bytes(buffer[8 : 8 + length]))
    if not isinstance(header, dict):
        raise ValueError(f"header is a {type(header).__name__}, not an object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError("__metadata__ is not an object of strings")
    data_start, data_size = 8 + length, len(buffer) - 8 - length
    tensors = {}
    for name, info in header.items():
        if not isinstance(info, dict) or not isinstance(info.get("shape"), list):
            raise ValueError(f"tensor entry {name!r} is not an object with a shape list")
        dtype, shape, (begin, end) = _DTYPES[info["dtype"]], info["shape"], info["data_offsets"]
        count = math.prod(shape)
        if min(shape, default=0) < 0 or not 0 <= begin <= end <= data_size or end - begin != count * dtype.itemsize:
            raise ValueError(f"tensor {name!r} does not fit the data section")
        if count == 0:  # torch.frombuffer rejects empty views
            tensors[name] = torch.empty(shape, dtype=dtype)
        else:
            tensors[name] = torch.frombuffer(buffer, dtype=dtype, count=count, offset=data_start + begin).reshape(shape)
    return tensors, metadata


def _unpack(key: CacheKey, buffer: bytearray | mmap.mmap) -> EncodedKV:
    try:
        return _verify(key, *_parse(buffer))
    except (ValueError, KeyError, TypeError, struct.error) as e:  # json errors are ValueErrors
        raise CorruptEntryError(f"unreadable safetensors: {e!r}") from e


def unpack_bytes(key: CacheKey, data: bytes) -> EncodedKV:
    """Verified entry for ``key`` from safetensors bytes."""
    return _unpack(key, bytearray(data))


def unpack_file(key: CacheKey, path: str | os.PathLike[str]) -> EncodedKV:
    """Verified entry for ``key`` from a safetensors file, memory-mapped. FileNotFoundError if absent.

    Entries are only ever replaced by rename, never rewritten in place, so the mapping cannot be
    truncated under the reader. The mapping is copy-on-write only so that torch sees a writable buffer.
    """
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:  # mmap cannot map an empty file
            raise CorruptEntryError("empty file")
        buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    return _unpack(key, buffer)
