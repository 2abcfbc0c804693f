"""Keep freed memory in the process: glibc malloc set so large tensors reuse pages instead of faulting in new ones.

By default glibc serves every allocation above a threshold (128 KiB, raised dynamically up to 32 MiB) with its own
``mmap`` and returns it to the kernel on free, and trims the heap's top once 128 KiB of it is free. A forward pass
allocates and frees activations of many MiB per layer, so each one comes back as fresh pages, zeroed by the kernel
one page fault at a time. With mmap off and no trimming, freed blocks stay in the heap and the next layer reuses
them. Measured in one process, settings alternated between interleaved runs (SmolLM2-135M, 4K context, medians of 4):
full prefill 11.3 -> 9.5 s, InfoFlow at 15 % 2.44 -> 2.27 s, no recompute 0.33 -> 0.27 s (README, "Measured").

The cost: the process keeps its peak heap until it exits (memory freed after a request is reused by the next one,
not returned to the system). The ``infoflow-rag`` command turns this on at start; a program that embeds the
library calls :func:`keep_freed_memory` itself if it wants the same. Where the user set glibc's own malloc
variables, theirs win and nothing is changed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

# mallopt parameters, from glibc's malloc.h
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
INT_MAX = 2**31 - 1  # mallopt takes a C int: a larger value would wrap around (to 0 for 2**40: trim always)
USER_SETTINGS = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES")

_state = "glibc defaults"


def keep_freed_memory() -> str:
    """Turn glibc's mmap off and its trimming down to never (see the module doc); returns :func:`allocator_state`.

    Does nothing where the C library is not glibc, or where any of ``USER_SETTINGS`` is set in the environment."""
    global _state
    if user := [name for name in USER_SETTINGS if name in os.environ]:
        _state = f"glibc as set by {', '.join(user)}"
        return _state
    libc = _glibc()
    if libc is None:
        _state = "not glibc: the C library's defaults"
        return _state
    if libc.mallopt(M_MMAP_MAX, 0) != 1 or libc.mallopt(M_TRIM_THRESHOLD, INT_MAX) != 1:
        raise RuntimeError("glibc refused mallopt(M_MMAP_MAX, 0) or mallopt(M_TRIM_THRESHOLD, INT_MAX)")
    _state = "glibc, freed memory kept (mmap off, no trim)"
    return _state


def allocator_state() -> str:
    """How this process's allocator is set, for a benchmark's machine line."""
    return _state


def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    libc = ctypes.CDLL(name)
    if not hasattr(libc, "gnu_get_libc_version"):  # musl and the BSDs have no mallopt of this kind
        return None
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return libc
