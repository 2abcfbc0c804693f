"""Keep freed memory in the process: glibc malloc set so large tensors reuse pages instead of faulting in new ones.

By default glibc gives large freed blocks back to the kernel: a block above its mmap threshold (128 KiB at start,
raised up to 32 MiB as such blocks are freed) is a mapping of its own, unmapped on free, and the heap's top is
trimmed once more than twice that threshold of it is free. A forward allocates and frees activations of many MiB
per layer, so they keep coming back as fresh pages, zeroed by the kernel one page fault at a time. With mmap off and
no trimming, freed blocks stay in the heap and the next layer reuses them (what that buys is measured in the
README, "The allocator").

The cost: the process keeps its peak heap until it exits (memory freed after a request is reused by the next one,
not returned to the system). The ``infoflow-rag`` command turns this on at start; a program that embeds the
library calls :func:`keep_freed_memory` itself if it wants the same. Where the user set glibc's own malloc
variables, theirs win and nothing is changed.
"""

from __future__ import annotations

import ctypes
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
    if os.name != "posix":
        return None
    libc = ctypes.CDLL(None)  # the symbols this process already has: its C library's among them
    if not hasattr(libc, "gnu_get_libc_version"):  # musl, macOS and the BSDs: no glibc mallopt
        return None
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return libc
