"""A handler that fails after its client went away: nothing is written and nothing is logged as a bug.

The real ``RegistryResource`` in a plain ``Site`` over a StringTransport; the status page stands in
for any handler, so that the test decides when it fails.
"""
from __future__ import annotations

from typing import Any, cast

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from twisted.web.server import Request, Site

from metahub.runtime.metrics import Metrics
from metahub.web.api import Registry, RegistryResource


class _HangingStatus:
    """The page at /, answering only when the test fires ``gate``."""

    def __init__(self) -> None:
        self.gate: Deferred[None] = Deferred()

    async def serve(self, request: Request, resolve: object) -> None:
        await self.gate


def test_a_handler_failing_after_the_client_left_writes_and_logs_nothing() -> None:
    status = _HangingStatus()
    unused = cast(Any, None)  # the status page route needs none of the other parts
    registry = Registry(
        config=unused, upstreams=unused, manifests=unused, blobs=unused, metrics=Metrics(), auth=unused,
        in_thread=unused, virtual=unused, status=cast(Any, status),
    )
    address = IPv4Address("TCP", "10.0.0.1", 40000)
    channel = Site(RegistryResource(registry)).buildProtocol(address)
    assert channel is not None
    transport = StringTransport(peerAddress=address)
    channel.makeConnection(transport)
    channel.dataReceived(b"GET / HTTP/1.1\r\nHost: metahub.test\r\n\r\n")
    channel.connectionLost(Failure(ConnectionDone()))

    with capturedLogs() as logged:
        status.gate.errback(RuntimeError("failed because the client left"))

    assert transport.value() == b""
    assert [event for event in logged if event.get("log_failure") is not None] == []
