"""Store I/O on threads of its own, so a stalled shared store costs those threads and no others.

The reactor's thread pool also resolves upstream host names (Twisted's resolver runs
``getaddrinfo`` there); store calls that hang in the kernel on a stalled NFS or FUSE mount must not
take every one of its threads. So store I/O gets two pools of its own, ``storage.io_threads`` each:
one for opens, stats, lease and directory work (what a stall blocks first), and one for reads of
files already open, which must not queue behind new opens: a client being sent a blob keeps being
served while requests for other blobs wait for the store.
"""
from __future__ import annotations

from collections.abc import Callable
from threading import Thread
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads
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


class ThreadPoolRunner:
    """A :data:`metahub.runtime.threads.ThreadRunner` on ``threads`` threads of its own.

    Started and stopped by its service (or by the first call, for commands that run no service).
    """

    def __init__(self, reactor: IReactorFromThreads, threads: int, name: str) -> None:
        self.reactor = reactor
        self.pool: ThreadPool = _DaemonThreads(minthreads=0, maxthreads=threads, name=name)

    def start(self) -> None:
        if not self.pool.started:
            self.pool.start()

    def stop(self) -> None:
        if self.pool.started:
            self.pool.stop()

    def __call__(self, function: Callable[..., Any], *args: object) -> Deferred[Any]:
        # The server starts it with its service tree; a command (prefetch) that never does gets
        # it started by its first call, and stopped by the root's close.
        self.start()
        return deferToThreadPool(self.reactor, self.pool, function, *args)
