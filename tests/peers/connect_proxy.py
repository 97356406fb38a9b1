"""An HTTPS (CONNECT) proxy that sends one made-up host name to a loopback port.

dockerd skips certificate checks for any registry whose host resolves into 127.0.0.0/8, so a test
that proves it verifies metahub's certificate has to call metahub by a name that does not resolve
(``metahub.test``, a reserved TLD) and give the daemon this proxy: dockerd then asks it to
``CONNECT metahub.test:PORT`` and the TLS session runs end to end through the tunnel, checked
against the CA for that name. Any other destination is refused, so a pull cannot quietly go
elsewhere (Docker Hub, say) and pass; ``tunnels`` counts what was let through.
"""
import select
import socket
import threading
from http.server import BaseHTTPRequestHandler

from .loopback import LoopbackServer
from .ports import LOOPBACK

CHUNK = 64 * 1024


def _splice(client: socket.socket, server: socket.socket) -> None:
    """Copy bytes both ways until either side closes."""
    sockets = [client, server]
    while True:
        readable, _, _ = select.select(sockets, [], [], 60)
        if not readable:
            return
        for source in readable:
            data = source.recv(CHUNK)
            if not data:
                return
            (server if source is client else client).sendall(data)


class ConnectProxy(LoopbackServer):
    """Tunnels ``CONNECT name:port`` to 127.0.0.1:port and refuses everything else."""

    def __init__(self, name: str, port: int) -> None:
        self.destination = f"{name}:{port}"
        self.target_port = port
        self.tunnels = 0
        self._lock = threading.Lock()
        super().__init__(self._handler_class(), "connect-proxy")

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_CONNECT(self) -> None:
                if self.path.lower() != proxy.destination:
                    self.send_error(403, f"this proxy only reaches {proxy.destination}")
                    return
                with socket.create_connection((LOOPBACK, proxy.target_port), timeout=10) as server:
                    with proxy._lock:
                        proxy.tunnels += 1
                    self.send_response(200, "Connection established")
                    self.end_headers()
                    _splice(self.connection, server)
                self.close_connection = True

            def log_message(self, format: str, *args: object) -> None:
                """Quiet: the test reads ``tunnels``, not stderr."""

        return Handler
