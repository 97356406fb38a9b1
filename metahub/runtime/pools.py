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

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool


class ThreadPoolRunner:
    """A :data:`metahub.runtime.threads.ThreadRunner` on ``threads`` threads of its own.

    Calls made before :meth:`start` wait for it. Started and stopped by its service.
    """

    def __init__(self, reactor, threads: int, name: str) -> None:
        self.reactor = reactor
        self.pool = ThreadPool(minthreads=0, maxthreads=threads, name=name)

    def start(self) -> None:
        self.pool.start()

    def stop(self) -> None:
        self.pool.stop()

    def __call__(self, function: Callable, *args: object) -> Deferred:
        return deferToThreadPool(self.reactor, self.pool, function, *args)
