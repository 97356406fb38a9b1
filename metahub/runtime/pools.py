"""Store I/O on threads of its own, so a stalled shared store costs those threads and no others.

The reactor's thread pool also resolves upstream host names (Twisted's resolver runs
``getaddrinfo`` there); store calls that hang in the kernel on a stalled NFS or FUSE mount must not
take every one of its threads. So store I/O gets two pools of its own, ``storage.io_threads`` each:
one for opens, stats, lease and directory work (what a stall blocks first), and one for reads of
files already open, which must not queue behind new opens: a client being sent a blob keeps being
served while requests for other blobs wait for the store.

A pool holds the threads its work needs, up to its limit: it starts with one and adds one whenever a
call has waited :data:`GROW_AFTER` for a thread. Twisted's pool starts a thread for every call that
finds none idle, so the stats and opens of 24 layers asked for at once cost 8 threads each time,
for calls of a few microseconds; a stalled mount, whose calls wait, still gets every thread.
"""
from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable
from threading import Lock, Thread
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool


class _DaemonThreads(ThreadPool):
    """A pool whose threads do not hold the process at exit: one stuck in the kernel on a stalled
    mount would otherwise keep a stopped server (or a finished command) alive until the mount
    answers."""

    @staticmethod
    def threadFactory(*args: Any, **kwargs: Any) -> Thread:  # type: ignore[override]  # noqa: N802
        # Twisted declares the class Thread as its factory; any callable that returns one will do.
        return Thread(*args, daemon=True, **kwargs)


#: How long a call may wait for a thread before its pool adds one (while below its limit).
GROW_AFTER = 0.01

#: The most threads a store pool gets by default, whatever the core count.
MAX_DEFAULT_IO_THREADS = 4


def available_cores() -> int:
    """The cores this process may run on (a container's share, where Linux says)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_io_threads() -> int:
    """Threads of each store pool when ``storage.io_threads`` is not set: half a core's worth plus
    one, at least 2, at most :data:`MAX_DEFAULT_IO_THREADS`.

    Issue 14 bounds the whole process at 2 x cores + 8 threads whatever the number of layers being
    fetched; the store's calls are short (the page cache answers most), so more threads than this
    only wait for the GIL. Scenario 6 of bench/ (48 cold layers, 8 clients x 4) took the same wall
    time, 4.18 s, with 2 threads a pool as with 8, and peaked at 10 threads instead of 19. A
    stalled mount blocks its calls however many threads wait in it.
    """
    return max(2, min(available_cores() // 2 + 1, MAX_DEFAULT_IO_THREADS))


class ThreadPoolRunner:
    """A :data:`metahub.runtime.threads.ThreadRunner` on up to ``threads`` threads of its own.

    Started and stopped by its service (or by the first call, for commands that run no service).
    """

    def __init__(self, reactor: Any, threads: int, name: str) -> None:
        # ``reactor``: IReactorFromThreads for the results and IReactorTime for the growth timer
        # (zope interfaces, which one annotation cannot combine).
        self.reactor = reactor
        self.limit = threads
        self.threads = 1  # the pool's size now; grown towards the limit by calls that wait
        self.pool: ThreadPool = _DaemonThreads(minthreads=0, maxthreads=1, name=name)
        #: When each call not yet known to have begun was submitted (they begin in this order).
        self._waiting: deque[float] = deque()
        self._begun = 0  # calls a thread has begun (counted on the pool's threads)
        self._begun_lock = Lock()
        self._forgotten = 0  # calls dropped from _waiting once known to have begun
        self._check: IDelayedCall | None = None

    def start(self) -> None:
        if not self.pool.started:
            self.pool.start()

    def stop(self) -> None:
        if self._check is not None and self._check.active():
            self._check.cancel()  # a stopped pool takes no new threads
        self._check = None
        if self.pool.started:
            self.pool.stop()

    def __call__(self, function: Callable[..., Any], *args: object) -> Deferred[Any]:
        # The server starts it with its service tree; a command (prefetch) that never does gets
        # it started by its first call, and stopped by the root's close.
        self.start()
        self._waiting.append(self.reactor.seconds())
        done = deferToThreadPool(self.reactor, self.pool, self._begin, function, *args)
        self._forget_begun()
        if self._check is None and self._waiting and self.threads < self.limit:
            self._check = self.reactor.callLater(GROW_AFTER, self._grow)
        return done

    def _begin(self, function: Callable[..., Any], *args: object) -> Any:
        with self._begun_lock:
            self._begun += 1
        return function(*args)

    def _forget_begun(self) -> None:
        while self._forgotten < self._begun:
            self._waiting.popleft()
            self._forgotten += 1

    def _grow(self) -> None:
        """Add a thread if the oldest call waiting has waited :data:`GROW_AFTER`; while calls
        wait and the pool is below its limit, look again when the next one will have."""
        self._check = None
        self._forget_begun()
        if not self._waiting:
            return
        now = self.reactor.seconds()
        due = self._waiting[0] + GROW_AFTER
        if now >= due - GROW_AFTER / 1000:  # a float clock may fire a hair early
            self.threads += 1
            self.pool.adjustPoolsize(maxthreads=self.threads)
            self.pool.startAWorker()  # takes the oldest waiting call
            due = now + GROW_AFTER  # then the next waiting call, given as long again
        if self.threads < self.limit:
            self._check = self.reactor.callLater(max(due - now, 0), self._grow)
