"""Whether the store can take a file now: a full, read-only or failing store turns the cache into a proxy.

A write that fails with an OS error (ENOSPC, EDQUOT, EROFS, EIO, a lost NFS server) marks the store
unable to store for ``RETRY_AFTER`` seconds. Meanwhile requests are served straight from upstream,
verified and not kept, without trying the store again: a download that ran out of space midway
aborts its clients, and their retries must not run into the same wall. After that time (or once a
collection has made room) the next request tries the store again, and a write that lands clears the
state. Every failure logs a warning; the first of each period also asks eviction to make room.
"""
from __future__ import annotations

import errno
from collections.abc import Callable

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from metahub.runtime.metrics import Metrics
from storage import BlobWriteError

log = Logger()

#: How long requests go straight to upstream after the store refused a file, before it is tried again.
RETRY_AFTER = 30.0

_NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})


class StoreUnavailable(Exception):
    """The store cannot take this file now: serve it from upstream without keeping it."""


def store_error(failure: BaseException) -> OSError | None:
    """The OS error under a store failure (a BlobWriteError wraps the one its write hit), if any."""
    if isinstance(failure, OSError):
        return failure
    if isinstance(failure, BlobWriteError) and isinstance(failure.__cause__, OSError):
        return failure.__cause__
    return None


def reason(error: OSError) -> str:
    """A fixed label for the metric: ``no_space``, ``read_only`` or ``io``."""
    if error.errno in _NO_SPACE:
        return "no_space"
    if error.errno == errno.EROFS:
        return "read_only"
    return "io"


class StoreCapacity:
    def __init__(
        self, *, clock: IReactorTime, metrics: Metrics, make_room: Callable[[], None] | None = None,
        retry_after: float = RETRY_AFTER,
    ) -> None:
        self.clock = clock
        self.metrics = metrics
        self.make_room = make_room
        self.retry_after = retry_after
        self._refused_until: float | None = None

    def can_store(self) -> bool:
        """False while a recent failure says a new file would fail too."""
        return self._refused_until is None or self.clock.seconds() >= self._refused_until

    def failed(self, error: OSError, what: str) -> None:
        """The store refused ``what`` (a blob, a manifest, a lease) with ``error``."""
        why = reason(error)
        self.metrics.store_write_failures.labels(why).inc()
        self.metrics.store_full.set(1 if why == "no_space" else 0)
        was_storing = self.can_store()  # once per refusal period, not per concurrent failure
        self._refused_until = self.clock.seconds() + self.retry_after
        log.warn(
            "the store cannot take {what} ({error}): serving straight from upstream, not keeping it, "
            "for the next {seconds:g} s",
            what=what, error=error, seconds=self.retry_after,
        )
        if was_storing and self.make_room is not None:
            self.make_room()

    def stored(self) -> None:
        """A file landed: the store takes files again."""
        if self._refused_until is not None:
            self._refused_until = None
            self.metrics.store_full.set(0)
            log.info("the store takes files again")

    def retry(self) -> None:
        """Room was made: let the next request try the store at once."""
        if self._refused_until is not None:
            self._refused_until = self.clock.seconds()

    def bypassed(self, kind: str) -> None:
        """A ``kind`` (blob, manifest) was served from upstream without being kept."""
        self.metrics.store_bypassed.labels(kind).inc()
