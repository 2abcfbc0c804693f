"""Crash-safe file replacement, shared by the KV store, the passage index and the model cache."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

TEMP_SUFFIX = ".tmp"


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
