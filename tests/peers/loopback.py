"""Threaded HTTP servers on 127.0.0.1 for the harness's own stand-ins (relay, token server).

They run in the test process, on port 0, in a daemon thread. Clients that drop a keep-alive
connection are normal for registry clients, so those resets are not printed as errors.
"""
import socket
import ssl
import sys
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Self

from .ports import LOOPBACK, LoopbackAddress


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: socket.socket | tuple[bytes, socket.socket],
                     client_address: Any) -> None:
        """Stay quiet about clients that hang up or refuse our certificate (tests provoke both);
        report anything else as usual."""
        if not isinstance(sys.exc_info()[1], (ConnectionError, ssl.SSLError)):
            super().handle_error(request, client_address)


class LoopbackServer(LoopbackAddress):
    """Serves ``handler`` on a free loopback port until ``stop``; also a context manager.

    With ``tls``, over HTTPS. The handshake is left to each request's own thread
    (``do_handshake_on_connect=False``), so a client that stalls mid-handshake cannot block the
    accepting thread.
    """

    def __init__(self, handler: Callable[..., BaseHTTPRequestHandler], name: str,
                 tls: ssl.SSLContext | None = None) -> None:
        self._http = _Server((LOOPBACK, 0), handler)
        if tls is not None:
            self._http.socket = tls.wrap_socket(self._http.socket, server_side=True, do_handshake_on_connect=False)
        self.port: int = self._http.server_address[1]
        self._thread = threading.Thread(target=self._http.serve_forever, name=name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop listening; safe to call twice."""
        if self._thread.is_alive():
            self._http.shutdown()
            self._thread.join()
        self._http.server_close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.stop()
