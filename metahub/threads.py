"""Running blocking work off the reactor thread: file I/O on a store that may be NFS, and the KDF.

Store I/O uses the reactor's thread pool. The password KDF gets a small pool of its own
(:class:`BoundedPool`): scrypt is slow on purpose, and on the shared pool a flood of logins would
queue ahead of every blob read.
"""
from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from functools import partial

from twisted.internet.defer import Deferred, fail
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from . import errors

#: ``in_thread(function, *args)``: a Deferred of the result, computed in a thread pool.
ThreadRunner = Callable[..., Deferred]


def thread_runner(reactor) -> ThreadRunner:
    return partial(deferToThreadPool, reactor, reactor.getThreadPool())


def _at_lowest_priority(function: Callable, *args: object) -> object:
    """Run ``function`` with this thread at nice 19, so any other work on the machine, blob serving
    first, gets the CPU before it. Linux keeps a nice value per thread (setpriority(2) on a thread
    id); elsewhere the call would name a process, so it is not made there."""
    if sys.platform == "linux":
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    return function(*args)


class BoundedPool:
    """A :data:`ThreadRunner` on ``threads`` threads of its own, at the lowest CPU priority, that
    holds at most ``queue`` calls waiting: beyond that a call fails at once with 503 (work a flood
    would pile up is refused instead of queued without end). Started and stopped by its service."""

    def __init__(self, reactor, threads: int, queue: int, name: str) -> None:
        self.reactor = reactor
        self.pool = ThreadPool(minthreads=0, maxthreads=threads, name=name)
        self.limit = threads + queue
        self.pending = 0

    def start(self) -> None:
        self.pool.start()

    def stop(self) -> None:
        self.pool.stop()

    def __call__(self, function: Callable, *args: object) -> Deferred:
        if self.pending >= self.limit:
            return fail(errors.RegistryError(
                503, "UNAVAILABLE", "too many logins in progress; retry later", headers={"Retry-After": "1"}
            ))
        self.pending += 1
        done = deferToThreadPool(self.reactor, self.pool, _at_lowest_priority, function, *args)
        done.addBoth(self._settled)
        return done

    def _settled(self, result: object) -> object:
        self.pending -= 1
        return result
