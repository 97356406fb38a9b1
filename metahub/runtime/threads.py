"""Running blocking work off the reactor thread: file I/O on a store that may be NFS, and the KDF.

Store I/O runs on pools of its own (:mod:`metahub.runtime.pools`). The password KDF gets a small
pool of its own (:class:`BoundedPool`): scrypt is slow on purpose, and on a shared pool a flood of
logins would queue ahead of everything else.
"""
from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from typing import Protocol, TypeVar, TypeVarTuple

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from metahub.oci import errors

_R = TypeVar("_R")
_T = TypeVar("_T")
_Args = TypeVarTuple("_Args")


class ThreadRunner(Protocol):
    """``in_thread(function, *args)``: a Deferred of the result, computed in a thread pool."""

    def __call__(self, function: Callable[[*_Args], _R], /, *args: *_Args) -> Deferred[_R]: ...


#: The KDF threads' nice value: blob serving on the same machine wins the CPU about 9 times in 10,
#: yet a busy machine still checks passwords in reasonable time (nice 19 would all but stop them).
KDF_NICE = 10


def _at_low_priority(function: Callable[[*_Args], _R], *args: *_Args) -> _R:
    """Run ``function`` with this thread at nice :data:`KDF_NICE` (never raising its priority, which
    needs privileges). Linux keeps a nice value per thread (setpriority(2) on a thread id);
    elsewhere that call would name a process, so it is not made there."""
    if sys.platform == "linux":
        thread = threading.get_native_id()
        if os.getpriority(os.PRIO_PROCESS, thread) < KDF_NICE:
            os.setpriority(os.PRIO_PROCESS, thread, KDF_NICE)
    return function(*args)


class BoundedPool:
    """A :data:`ThreadRunner` on ``threads`` threads of its own, at a low CPU priority, that
    holds at most ``queue`` calls waiting: beyond that a call fails at once with 503 (work a flood
    would pile up is refused instead of queued without end). Started and stopped by its service."""

    def __init__(self, *, reactor: IReactorFromThreads, threads: int, queue: int, name: str) -> None:
        self.reactor = reactor
        self.pool = ThreadPool(minthreads=0, maxthreads=threads, name=name)
        self.limit = threads + queue
        self.pending = 0

    def start(self) -> None:
        self.pool.start()

    def stop(self) -> None:
        self.pool.stop()

    def __call__(self, function: Callable[[*_Args], _R], /, *args: *_Args) -> Deferred[_R]:
        if self.pending >= self.limit:
            return fail(errors.RegistryError(
                503, "UNAVAILABLE", "too many logins in progress; retry later", headers={"Retry-After": "1"}
            ))
        self.pending += 1
        done = deferToThreadPool(self.reactor, self.pool, lambda: _at_low_priority(function, *args))
        done.addBoth(self._settled)
        return done

    def _settled(self, result: _T) -> _T:
        self.pending -= 1
        return result
