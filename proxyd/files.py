"""Replacing a file whole: what proxyd writes that someone else reads (the users
file, the accounting state, a worker's status snapshot, the settings a reload
hands to workers) is written beside it and renamed over it, so a reader, or the
next start after a crash, finds the old file or the new one, never half of one."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def replace(path: Path, data: bytes, *, mode: int = 0o600, durable: bool = False) -> None:
    """Make `path` hold `data` (with `mode`), in one rename. `durable`: on disk before
    this returns (file and directory synced), as state that must outlive a power cut
    is. On failure (a full disk) nothing is left behind and the old file stays."""
    directory = path.parent
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:  # the rename itself
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
