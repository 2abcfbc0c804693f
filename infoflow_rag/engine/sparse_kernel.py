"""The recompute's attention as a compiled kernel (sparse_kernel.cpp): each query row attends to the key prefix its
position sees, and no key block past it is computed.

torch's CPU flash kernel computes every block under an explicit mask, so the torch path
(:func:`~infoflow_rag.engine.attention.chunked_attention`) splits the queries into chunks of two calls each; on
SmolLM2 at 4K that ran at ~110 GFLOP/s against ~150 for the same work in one dense call. This kernel runs its
blocks the way torch's flash kernel runs its own (sgemm and an online softmax) and skips the masked ones.

Built from source on first use with torch's extension loader (g++ and ninja; ~30 s once per machine and source,
cached by torch under ``~/.cache/torch_extensions`` or ``$TORCH_EXTENSIONS_DIR``). Where it cannot build (no
compiler), :func:`load` warns once and returns None, and the engine keeps the torch path.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import threading
import warnings
from pathlib import Path
from types import ModuleType

import torch

SOURCE = Path(__file__).with_name("sparse_kernel.cpp")
# -march=native: the kernel is built on the machine that runs it; -ffast-math lets the compiler vectorize the
# softmax's max, exp and sum (the source never forms an infinity, see its comments).
CFLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp"]

_lock = threading.Lock()
_loaded: list[ModuleType | None] = []  # empty until the first load; then the module, or None if it did not build


def _cpu_tag() -> str:
    """A short hash of this CPU's instruction set: a build cache shared by machines of other CPUs (a home on
    NFS) keeps one -march=native build per CPU instead of loading one that may not run here."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.processor()
    return hashlib.sha256(f"{platform.machine()} {flags}".encode()).hexdigest()[:10]


def _put_ninja_on_path() -> None:
    """torch's loader runs ``ninja`` from PATH; the ninja wheel installs it beside the interpreter, which is not on
    PATH when .venv/bin/python runs without the venv activated (make, CI)."""
    try:
        import ninja
    except ImportError:  # no wheel: a ninja on PATH may still do, and the build's error says if not
        return
    path = os.environ.get("PATH", "")
    if shutil.which("ninja", path=path) is None:
        os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, path]) if path else ninja.BIN_DIR


def load() -> ModuleType | None:
    """The built kernel module (building it on the first call), or None if it cannot be built here."""
    with _lock:
        if not _loaded:
            from torch.utils import cpp_extension  # imports setuptools: only when a recompute first needs it

            _put_ninja_on_path()
            try:
                module = cpp_extension.load(
                    name=f"infoflow_sparse_attention_{_cpu_tag()}",
                    sources=[str(SOURCE)],
                    extra_cflags=CFLAGS,
                    extra_ldflags=["-fopenmp"],
                )
            except Exception as exc:  # no compiler, no ninja, a failed build: the torch path gives the same result
                module = None
                warnings.warn(
                    f"the sparse attention kernel did not build ({type(exc).__name__}: {str(exc)[:300]}); "
                    "recompute falls back to the slower torch path. Install g++ and ninja to build it.",
                    RuntimeWarning,
                    stacklevel=2,
                )
            _loaded.append(module)
        return _loaded[0]


def sparse_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, positions: torch.Tensor, scaling: float
) -> torch.Tensor | None:
    """Attention of sorted sparse queries over a cache in prompt order (key j at position j) under pos_k <= pos_q,
    or None where the kernel does not apply (not built, not float32, a batch of several prompts).

    query: (1, heads, Q, d); key/value: (1, kv_heads, M, d); positions: (Q,) ascending.
    Returns (1, Q, heads, d) like transformers' attention functions.
    """
    if query.shape[0] != 1 or not all(t.dtype == torch.float32 for t in (query, key, value)):
        return None
    kernel = load()
    if kernel is None:
        return None
    _, n_heads, q_len, d = query.shape
    kv_heads = key.shape[1]
    group = n_heads // kv_heads
    # Query head g*group + j reads K/V head g. Its rows go position-major, so a block's rows share their key limits
    # across the group, and each K/V block is read once for all of them.
    rows = query[0].view(kv_heads, group, q_len, d).transpose(1, 2).reshape(kv_heads, q_len * group, d)
    limits = (positions + 1).repeat_interleave(group)  # (Q * group,): row r sees keys [0, limits[r])
    out = kernel.sparse_row_attention(rows, key[0], value[0], limits, scaling)  # (kv_heads, Q * group, d)
    return out.view(kv_heads, q_len, group, d).permute(1, 0, 2, 3).reshape(1, q_len, n_heads, d)
