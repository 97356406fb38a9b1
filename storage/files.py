"""Small durable-file helpers shared by the store's modules: full writes, directory fsync, and
replacing a small file atomically through the store's ``tmp/`` (where crash leftovers are swept)."""
from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Sequence


def write_all(fd: int, data: bytes | memoryview) -> None:
    """``os.write`` until every byte is written (a write may take only part)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


#: The most buffers one ``writev`` takes (POSIX IOV_MAX; Linux's is 1024).
_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 16


def writev_all(fd: int, pieces: Sequence[bytes | memoryview]) -> int:
    """Write ``pieces`` in order with as few ``os.writev`` calls as they take, without joining them
    (a join copies every byte once more); returns the bytes written. A write may take only part."""
    views = [memoryview(piece) for piece in pieces if len(piece)]
    total = 0
    while views:
        done = os.writev(fd, views[:_IOV_MAX])
        total += done
        while views and done >= len(views[0]):
            done -= len(views.pop(0))
        if done:
            views[0] = views[0][done:]
    return total


def fsync_dir(path: str) -> None:
    """Make a rename durable; some filesystems (FUSE, NFS) refuse to open a directory, which is fine."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def replace_file(final: str, data: bytes, tmp_dir: str, kind: str) -> None:
    """Put ``data`` at ``final`` so readers see the old file or the new one, never a part.

    The temporary file is written, fsynced and renamed from ``tmp_dir`` (same filesystem), named
    ``<kind>.<host>-<pid>-<random>.tmp`` so a crash leftover is swept with the store's other
    temporary files; ``final``'s directory is fsynced after the rename.
    """
    temp = os.path.join(tmp_dir, f"{kind}.{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(6)}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        try:
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(temp, final)
    except BaseException:
        try:
            os.unlink(temp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(os.path.dirname(final))
