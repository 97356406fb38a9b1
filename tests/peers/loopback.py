"""Threaded HTTP servers on 127.0.0.1 for the harness's own stand-ins (relay, token server).

They run in the test process, on port 0, in a daemon thread. Clients that drop a keep-alive
connection are normal for registry clients, so those resets are not printed as errors.
"""
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Self

from .ports import LOOPBACK, LoopbackAddress


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: socket.socket | tuple[bytes, socket.socket],
                     client_address: Any) -> None:
        """Stay quiet about clients that hang up; report anything else as usual."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class LoopbackServer(LoopbackAddress):
    """Serves ``handler`` on a free loopback port until ``stop``; also a context manager."""

    def __init__(self, handler: type[BaseHTTPRequestHandler], name: str) -> None:
        self._http = _Server((LOOPBACK, 0), handler)
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
