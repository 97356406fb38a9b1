"""A listening port as a child service: listens in ``startService``, or ends the process in one line.

Twisted's ``StreamServerEndpointService`` would do the listening, but it reports a failed listen
only as a logged failure (or, through a private attribute, ``_raiseSynchronously``, which this
project does not use): the process would go on, serving nothing, while a supervisor thinks it up.
This service raises ``SystemExit("metahub: cannot listen on ...")`` instead. twistd calls
``startService`` before it runs the reactor, and Twisted's TCP, SSL and UNIX endpoints listen at
once, so the failure is known right there and ``SystemExit`` ends twistd with that one line and
exit status 1 before the reactor starts (any other exception would print a traceback).

Twisted listens with a backlog of 50: at a thousand clients connecting at once (a cluster starting
a job) the kernel's accept queue overflows and connections wait for SYN retransmits or fail
(``wrk -c 1000`` counted 32 errors). So a ``tcp:``, ``tcp6:``, ``ssl:`` or ``unix:`` endpoint
without a backlog of its own gets :func:`listen_backlog`'s; one the user gave is kept.
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

from metahub.config.file import EndpointProblem, server_endpoint

log = Logger()


#: The listen backlog where the kernel's own cap cannot be read.
DEFAULT_BACKLOG = 1024
#: Twisted's endpoint types that take ``backlog=``.
_BACKLOG_TYPES = frozenset({"tcp", "tcp6", "ssl", "unix"})
_SOMAXCONN = "/proc/sys/net/core/somaxconn"


def listen_backlog() -> int:
    """The kernel's cap on a listen queue (Linux's ``net.core.somaxconn``, 4096 by default since
    5.4): asking for more gets that anyway, asking for less wastes it."""
    try:
        with open(_SOMAXCONN) as limit:  # procfs: answers at once, never blocks on a disk
            return max(int(limit.read()), 1)
    except (OSError, ValueError):
        return DEFAULT_BACKLOG


def with_backlog(description: str, backlog: int) -> str:
    """``description`` with ``:backlog=N`` added, unless it is not an endpoint type that takes one
    or already gives one (by keyword, or by position: then the added keyword does not parse)."""
    parts = _fields(description)
    if parts[0] not in _BACKLOG_TYPES or any(part.startswith("backlog=") for part in parts[1:]):
        return description
    candidate = f"{description}:backlog={backlog}"
    try:
        endpoints.serverFromString(None, candidate)  # parses only; nothing listens without a reactor
    except Exception:  # noqa: BLE001
        # A backlog given by position (TypeError), or an ssl: key or certificate that cannot be
        # read or loaded: the description stays as written, and building it reports the problem.
        return description
    return candidate


def _fields(description: str) -> list[str]:
    """An endpoint string's fields as Twisted reads them: split at unescaped colons, each escape
    (``\\:``, ``\\l``) read as the character it escapes, so ``back\\log=5`` is a backlog too."""
    fields, current, escaped = [], [], False
    for char in description:
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == ":":
            fields.append("".join(current))
            current = []
        else:
            current.append(char)
    fields.append("".join(current))
    return fields


def give_up(message: str) -> NoReturn:
    """End the process (twistd, before its reactor runs) with one line and exit status 1."""
    raise SystemExit(f"metahub: {message}")


class PortService(Service):
    """Serves ``factory()`` on the endpoint ``description`` while running.

    ``factory`` is called in ``startService``: what it builds may open files (the registry's site
    opens the store), which must not happen before twistd has forked. ``announce`` logs where to
    point clients (the registry's port). ``backlog`` is the listen queue's length unless the
    description gives one (:func:`with_backlog`).
    """

    def __init__(self, *, description: str, factory: Callable[[], IProtocolFactory], what: str, reactor: Any,
                 backlog: int, announce: bool = False) -> None:
        self.description = description
        self.backlog = backlog
        self.factory = factory
        self.what = what
        self.reactor = reactor
        self.announce = announce
        self.port: IListeningPort | None = None

    def startService(self) -> None:
        super().startService()
        description = self.description
        try:  # built once (an ssl: key and certificate are loaded by with_backlog's parse too)
            endpoint = server_endpoint(self.reactor, with_backlog(description, self.backlog))
        except EndpointProblem as problem:
            give_up(f"listen {description!r}: {problem}")
        outcome: list[IListeningPort | Failure] = []
        endpoint.listen(self.factory()).addBoth(outcome.append)
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
