"""glibc malloc set to keep freed memory: large blocks come from the heap and stay there after free."""

import ctypes
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from infoflow_rag import allocator

MODULE = Path(allocator.__file__)
# A fresh interpreter (this process's allocator is left alone) loads the module by path, without the package
# and its torch import, mallocs 64 MiB, and reports glibc's counters before and after freeing it.
PROBE = f"""
import ctypes, importlib.util, json, sys
spec = importlib.util.spec_from_file_location("allocator", {str(MODULE)!r})
allocator = importlib.util.module_from_spec(spec); spec.loader.exec_module(allocator)
if sys.argv[1] == "keep":
    allocator.keep_freed_memory()
FIELDS = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"
class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in FIELDS.split()]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = (ctypes.c_void_p,)
block = libc.malloc(64 << 20)
ctypes.memset(block, 1, 64 << 20)
held = libc.mallinfo2()
libc.free(block)
freed = libc.mallinfo2()
print(json.dumps({{"state": allocator.allocator_state(), "mmapped": held.hblkhd, "heap_after_free": freed.arena}}))
"""
MIB = 1 << 20


@pytest.fixture(autouse=True)
def restored_state(monkeypatch):
    monkeypatch.setattr(allocator, "_state", allocator._state)  # the CLI test reads it: leave it as found


def probe(mode: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in allocator.USER_SETTINGS}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout)


def glibc_with_mallinfo2() -> bool:
    return hasattr(ctypes.CDLL(None), "mallinfo2")


@pytest.mark.skipif(not glibc_with_mallinfo2(), reason="glibc >= 2.33 only: mallinfo2 is how the effect is read")
def test_kept_memory_serves_a_large_block_from_the_heap_and_keeps_it_after_free():
    default, kept = probe("default"), probe("keep")
    assert default["state"] == "glibc defaults"
    assert default["mmapped"] >= 64 * MIB and default["heap_after_free"] < 64 * MIB  # its own mmap, unmapped on free
    assert kept["state"] == "glibc, freed memory kept (mmap off, no trim)"
    assert kept["mmapped"] < MIB and kept["heap_after_free"] >= 64 * MIB  # from the heap, and still there


def test_the_users_own_malloc_variables_win(monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_MAX_", "65536")
    monkeypatch.setattr(allocator, "_glibc", lambda: pytest.fail("mallopt must not be called"))
    assert allocator.keep_freed_memory() == "glibc as set by MALLOC_MMAP_MAX_"
    assert allocator.allocator_state() == "glibc as set by MALLOC_MMAP_MAX_"


def test_a_c_library_other_than_glibc_is_left_as_it_is(monkeypatch):
    for name in allocator.USER_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(allocator, "_glibc", lambda: None)
    assert allocator.keep_freed_memory() == "not glibc: the C library's defaults"
