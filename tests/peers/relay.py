"""A counting HTTP relay, to prove how often an upstream was really asked for something.

Tests put it between metahub and an upstream registry and then assert, say, that a blob was
fetched exactly once. Counting in front of the registry (rather than parsing the registry's access
log) sees exactly what crossed the wire, including HEAD requests and aborted transfers.

The Host header is passed through unchanged, so URLs the registry builds from it (upload
``Location``, token realms) keep pointing at the relay.
"""
import contextlib
import http.client
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler

from .loopback import LoopbackServer

CHUNK = 256 * 1024
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
              "proxy-authorization", "proxy-authenticate"}


class Relay(LoopbackServer):
    """Relays HTTP to ``target`` (``host:port`` or ``http://host:port``) and counts what passes.

    ``counts[(method, path)]`` is the number of requests (path without query),
    ``bytes_by_path[path]`` the response body bytes sent back, and ``requests`` the list of
    ``(method, path_with_query, status)`` in arrival order.
    """

    def __init__(self, target: str) -> None:
        address = urllib.parse.urlsplit(target if "://" in target else f"http://{target}")
        if address.hostname is None or address.port is None:
            raise ValueError(f"relay target needs a host and a port: {target!r}")
        self.target = (address.hostname, address.port)
        self.counts: Counter[tuple[str, str]] = Counter()
        self.bytes_by_path: Counter[str] = Counter()
        self.requests: list[tuple[str, str, int]] = []
        #: Bytes per second for response bodies (None: as fast as it goes). Slows a download down
        #: enough for a test to act in the middle of it, e.g. to kill the node fetching it.
        self.rate: float | None = None
        self._lock = threading.Lock()
        super().__init__(self._handler_class(), "relay")

    def blob_gets(self, repository: str, digest: str) -> int:
        """How many times the blob was requested with GET for ``repository``."""
        return self.counts[("GET", f"/v2/{repository}/blobs/{digest}")]

    def reset(self) -> None:
        """Forget what was counted so far, e.g. after seeding the upstream through the relay."""
        with self._lock:
            self.counts.clear()
            self.bytes_by_path.clear()
            self.requests.clear()

    def _record(self, method: str, target: str, status: int) -> None:
        with self._lock:
            self.counts[(method, urllib.parse.urlsplit(target).path)] += 1
            self.requests.append((method, target, status))

    def _sent(self, target: str, size: int) -> None:
        with self._lock:
            self.bytes_by_path[urllib.parse.urlsplit(target).path] += size

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        relay = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _relay(self) -> None:
                upstream = http.client.HTTPConnection(*relay.target, timeout=60)
                with contextlib.closing(upstream):
                    try:
                        self._forward_request(upstream)
                        response = upstream.getresponse()
                    except OSError as error:
                        # An answer, not a dropped connection: the client's error then says why.
                        relay._record(self.command, self.path, 502)
                        self.send_error(502, f"relay could not reach {relay.target}: {error}")
                        return
                    relay._record(self.command, self.path, response.status)
                    self._answer(response)

            def _forward_request(self, upstream: http.client.HTTPConnection) -> None:
                """Send the request on unchanged, repeated headers (Accept!) and Host included,
                streaming the body rather than holding it."""
                upstream.putrequest(self.command, self.path, skip_host=True,
                                    skip_accept_encoding=True)
                for key, value in self.headers.items():
                    if key.lower() not in HOP_BY_HOP:
                        upstream.putheader(key, value)
                chunked = "chunked" in self.headers.get("Transfer-Encoding", "").lower()
                if chunked:
                    upstream.putheader("Transfer-Encoding", "chunked")
                upstream.endheaders()
                if chunked:
                    for chunk in self._chunks():
                        upstream.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    upstream.send(b"0\r\n\r\n")
                    return
                remaining = int(self.headers.get("Content-Length", "0"))
                while remaining > 0:
                    data = self.rfile.read(min(CHUNK, remaining))
                    if not data:
                        break
                    upstream.send(data)
                    remaining -= len(data)

            def _chunks(self) -> Iterator[bytes]:
                while size := int(self.rfile.readline().split(b";")[0], 16):
                    yield self.rfile.read(size)
                    self.rfile.readline()
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass  # trailers

            def _answer(self, response: http.client.HTTPResponse) -> None:
                self.send_response_only(response.status, response.reason)
                for key, value in response.getheaders():
                    if key.lower() not in HOP_BY_HOP:
                        self.send_header(key, value)
                # Without a length the body ends with the connection; keep-alive is for the rest.
                known_length = response.getheader("Content-Length") is not None or \
                    self.command == "HEAD" or response.status in (204, 304)
                if not known_length:
                    self.send_header("Connection", "close")
                    self.close_connection = True
                self.end_headers()
                if self.command == "HEAD":
                    return
                while chunk := response.read(CHUNK):
                    self.wfile.write(chunk)
                    relay._sent(self.path, len(chunk))
                    if relay.rate:
                        time.sleep(len(chunk) / relay.rate)

            do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _relay

            def log_message(self, format: str, *args: object) -> None:
                """Quiet: ``Relay.requests`` is the record."""

        return Handler
