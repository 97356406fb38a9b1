"""Who is using a node's index: running servers share a lock on it, ``cache reindex`` needs it alone.

Rebuilding the index under a running server would race the server's own writes and leave it
serving from entries being dropped. ``flock`` on a file in the index directory (local disk, as
the index always is) is released by the kernel when a process dies, so a crashed server never
leaves the index locked.
"""
from __future__ import annotations

import fcntl
import os

LOCK_FILE = "users.lock"


class IndexInUse(Exception):
    """Another process holds the index in a way that excludes this one."""


class IndexLock:
    def __init__(self, index_path: str, exclusive: bool) -> None:
        os.makedirs(index_path, exist_ok=True)
        self._fd: int | None = os.open(os.path.join(index_path, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            self._fd = None
            raise IndexInUse(index_path) from None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor drops the flock
            self._fd = None
