"""A static HTTPS file server standing in for the CDN a registry sends blob downloads to.

Point a docker-registry's ``redirect_blobs_to`` at ``cdn.url`` and serve the registry's ``storage``
directory here: blob GETs then travel registry -> 307 -> this second TLS origin, as with Docker Hub
or ghcr.io. ``requests`` records each request path so a test can show the bytes came from here.

The TLS handshake is left to the request's own thread (``do_handshake_on_connect=False``) so that a
client that stalls or gives up mid-handshake cannot block the accepting thread.
"""
import ssl
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from .ports import LOOPBACK, LoopbackAddress


class _Handler(SimpleHTTPRequestHandler):
    server: "_Server"

    def send_head(self) -> Any:
        self.server.requests.append(f"{self.command} {self.path}")
        return super().send_head()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass  # the test reads ``requests``; the stderr chatter would only clutter pytest's output


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    requests: list[str]

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Stay quiet about clients that hang up or reject our certificate: tests provoke both."""


class CDN(LoopbackAddress):
    """Serves ``directory`` over HTTPS on a free loopback port until ``stop``; a context manager."""

    def __init__(self, directory: Path, certificate: Path, key: Path) -> None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(certificate, key)
        self._http = _Server((LOOPBACK, 0), partial(_Handler, directory=str(directory)))
        self._http.requests = []
        self._http.socket = context.wrap_socket(self._http.socket, server_side=True,
                                                do_handshake_on_connect=False)
        self.port: int = self._http.server_address[1]
        self._thread = threading.Thread(target=self._http.serve_forever, name="cdn", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"https://{self.host}"

    @property
    def requests(self) -> list[str]:
        """``METHOD PATH`` of every request served so far, in order."""
        return list(self._http.requests)

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
