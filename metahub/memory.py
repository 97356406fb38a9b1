"""Keeping the server's resident memory near what it actually holds.

glibc gives each thread that allocates an arena of its own, up to eight per core, and keeps freed
blocks in the arena that allocated them. metahub's pool threads each read megabyte chunks that the
reactor thread frees after sending, so every pool thread's arena grows to its busiest moment and
stays there: in the 20-client fan-in of bench/ that was about 12 MB of a 98 MB peak. Two arenas
(the main thread's and one shared by the others) cost nothing measurable in speed there.
"""
from __future__ import annotations

import ctypes
import ctypes.util

#: mallopt's parameter number for the arena limit (malloc.h: M_ARENA_MAX).
_M_ARENA_MAX = -8
ARENAS = 2


def limit_malloc_arenas(arenas: int = ARENAS) -> bool:
    """Cap glibc's malloc arenas; call before threads start. False where libc is not glibc."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    mallopt = getattr(ctypes.CDLL(name), "mallopt", None)
    if mallopt is None:  # musl and others have no mallopt
        return False
    return bool(mallopt(_M_ARENA_MAX, arenas))
