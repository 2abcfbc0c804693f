"""The compiled kernels (C++, built where they run): the attention of position-sorted queries over their key
prefixes (sparse_kernel.cpp, used through :mod:`.sparse_kernel`), the attention of a few rows over a whole cache (a
decoding step, a question's scoring pass: few_row_attention.cpp, through :mod:`.few_row_attention`), linear layers
of a few rows (few_row_linear.cpp, through :mod:`.few_rows`) and placement's key rotation (key_rotation.cpp, through
:func:`.placement.rotate_keys`); kernels.cpp binds them into one extension.

Built from source on first use (the engine's first forward: loading a model prefills its fixed prefix) with
torch's extension loader (g++ and ninja; ~40 s once per machine, source, Python and torch version, under
``~/.cache/torch_extensions`` or ``$TORCH_EXTENSIONS_DIR``). Where it cannot build (no compiler), :func:`load`
warns once and returns None, and the engine runs the torch paths, with the same results to float rounding.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import sys
import threading
import time
import warnings
from pathlib import Path
from types import ModuleType

import torch

SOURCES = [
    Path(__file__).with_name(name)
    for name in ("kernels.cpp", "sparse_kernel.cpp", "few_row_attention.cpp", "few_row_linear.cpp", "key_rotation.cpp")
]
# -march=native: the kernels are built on the machine that runs them; -ffast-math lets the compiler vectorize the
# softmax's max, exp and sum and the linear's dot products (the sources never form an infinity, see their comments).
CFLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp"]
# A build takes ~40 s. torch's loader waits, without end, on the lock file of a build in progress; a lock this old
# was left by a build that was killed (kill -9), and is removed instead of hanging every later process.
STALE_LOCK_S = 600

_lock = threading.Lock()
_loaded: list[ModuleType | None] = []  # empty until the first load; then the module, or None if it did not build


def _cpu_tag() -> str:
    """A short hash of this CPU's instruction set: a build cache shared by machines of other CPUs (a home on
    NFS) keeps one -march=native build per CPU instead of loading one that may not run here."""
    try:  # x86 lists its instruction set as "flags", ARM as "Features"
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        flags = next(line for line in lines if line.startswith(("flags", "Features")))
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


def _build_directory(root: str, name: str) -> Path:
    """Where the kernels build: one directory per Python and torch version too, as an extension built against
    one libtorch does not load into another (torch's own default separates Python versions only)."""
    version = f"py{sys.version_info.major}{sys.version_info.minor}_torch{torch.__version__}"
    path = Path(root) / version / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def _remove_stale_lock(build_directory: Path) -> None:
    lock = build_directory / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return
    if age > STALE_LOCK_S:
        lock.unlink(missing_ok=True)
        warnings.warn(
            f"removed {lock}, left {age:.0f} s ago by a kernel build that did not finish; building again",
            RuntimeWarning,
            stacklevel=3,
        )


def load() -> ModuleType | None:
    """The built kernels module (building it on the first call), or None if it cannot be built here."""
    with _lock:
        if not _loaded:
            from torch.utils import cpp_extension  # imports setuptools: only when a forward first needs it

            _put_ninja_on_path()
            name = f"infoflow_kernels_{_cpu_tag()}"
            try:
                root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
                build_directory = _build_directory(root, name)
                _remove_stale_lock(build_directory)
                module = cpp_extension.load(
                    name=name,
                    sources=[str(source) for source in SOURCES],
                    extra_cflags=CFLAGS,
                    extra_ldflags=["-fopenmp"],
                    build_directory=str(build_directory),
                )
            except Exception as exc:  # no compiler, no ninja, a read-only cache, a failed build: torch paths instead
                module = None
                warnings.warn(
                    f"the compiled kernels did not build ({type(exc).__name__}: {str(exc)[:300]}); "
                    "attention and linear layers fall back to the slower torch paths (same results to float rounding). "
                    "Install g++ and ninja to build them.",
                    RuntimeWarning,
                    stacklevel=2,
                )
            _loaded.append(module)
        return _loaded[0]


def for_attention(query: torch.Tensor, *tensors: torch.Tensor) -> ModuleType | None:
    """:func:`for_tensors` for an attention call: the attention kernels take one prompt (a batch of 1) at a time."""
    return for_tensors(query, *tensors) if query.shape[0] == 1 else None


def for_tensors(*tensors: torch.Tensor) -> ModuleType | None:
    """The kernels module if it takes ``tensors`` (float32 on the CPU, in a forward that records no gradients: the
    kernels have no backward), else None: the caller runs its torch path."""
    if not all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors):
        return None
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return None
    return load()
