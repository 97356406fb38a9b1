"""The base of the protocols that receive an upstream response body (``IResponse.deliverBody``)."""
from __future__ import annotations

from typing import cast

from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone

#: The default reason of a body protocol's ``connectionLost``: the body ended (Twisted always passes one).
BODY_DONE = Failure(ResponseDone())


class BodyProtocol(Protocol):
    """A protocol for a response body, whose transport pauses, resumes or stops the body."""

    @property
    def producer(self) -> IPushProducer:
        # IResponse.deliverBody connects the protocol to an IPushProducer, which the type of
        # Protocol.transport (ITransport | None) cannot say. Stopping it closes the connection.
        return cast(IPushProducer, self.transport)
