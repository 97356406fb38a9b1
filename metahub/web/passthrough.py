"""A blob straight from upstream to one client, when the store cannot take it: verified, not kept.

The body is hashed as it passes; the last byte the client is to receive (the latest piece, when
upstream gave no length) is held back until every byte of the blob has arrived and hashed right,
so a client never gets a complete response with wrong bytes: on a mismatch, a short body or an
upstream that stalls for ``idle_timeout``, the client's connection is aborted instead. A range is
cut from the whole body as it passes (the whole blob must be read to verify it). The client's
transport pauses the upstream connection, so a slow client costs no memory.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.server import Request
from zope.interface import implementer

from metahub.upstream.body import BODY_DONE, BodyProtocol
from metahub.web.connection import abort
from storage import from_hex

log = Logger()


@implementer(IPushProducer)
class VerifyingRelay(BodyProtocol):
    """Relays the bytes ``[start, end)`` of an upstream blob body to ``request``.

    ``size`` is the blob's length when upstream gave one (then ``end`` may be None: to the end).
    ``done`` fires with True when the client got a complete, verified response.
    """

    def __init__(
        self, request: Request, digest: str, size: int | None, start: int, end: int | None,
        clock: IReactorTime, idle_timeout: float, on_bytes: Callable[[int], None],
    ) -> None:
        self.request = request
        self.digest = digest
        self.size = size
        self.start = start
        self.end = end if end is not None else size
        self.clock = clock
        self.idle_timeout = idle_timeout
        self.on_bytes = on_bytes
        self.done: Deferred[bool] = Deferred()
        self._hash = hashlib.sha256()
        self.received = 0  # from upstream
        self._held = b""
        self._why: str | None = None  # set when the body must not complete the response
        self._client_gone = False
        self._timer: IDelayedCall | None = None

    def connectionMade(self) -> None:
        self.request.registerProducer(self, True)
        self.request.notifyFinish().addErrback(self._gone)
        self._timer = self.clock.callLater(self.idle_timeout, self._stalled)

    def _gone(self, _: Failure) -> None:
        self._client_gone = True
        self.producer.stopProducing()

    def _stalled(self) -> None:
        self._why = f"upstream stopped sending the blob for {self.idle_timeout:g} s"
        self.producer.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.reset(self.idle_timeout)
        offset = self.received
        self.received += len(data)
        self._hash.update(data)
        if self.size is not None and self.received > self.size:
            self._why = f"upstream sent more than the {self.size} bytes it announced"
            self.producer.stopProducing()
            return
        if self.end is None:  # no length: the latest piece waits for the end
            data, self._held = self._held, data
        else:
            data = data[max(self.start - offset, 0):max(self.end - offset, 0)]
            if data and offset < self.end <= self.received:  # the range's last byte waits for the verdict
                data, self._held = data[:-1], data[-1:]
        if data and not self._client_gone:
            self.request.write(data)
            self.on_bytes(len(data))

    def connectionLost(self, reason: Failure = BODY_DONE) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        if self._why is None and not reason.check(ResponseDone):
            self._why = f"the upstream body ended early: {reason.getErrorMessage()}"
        if self._why is None and self.size is not None and self.received != self.size:
            self._why = f"upstream sent {self.received} of the {self.size} bytes it announced"
        actual = from_hex(self._hash.hexdigest())
        if self._why is None and actual != self.digest:
            self._why = f"upstream sent wrong bytes (got {actual})"
        if self._client_gone:
            self.done.callback(False)
            return
        self.request.unregisterProducer()
        if self._why is not None:
            log.warn("aborting a response for {digest} served without the store: {why}", digest=self.digest, why=self._why)
            abort(self.request)
            self.done.callback(False)
            return
        if self._held:
            self.request.write(self._held)
            self.on_bytes(len(self._held))
        self.request.finish()
        self.done.callback(True)

    # The client's transport, through the request, paces the upstream connection.
    def pauseProducing(self) -> None:
        self.producer.pauseProducing()

    def resumeProducing(self) -> None:
        self.producer.resumeProducing()

    def stopProducing(self) -> None:
        self._client_gone = True
        self.producer.stopProducing()
