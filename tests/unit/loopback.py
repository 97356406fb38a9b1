"""An HTTP connection over real loopback TCP, for the code that writes to the socket itself
(metahub.web.sendfile): metahub's own channel (``RegistrySite``) on Twisted's TCP transport, whose
reactor is a memory reactor the test turns by hand (each writer's ``doWrite`` is what the reactor
would call when the socket can take bytes). The client is a plain socket read by a thread.
"""
from __future__ import annotations

import socket
import threading
import time

from twisted.internet import tcp
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.resource import IResource

from metahub.config.file import HttpConfig
from metahub.web.site import RegistrySite

PEER = IPv4Address("TCP", "127.0.0.1", 40000)


def socket_pair() -> tuple[socket.socket, socket.socket]:
    """Server and client ends of a loopback TCP connection."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    return server, client


class Loopback:
    """One client connection to ``resource``, the server's reactor turned by the test."""

    def __init__(self, resource: IResource) -> None:
        self.reactor = MemoryReactorClock()
        site = RegistrySite(resource, HttpConfig(), access_log=False, reactor=Clock())
        self.channel = site.buildProtocol(PEER)
        assert isinstance(self.channel, HTTPChannel)
        server, self.client = socket_pair()
        # What tcp.Port does with an accepted connection (no Port here: the reactor is in memory).
        self.transport = tcp.Server(server, self.channel, ("127.0.0.1", 40000), None, 1, self.reactor)
        self.channel.makeConnection(self.transport)
        self.received = bytearray()
        self._reader: threading.Thread | None = None

    def get(self, path: bytes = b"/blob") -> None:
        self.channel.dataReceived(b"GET %s HTTP/1.1\r\nHost: metahub.test\r\n\r\n" % path)

    def read_in_background(self, body_length: int) -> None:
        """Read a response of ``body_length`` body bytes in a thread (or until the server closes)."""

        def complete() -> bool:
            head, separator, body = bytes(self.received[:100_000]).partition(b"\r\n\r\n")
            return bool(separator) and len(self.received) - len(head) - 4 >= body_length

        def read() -> None:
            while not complete():
                try:
                    chunk = self.client.recv(1 << 20)
                except OSError:  # reset
                    return
                if not chunk:
                    return
                self.received += chunk

        self._reader = threading.Thread(target=read, daemon=True)
        self._reader.start()

    def turn(self) -> None:
        """One turn of the reactor: everything waiting to write gets its doWrite."""
        for writer in list(self.reactor.getWriters()):
            writer.doWrite()

    def body_so_far(self) -> bytes:
        return bytes(self.received).partition(b"\r\n\r\n")[2]

    def turn_until_body(self, length: int, timeout: float = 10.0) -> bytes:
        """Turn the reactor until the client has ``length`` body bytes (the reactor writes what the
        transport holds; sendfile's jobs have sent theirs already)."""
        deadline = time.monotonic() + timeout
        while len(self.body_so_far()) < length:
            assert time.monotonic() < deadline, f"the client has {len(self.body_so_far())} of {length} bytes"
            self.turn()
            time.sleep(0.001)
        return self.body_so_far()

    def join(self) -> bytes:
        assert self._reader is not None
        self._reader.join(timeout=10)
        return bytes(self.received)

    def close(self) -> None:
        self.client.shutdown(socket.SHUT_RDWR)
        if self._reader is not None:
            self._reader.join(timeout=10)
        self.client.close()
        if self.transport.connected:
            self.transport.connectionLost(Failure(ConnectionDone()))
