"""Keeping the server's resident memory near what it actually holds.

Blob traffic comes in bursts (a fan-in holds a chunk per client) and glibc keeps what a burst freed
for later, so the resident size after a burst is its peak. Three measures:

* :func:`tune_malloc` caps the arenas. glibc gives each thread that allocates an arena of its
  own, up to eight per core, and keeps freed blocks in the arena that allocated them. The pool
  threads read chunks that the reactor thread frees after sending, so every pool thread's arena
  grows to its busiest moment: in the 20-client fan-in of bench/ two arenas (the main thread's
  and one shared by the others) gave a peak of 86 MB instead of 98 MB, at no measurable cost.
* :func:`tune_malloc` also fixes glibc's mmap threshold at 4 MiB, so a block that large always
  gets pages of its own that go back to the kernel when freed. glibc's default raises the
  threshold to the size of the largest block freed so far: after one login, scrypt's 16 MiB work
  area then came from an arena and stayed resident, and every login on another pool thread added
  16 MB. Blob chunks (1 MiB at most) stay below it, so the copying path is unchanged; the trim
  threshold is fixed with it (8 MiB) so freeing a chunk at the heap's top does not shrink it.
* :class:`Releaser`: once no blob is being served, ``malloc_trim`` hands the free memory back to
  the kernel (a millisecond or two), so the next burst starts from the server's real size.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime

#: mallopt's parameter numbers (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
ARENAS = 2
MMAP_THRESHOLD = 4 << 20
TRIM_THRESHOLD = 8 << 20
#: Seconds without blob traffic before the free memory is handed back.
QUIET = 1.0


@functools.cache  # find_library runs ldconfig: once per process, not on every trim
def _glibc(function: str) -> Callable[..., int] | None:
    """A glibc malloc tuning function, or None where libc is not glibc (musl has neither)."""
    name = ctypes.util.find_library("c")
    return None if name is None else getattr(ctypes.CDLL(name), function, None)


def tune_malloc() -> bool:
    """Cap glibc's arenas and fix its thresholds; call before threads start. False where libc is
    not glibc or refused a setting."""
    mallopt = _glibc("mallopt")
    if mallopt is None:
        return False
    settings = ((_M_ARENA_MAX, ARENAS), (_M_MMAP_THRESHOLD, MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return all([bool(mallopt(parameter, value)) for parameter, value in settings])


def malloc_trim() -> None:
    trim = _glibc("malloc_trim")
    if trim is not None:
        trim(0)


class Releaser:
    """Counts blob requests in progress; :data:`QUIET` seconds after the last ends, trims."""

    def __init__(self, clock: IReactorTime, trim: Callable[[], None] = malloc_trim) -> None:
        self.clock = clock
        self.trim = trim
        self.active = 0
        self._pending: IDelayedCall | None = None

    def started(self) -> None:
        self.active += 1

    def ended(self) -> None:
        self.active -= 1
        if self.active > 0:
            return
        if self._pending is None:
            self._pending = self.clock.callLater(QUIET, self._quiet)
        else:
            self._pending.reset(QUIET)

    def _quiet(self) -> None:
        self._pending = None
        if self.active == 0:
            self.trim()
