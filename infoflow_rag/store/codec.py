"""Storage dtypes: a PassageKV <-> flat named tensors, with K/V converted or int8-quantized.

K/V always come back from :func:`decode` as float32, whatever the storage dtype, so callers need a
single code path; the engine casts to its compute dtype when it places the keys. Token ids, offset
and signals are stored exactly.

int8 is symmetric absmax quantization per (layer, head, token): each head_dim row ``x`` is stored
as ``round(x / s)`` with ``s = max|x| / 127`` kept in float32 beside it, so the absolute error of
every element is at most ``s / 2 = max|x| / 254`` of its row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch

from infoflow_rag.kv import PassageKV

StorageDtype = Literal["float32", "float16", "bfloat16", "int8"]
STORAGE_DTYPES: tuple[str, ...] = get_args(StorageDtype)

_FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_INT8_MAX = 127
SIGNAL_PREFIX = "signal."


def check_dtype(dtype: str) -> StorageDtype:
    """``dtype`` itself if it is a storage dtype, else a ValueError listing the accepted ones."""
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"unknown storage dtype {dtype!r}; use one of {', '.join(STORAGE_DTYPES)}")
    return dtype  # type: ignore[return-value]


@dataclass
class EncodedKV:
    """A PassageKV in storage form: contiguous CPU tensors by name, owned by the store."""

    tensors: dict[str, torch.Tensor]
    offset: int
    dtype: StorageDtype

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def _owned(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # Always copy: the store must not alias tensors the caller (or a mapped file) may change later.
    return x.detach().to("cpu", dtype, copy=True, memory_format=torch.contiguous_format)


def _quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (layers, kv_heads, n, head_dim) -> int8 of that shape, scales (layers, kv_heads, n, 1)."""
    x = x.detach().to("cpu", torch.float32)
    scale = x.abs().amax(dim=-1, keepdim=True) / _INT8_MAX  # (layers, kv_heads, n, 1)
    # All-zero rows have scale 0; the clamp keeps them 0 instead of NaN.
    q = torch.round(x / scale.clamp_min(torch.finfo(torch.float32).tiny)).clamp(-_INT8_MAX, _INT8_MAX)
    return q.to(torch.int8).contiguous(), scale.contiguous()


def encode(kv: PassageKV, dtype: StorageDtype) -> EncodedKV:
    """``kv`` as storage tensors in ``dtype``."""
    tensors = {"token_ids": _owned(kv.token_ids, torch.int64)}  # (n,)
    if dtype == "int8":
        tensors["keys"], tensors["keys_scale"] = _quantize_int8(kv.keys)
        tensors["values"], tensors["values_scale"] = _quantize_int8(kv.values)
    else:
        float_dtype = _FLOAT_DTYPES[check_dtype(dtype)]
        tensors["keys"] = _owned(kv.keys, float_dtype)  # (layers, kv_heads, n, head_dim)
        tensors["values"] = _owned(kv.values, float_dtype)  # (layers, kv_heads, n, head_dim)
    for name, signal in kv.signals.items():
        tensors[SIGNAL_PREFIX + name] = _owned(signal, signal.dtype)  # (n,)
    return EncodedKV(tensors, int(kv.offset), dtype)


def decode(enc: EncodedKV) -> PassageKV:
    """The PassageKV behind ``enc``, K/V in float32, sharing no memory with ``enc``."""
    t = enc.tensors
    if enc.dtype == "int8":
        keys = t["keys"].to(torch.float32) * t["keys_scale"]  # (layers, kv_heads, n, head_dim)
        values = t["values"].to(torch.float32) * t["values_scale"]
    else:
        keys = t["keys"].to(torch.float32, copy=True)  # (layers, kv_heads, n, head_dim)
        values = t["values"].to(torch.float32, copy=True)
    signals = {name.removeprefix(SIGNAL_PREFIX): s.clone() for name, s in t.items() if name.startswith(SIGNAL_PREFIX)}
    return PassageKV(t["token_ids"].clone(), keys, values, enc.offset, signals)
