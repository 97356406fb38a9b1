"""A listening port as a child service: listens in ``startService``, or ends the process in one line.

Twisted's ``StreamServerEndpointService`` would do the listening, but it reports a failed listen
only as a logged failure (or, through a private attribute, ``_raiseSynchronously``, which this
project does not use): the process would go on, serving nothing, while a supervisor thinks it up.
This service raises ``SystemExit("metahub: cannot listen on ...")`` instead. twistd calls
``startService`` before it runs the reactor, and Twisted's TCP, SSL and UNIX endpoints listen at
once, so the failure is known right there and ``SystemExit`` ends twistd with that one line and
exit status 1 before the reactor starts (any other exception would print a traceback).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, NoReturn

from twisted.application.service import Service
from twisted.internet import endpoints
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IListeningPort, IProtocolFactory
from twisted.logger import Logger
from twisted.python.failure import Failure

from metahub.config.file import endpoint_problem

log = Logger()


def give_up(message: str) -> NoReturn:
    """End the process (twistd, before its reactor runs) with one line and exit status 1."""
    raise SystemExit(f"metahub: {message}")


class PortService(Service):
    """Serves ``factory()`` on the endpoint ``description`` while running.

    ``factory`` is called in ``startService``: what it builds may open files (the registry's site
    opens the store), which must not happen before twistd has forked. ``announce`` logs where to
    point clients (the registry's port).
    """

    def __init__(self, *, description: str, factory: Callable[[], IProtocolFactory], what: str, reactor: Any,
                 announce: bool = False) -> None:
        self.description = description
        self.factory = factory
        self.what = what
        self.reactor = reactor
        self.announce = announce
        self.port: IListeningPort | None = None

    def startService(self) -> None:
        super().startService()
        description = self.description
        problem = endpoint_problem(description)
        if problem is not None:
            give_up(f"listen {description!r}: {problem}")
        outcome: list[IListeningPort | Failure] = []
        endpoints.serverFromString(self.reactor, description).listen(self.factory()).addBoth(outcome.append)
        if not outcome:  # none of Twisted's own endpoint types listens later
            give_up(f"the endpoint {description!r} does not listen at once; use tcp:, ssl: or unix:")
        if isinstance(outcome[0], Failure):
            give_up(f"cannot listen on {description}: {outcome[0].getErrorMessage()}")
        self.port = outcome[0]
        address = self.port.getHost()
        log.info("metahub serving {what} on {where}", what=self.what, where=_bound(address) or description)
        if self.announce and isinstance(address, (IPv4Address, IPv6Address)):
            scheme = "https" if description.startswith("ssl:") else "http"
            host = f"[{address.host}]" if isinstance(address, IPv6Address) else address.host
            log.info("point clients at {url} (e.g. docker pull {where}/library/alpine)",
                     url=f"{scheme}://{host}:{address.port}", where=f"{host}:{address.port}")

    def stopService(self) -> Deferred[None]:
        super().stopService()
        port, self.port = self.port, None
        if port is None:
            return succeed(None)
        stopped = port.stopListening()
        return succeed(None) if stopped is None else stopped  # IListeningPort allows either

    def address(self) -> str:
        """The endpoint, and the address it is bound to once listening (``tcp:0`` picks a port)."""
        if self.port is None:
            return self.description
        bound = _bound(self.port.getHost())
        return f"{self.description} ({bound})" if bound is not None else self.description


def _bound(address: object) -> str | None:
    """``host:port`` of an IP address (None for a UNIX socket, which its description names)."""
    if isinstance(address, (IPv4Address, IPv6Address)):
        return f"{address.host}:{address.port}"
    return None
