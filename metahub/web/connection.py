"""Breaking a client's connection: once a response has started, the only way left to say it failed."""
from __future__ import annotations

from typing import cast

from twisted.internet.interfaces import ITCPTransport
from twisted.web.server import Request


def abort(request: Request) -> None:
    """Abort the connection ``request`` came on, dropping whatever of the response is still queued."""
    # twisted.web types a request's transport as ITransport, which has no abortConnection. Its real
    # transport is a TCP connection (ITCPTransport) or Twisted's TLS wrapper over one, which has it.
    assert request.transport is not None
    cast(ITCPTransport, request.transport).abortConnection()
