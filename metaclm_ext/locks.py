"""Exclusive advisory locks on files (flock): one writer of a history store, one `metaclm reproduce` per folder.

The kernel releases a flock when its process dies, so a killed run never leaves a folder locked.
"""
from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Optional


def try_lock(path: Path) -> Optional[int]:
    """An open fd holding an exclusive lock on `path` (created if absent), or None when another holds it.

    Close the fd to release the lock.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd
