"""A static HTTPS file server standing in for the CDN a registry sends blob downloads to.

Point a docker-registry's ``redirect_blobs_to`` at ``cdn.url`` and serve the registry's ``storage``
directory here: blob GETs then travel registry -> 307 -> this second TLS origin, as with Docker Hub
or ghcr.io. ``requests`` records each request path so a test can show the bytes came from here.
"""
import ssl
from functools import partial
from http.server import SimpleHTTPRequestHandler
from pathlib import Path
from typing import Any

from .loopback import LoopbackServer


class _Handler(SimpleHTTPRequestHandler):
    def __init__(self, *args: Any, requests: list[str], **kwargs: Any) -> None:
        self.requests = requests  # before the base class, which handles the request in __init__
        super().__init__(*args, **kwargs)

    def send_head(self) -> Any:
        self.requests.append(f"{self.command} {self.path}")
        return super().send_head()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass  # the test reads ``requests``; the stderr chatter would only clutter pytest's output


class CDN(LoopbackServer):
    """Serves ``directory`` over HTTPS on a free loopback port until ``stop``; a context manager."""

    def __init__(self, directory: Path, certificate: Path, key: Path) -> None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(certificate, key)
        self._requests: list[str] = []
        super().__init__(partial(_Handler, directory=str(directory), requests=self._requests), "cdn", tls=context)

    @property
    def url(self) -> str:
        return f"https://{self.host}"

    @property
    def requests(self) -> list[str]:
        """``METHOD PATH`` of every request served so far, in order."""
        return list(self._requests)
