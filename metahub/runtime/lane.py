"""A lane: blocking jobs run one after another, in order, in a thread of their own.

A download's bytes are hashed and written to its temporary file in a lane, not on the reactor:
hashing 200 MiB costs a core for a while, and a write to a shared store can stall for as long as
the NFS server does. Order matters (the hash is of the bytes in sequence, and the commit comes
after the last write), which is why each download has its own thread rather than sharing the
reactor's pool, whose threads take jobs in any order.
"""
from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.python.failure import Failure


class Lane(Protocol):
    def run(self, job: Callable[..., Any], *args: Any) -> Deferred[Any]:
        """Run ``job(*args)`` after every job submitted before it; the result fires on the reactor."""

    def close(self) -> None:
        """No more jobs: the lane's thread ends once those submitted have run."""


class ThreadLane:
    """A :class:`Lane` on a daemon thread; results reach the reactor through ``callFromThread``."""

    def __init__(self, reactor: IReactorFromThreads, name: str) -> None:
        self._reactor = reactor
        self._jobs: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...], Deferred[Any]] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def run(self, job: Callable[..., Any], *args: Any) -> Deferred[Any]:
        done: Deferred[Any] = Deferred()
        self._jobs.put((job, args, done))
        return done

    def close(self) -> None:
        self._jobs.put(None)

    def _work(self) -> None:
        while (item := self._jobs.get()) is not None:
            job, args, done = item
            try:
                result = job(*args)
            except BaseException:
                self._reactor.callFromThread(done.errback, Failure())
            else:
                self._reactor.callFromThread(done.callback, result)


#: Makes the lane of one download, given a name for its thread.
LaneFactory = Callable[[str], Lane]


def thread_lanes(reactor: IReactorFromThreads) -> LaneFactory:
    return lambda name: ThreadLane(reactor, name)
