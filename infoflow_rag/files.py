"""Crash-safe file replacement, shared by the KV store, the passage index and the model cache."""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from pathlib import Path

TEMP_SUFFIX = ".tmp"
# A temp file this old was left by a process that died mid-write (SIGKILL, power loss): a write takes seconds at most.
STALE_TEMP_S = 3600.0


def _process_umask() -> int:
    # Read once, at import (os.umask can only be read by setting it, which is not safe once threads run).
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# mkstemp makes its file readable by its owner only; a replaced file gets the permissions a new file written with
# plain open would get, so a store or index shared between users stays readable to them.
NEW_FILE_MODE = 0o666 & ~_process_umask()


def atomic_write(path: Path, data: bytes | memoryview) -> None:
    """Write ``data`` to ``path`` so readers see the old file or the whole new one, never a torn one.

    The temp file lives in the target directory because ``os.replace`` is only atomic within one
    file system; it is fsynced first so a crash cannot leave the new name pointing at unwritten data.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    try:
        with contextlib.suppress(OSError):  # file systems without permissions (vfat, some CIFS) refuse it
            os.fchmod(fd, NEW_FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def remove_stale_temps(directory: Path, older_than_s: float = STALE_TEMP_S) -> int:
    """Delete the temp files :func:`atomic_write` left in ``directory`` when its process died mid-write, those older
    than ``older_than_s`` (another process's write under way is younger); nothing where they cannot be deleted.
    Returns how many were deleted: each was the size of the file it was writing, and nothing else would free it."""
    cutoff, removed = time.time() - older_than_s, 0
    with contextlib.suppress(OSError), os.scandir(directory) as entries:
        for entry in entries:
            if not (entry.name.startswith(".") and entry.name.endswith(TEMP_SUFFIX)):
                continue
            with contextlib.suppress(OSError):
                if entry.is_file(follow_symlinks=False) and entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)
                    removed += 1
    return removed
