"""The HTTP site: twisted.web's, plus one courtesy that container clients depend on.

skopeo, podman and containerd try HTTPS first on a registry they were told is insecure, and fall
back to plain HTTP only when the TLS handshake fails. A plain-HTTP server that waits silently on
the ClientHello costs every pull the client's handshake timeout (10 s for skopeo). Like Go's
net/http, we answer a TLS record on a plain connection with a 400 at once, so the fallback is
immediate.
"""
from __future__ import annotations

from twisted.web.http import HTTPChannel
from twisted.web.resource import IResource
from twisted.web.server import Site

_TLS_HANDSHAKE_RECORD = b"\x16"
#: Twisted sends at most 128 KiB per send(); blobs are large, and 1 MiB sends roughly doubled
#: cached throughput in bench/ (docs/benchmarks.md). The pause threshold (``bufferSize``) stays at
#: Twisted's 64 KiB: any chunk written pauses the sender until it has drained (streaming.py).
_SEND_LIMIT = 1 << 20
_PLAIN_HTTP_ONLY = b"HTTP/1.0 400 Bad Request\r\n\r\nClient sent an HTTP request to an HTTPS server.\n"


class RegistryChannel(HTTPChannel):
    _first_bytes_seen = False

    def connectionMade(self) -> None:
        super().connectionMade()
        if getattr(self.transport, "SEND_LIMIT", None) is not None:  # plain TCP (not a TLS wrapper)
            self.transport.SEND_LIMIT = _SEND_LIMIT

    def dataReceived(self, data: bytes) -> None:
        if not self._first_bytes_seen:
            self._first_bytes_seen = True
            if data[:1] == _TLS_HANDSHAKE_RECORD:
                self.transport.write(_PLAIN_HTTP_ONLY)
                self.transport.loseConnection()
                return
        super().dataReceived(data)


class QuietSite(Site):
    """A site without the per-request access log (``access_log: false``): one log write per
    request is measurable at thousands of requests a second."""

    def log(self, request: object) -> None:
        pass


def registry_site(resource: IResource, access_log: bool = True) -> Site:
    site = Site(resource) if access_log else QuietSite(resource)
    site.protocol = RegistryChannel
    site.displayTracebacks = False
    return site
