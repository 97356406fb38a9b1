"""The HTTP site: twisted.web's, with the guards a registry on an open network needs at the
connection level, before any request reaches the resource.

- A TLS ClientHello on the plain-HTTP port is answered with a 400 at once. skopeo, podman and
  containerd try HTTPS first on a registry they were told is insecure and fall back to plain HTTP
  only when the handshake fails; waiting silently would cost each pull the client's handshake
  timeout (10 s for skopeo). Go's net/http does the same.
- A deadline for the request line, headers and (small) body, started by a request's first byte:
  Twisted's own idle timeout restarts with every byte, so a client trickling one byte a second
  would hold a connection forever. An idle keep-alive connection is left to that idle timeout.
- A cap on the connections one client address holds open (high by default: a cluster behind one
  NAT address, or a load test from loopback, must never be refused).
- Bodies are refused before they are read: the registry takes none, except the small urlencoded
  form of a ``POST /token`` (containerd's OAuth2 password grant). Anything else announcing a body
  is answered at once (405 for a method the registry does not serve, 413 otherwise) and the
  connection closed, so nothing is spooled to memory or disk.
- A malformed request line or header gets the 400 as an OCI error body. Twisted answers those
  with a bare ``400 Bad Request`` from ``HTTPChannel._respondToBadRequestAndDisconnect``, which
  is private and has no public hook; so the lines are checked here first, through the public
  ``lineReceived``/``headerReceived``/``lineLengthExceeded`` of the channel, with rules that are
  the same as Twisted's or stricter (RFC 9112's). Twisted's checks still run after ours.

Every answer given here is a complete HTTP/1.1 response with ``Connection: close``, written to the
transport directly: no ``Request`` has been handed to the resource yet.
"""
from __future__ import annotations

import re
from http import HTTPStatus

from twisted.internet.abstract import FileDescriptor
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel, Request, combinedLogFormatter
from twisted.web.resource import IResource
from twisted.web.server import Site

from metahub.config.file import HttpConfig
from metahub.oci import errors
from metahub.web.headers import API_VERSION

_TLS_HANDSHAKE_RECORD = b"\x16"
#: Twisted sends at most 128 KiB per send(); blobs are large, and 1 MiB sends roughly doubled
#: cached throughput in bench/ (docs/benchmarks.md). The pause threshold (``bufferSize``) stays at
#: Twisted's 64 KiB: any chunk written pauses the sender until it has drained (streaming.py).
_SEND_LIMIT = 1 << 20
_PLAIN_HTTP_ONLY = b"HTTP/1.0 400 Bad Request\r\n\r\nClient sent an HTTP request to an HTTPS server.\n"

#: The one request that carries a body: containerd's token request, a form of a few hundred bytes.
_FORM_PATH = b"/token"
FORM_LIMIT = 64 << 10
#: More digits than this in a Content-Length is more than any limit here (and int() of thousands
#: of digits is slow, past 4300 an error).
_LENGTH_DIGITS = 18

# RFC 9110 5.6.2 token; RFC 9112 3 request-target as printable ASCII; HTTP/1.x only.
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_TARGET = re.compile(rb"[\x21-\x7e]+")
_VERSIONS = (b"HTTP/1.0", b"HTTP/1.1")
_LENGTH = re.compile(rb"[0-9]+")
#: A header line that passes every check of ``headerReceived`` unless its name is one of
#: ``_BODY_HEADERS``: a token name, a colon, a value without NUL. One match in C per header
#: instead of a partition, a strip, a token match and a NUL search in Python; anything it does
#: not match takes the step-by-step checks, which say what is wrong.
_PLAIN_HEADER = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[^\x00]*")
_BODY_HEADERS = frozenset({b"content-type", b"content-length", b"transfer-encoding"})


def _request_line_problem(line: bytes) -> str | None:
    parts = line.split(b" ")
    if len(parts) != 3:
        return "the request line is not METHOD SP TARGET SP HTTP-VERSION"
    method, target, version = parts
    if not _TOKEN.fullmatch(method):
        return "the request method is not an HTTP token"
    if not _TARGET.fullmatch(target):
        return "the request target is not printable ASCII"
    if version not in _VERSIONS:
        return "only HTTP/1.0 and HTTP/1.1 are served"
    return None


def _body_refusal(
    method: bytes, target: bytes, length: int | None, content_type: bytes = b""
) -> errors.RegistryError | None:
    """Why a request announcing ``length`` body bytes (None: chunked) is answered before its body."""
    if length == 0:
        return None
    if method == b"POST" and target.split(b"?", 1)[0] == _FORM_PATH:
        if length is None:
            return errors.RegistryError(411, "LENGTH_REQUIRED", "send the token request's form with a Content-Length")
        if length > FORM_LIMIT:
            return errors.RegistryError(413, "CONTENT_TOO_LARGE", f"a token request's form is at most {FORM_LIMIT} bytes")
        if content_type.lower().startswith(b"multipart/"):
            # The form is urlencoded. Twisted would parse a multipart one itself, and answer a
            # malformed one with a bare 400 from a private method.
            return errors.RegistryError(415, "UNSUPPORTED", "the token request's form is application/x-www-form-urlencoded")
        return None
    if method in (b"GET", b"HEAD"):
        return errors.RegistryError(413, "CONTENT_TOO_LARGE", "the registry accepts no request body")
    return errors.unsupported(method.decode("latin-1")[:20])


def _response(error: errors.RegistryError) -> bytes:
    body = error.body()
    lines = [
        f"HTTP/1.1 {error.status} {HTTPStatus(error.status).phrase}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        "Connection: close",
        ": ".join(API_VERSION),
        *(f"{name}: {value}" for name, value in error.headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class _Addresses:
    """Open connections per client address."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: dict[str, int] = {}

    def add(self, host: str) -> bool:
        """Count one more connection from ``host``; False if that is over the limit."""
        count = self._open[host] = self._open.get(host, 0) + 1
        return count <= self.limit

    def remove(self, host: str) -> None:
        count = self._open[host] - 1
        if count:
            self._open[host] = count
        else:
            del self._open[host]

    def __len__(self) -> int:
        return len(self._open)


def _access_line(timestamp: str, request: Request) -> str:
    """The combined log format; a blob response cut short ends with ``aborted:<reason>``."""
    line = combinedLogFormatter(timestamp, request)
    reason = getattr(request, "metahub_aborted", None)
    return line if reason is None else f"{line} aborted:{reason}"


class RegistrySite(Site):
    """The site with its connection limits (``http:`` in the config) and optional access log."""

    def __init__(
        self, resource: IResource, limits: HttpConfig, access_log: bool = True, reactor: IReactorTime | None = None
    ) -> None:
        super().__init__(resource, reactor=reactor, logFormatter=_access_line)
        # Twisted types protocol as its HTTP/1.1-or-2 wrapper's factory; this site's channel is HTTP/1.1.
        self.protocol = RegistryChannel  # type: ignore[assignment, method-assign]
        self.displayTracebacks = False
        self.header_timeout = limits.header_timeout
        self.addresses = _Addresses(limits.max_connections_per_address)
        self.access_log = access_log

    def log(self, request: Request) -> None:
        # One log write per request is measurable at thousands of requests a second.
        if self.access_log:
            super().log(request)


class RegistryChannel(HTTPChannel):
    site: RegistrySite
    _first_bytes_seen = False
    _refused = False
    _peer: str | None = None
    #: One timer per connection: started by a request's first byte, left running once the
    #: request is read, and moved on (``reset``) by the next request's first byte. A callLater and
    #: a cancel per request cost a heap push and, later, a heap rebuild for the cancelled ones.
    _deadline: IDelayedCall | None = None
    #: Whether the deadline applies now: a request has begun and is not yet read.
    _timing = False
    # The request being read, reset by _next_request.
    _awaiting: bool
    _request_line: tuple[bytes, bytes] | None
    _head_bytes: int
    _header_count: int
    _blank_lines: int
    _length_given: bool
    _body: int | None
    _content_type: bytes

    def connectionMade(self) -> None:
        super().connectionMade()
        assert self.transport is not None
        # SEND_LIMIT is an attribute of FileDescriptor, the base of TCP and UNIX connections (not of
        # the TLS wrapper); no interface offers the send size.
        if isinstance(self.transport, FileDescriptor):
            self.transport.SEND_LIMIT = _SEND_LIMIT
        self._next_request()
        self._peer = getattr(self.transport.getPeer(), "host", None)  # None: a UNIX socket
        if self._peer is not None and not self.site.addresses.add(self._peer):
            limit = self.site.addresses.limit
            self._refuse(errors.RegistryError(
                429, "TOOMANYREQUESTS", f"more than {limit} open connections from {self._peer}",
                headers={"Retry-After": "1"},
            ))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._stop_deadline()
        if self._peer is not None:
            self.site.addresses.remove(self._peer)
            self._peer = None
        super().connectionLost(reason)

    def dataReceived(self, data: bytes) -> None:
        if self._refused:  # answered and closing: whatever else arrives is not read
            return
        if not self._first_bytes_seen:
            self._first_bytes_seen = True
            if data[:1] == _TLS_HANDSHAKE_RECORD:
                assert self.transport is not None
                self.transport.write(_PLAIN_HTTP_ONLY)
                self.loseConnection()
                return
        if self._awaiting and not self._timing:
            self._start_deadline()
        super().dataReceived(data)

    def lineReceived(self, line: bytes) -> None:
        self._head_bytes += len(line)
        if self._head_bytes > self.totalHeadersSize:
            return self._refuse(errors.RegistryError(
                431, "HEADERS_TOO_LARGE", f"the request line and headers exceed {self.totalHeadersSize} bytes"
            ))
        if self._request_line is None:
            # Twisted skips one empty line before a request line (old clients sent one after a
            # POST body), and answers a second with its bare 400.
            self._blank_lines += not line
            problem = _request_line_problem(line) if line or self._blank_lines > 1 else None
            if problem is not None:
                return self._refuse(errors.RegistryError(400, "BAD_REQUEST", problem))
            if line:
                method, target, _ = line.split(b" ")
                self._request_line = (method, target)
        super().lineReceived(line)

    def lineLengthExceeded(self, line: bytes) -> None:
        self._refuse(errors.RegistryError(
            431, "HEADERS_TOO_LARGE", f"a request line or header is longer than {self.MAX_LENGTH} bytes"
        ))

    def headerReceived(self, line: bytes) -> bool:
        plain = _PLAIN_HEADER.fullmatch(line)
        if (plain is not None and self._header_count < self.maxHeaders
                and plain.group(1).lower() not in _BODY_HEADERS):
            self._header_count += 1
            return bool(super().headerReceived(line))
        name, colon, value = line.partition(b":")
        value = value.strip(b" \t")
        problem = None
        if not colon or not _TOKEN.fullmatch(name):
            problem = "a header line is not NAME: VALUE"
        elif b"\x00" in value:
            problem = "a header value holds a NUL byte"
        elif self._header_count >= self.maxHeaders:
            problem = f"more than {self.maxHeaders} headers"
        if problem is not None:
            self._refuse(errors.RegistryError(400, "BAD_REQUEST", problem))
            return False
        self._header_count += 1
        name = name.lower()
        if name == b"content-type":
            self._content_type = value
        if name == b"content-length" or (name == b"transfer-encoding" and value.lower() == b"chunked"):
            if self._length_given:
                self._refuse(errors.RegistryError(400, "BAD_REQUEST", "the request's body length is given twice"))
                return False
            if name == b"content-length" and not _LENGTH.fullmatch(value):
                self._refuse(errors.RegistryError(400, "BAD_REQUEST", "Content-Length is not a number"))
                return False
            self._length_given = True
            if name == b"transfer-encoding":
                self._body = None
            elif len(value) > _LENGTH_DIGITS:  # over every limit: refused now, before int() sees it
                refusal = self._refusal_for(10**_LENGTH_DIGITS)
                assert refusal is not None  # no request may send that much
                self._refuse(refusal)
                return False
            else:
                self._body = int(value)
        elif name == b"transfer-encoding" and value.lower() != b"identity":
            self._refuse(errors.RegistryError(501, "UNSUPPORTED", "only the chunked transfer coding is understood"))
            return False
        return bool(super().headerReceived(line))

    def allHeadersReceived(self) -> None:
        refusal = self._refusal_for(self._body)
        if refusal is not None:
            return self._refuse(refusal)
        super().allHeadersReceived()

    def allContentReceived(self) -> None:
        if self._refused:  # a refused request never reaches the resource
            return
        self._timing = False  # the timer runs on, ignored, until the next request resets it
        self._awaiting = False
        super().allContentReceived()

    def requestDone(self, request: Request) -> None:
        # Before Twisted replays data pipelined behind this request: that is the next request.
        self._next_request()
        super().requestDone(request)

    def _next_request(self) -> None:
        """Wait for a new request: its first byte starts the deadline."""
        self._awaiting = True
        self._request_line = None
        self._head_bytes = 0
        self._header_count = 0
        self._blank_lines = 0
        self._length_given = False
        self._body = 0
        self._content_type = b""

    def _refusal_for(self, length: int | None) -> errors.RegistryError | None:
        assert self._request_line is not None
        return _body_refusal(*self._request_line, length, self._content_type)

    def _start_deadline(self) -> None:
        self._timing = True
        if self._deadline is not None and self._deadline.active():
            self._deadline.reset(self.site.header_timeout)
        else:
            self._deadline = self.callLater(self.site.header_timeout, self._too_slow)

    def _too_slow(self) -> None:
        self._deadline = None
        if not self._timing:  # the timer of a request already read, not reset since: idle
            return
        timeout = f"{self.site.header_timeout:g}"
        self._refuse(errors.RegistryError(408, "REQUEST_TIMEOUT", f"the request did not arrive within {timeout} s"))

    def _stop_deadline(self) -> None:
        self._timing = False
        if self._deadline is not None:
            if self._deadline.active():
                self._deadline.cancel()
            self._deadline = None

    def _refuse(self, error: errors.RegistryError) -> None:
        """Answer ``error`` and close: used only while no request is being served on the channel."""
        self._refused = True
        self._stop_deadline()
        assert self.transport is not None
        self.transport.write(_response(error))
        self.loseConnection()


def registry_site(
    resource: IResource, access_log: bool = True, limits: HttpConfig | None = None, reactor: IReactorTime | None = None
) -> Site:
    return RegistrySite(resource, limits or HttpConfig(), access_log, reactor)
