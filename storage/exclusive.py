"""Exclusive create, the one cross-node primitive shared files rely on, as filesystems really behave.

``O_CREAT | O_EXCL`` is atomic on local disks, NFSv3+/v4 and sshfs, but sshfs reports a create that
lost the race as EPERM (SFTP's generic failure) rather than EEXIST. Callers get one answer: the file
descriptor, or None when someone else created the name first.
"""
from __future__ import annotations

import os


def create_exclusive(path: str, mode: int = 0o644) -> int | None:
    """Open a new file for writing; None if ``path`` already exists (whoever made it)."""
    try:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        return None
    except PermissionError:
        if os.path.lexists(path):
            return None
        raise
