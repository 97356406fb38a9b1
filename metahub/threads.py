"""Running blocking work (file I/O on a store that may be NFS, scrypt) off the reactor thread."""
from __future__ import annotations

from collections.abc import Callable
from functools import partial

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool

#: ``in_thread(function, *args)``: a Deferred of the result, computed in the reactor's thread pool.
ThreadRunner = Callable[..., Deferred]


def thread_runner(reactor) -> ThreadRunner:
    return partial(deferToThreadPool, reactor, reactor.getThreadPool())
