"""The site's channel sends large pieces on a TCP connection, and leaves other transports alone."""
from __future__ import annotations

from twisted.internet.abstract import FileDescriptor
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IAddress
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.web.resource import Resource

from metahub.config.file import HttpConfig
from metahub.web.site import RegistrySite

_PEER = IPv4Address("TCP", "10.0.0.1", 40000)


class _Connection(FileDescriptor):
    """A connection as twisted.internet.tcp makes one, without a socket."""

    def getPeer(self) -> IAddress:  # noqa: N802
        return _PEER

    def getHost(self) -> IAddress:  # noqa: N802
        return _PEER


def _connect(transport: object) -> None:
    channel = RegistrySite(Resource(), HttpConfig(), reactor=Clock()).buildProtocol(_PEER)
    assert channel is not None
    channel.makeConnection(transport)


def test_a_tcp_connection_sends_up_to_a_mebibyte_at_a_time() -> None:
    connection = _Connection(reactor=MemoryReactorClock())
    _connect(connection)
    assert connection.SEND_LIMIT == 1 << 20


def test_another_transport_is_left_alone() -> None:
    transport = StringTransport(peerAddress=_PEER)
    _connect(transport)
    assert not hasattr(transport, "SEND_LIMIT")
