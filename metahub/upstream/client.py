"""The client metahub uses to pull from one upstream registry (Docker Hub, ghcr.io, distribution).

Everything that can go wrong upstream leaves this module as a ``RegistryError`` that the HTTP layer
can hand to its own client unchanged: the upstream's 404 becomes the OCI "unknown" code that fits
the call, its 429 keeps its ``Retry-After``, and an unreachable or broken upstream is a 502 or 504
that names the upstream by its configured name. Credentials and tokens are put in headers only and
never into log lines or messages; URLs are logged without their query, because a redirect to an
object store carries a signature there.

The client takes its HTTP client and clock as arguments (tests inject ``StubTreq`` and ``Clock``),
and passes the clock to treq as ``reactor`` so that treq's ``timeout=`` runs on it as well.
"""
from __future__ import annotations

import base64
import json
import re
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from urllib.parse import quote, urlencode, urljoin, urlsplit

from treq.client import HTTPClient
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.error import (
    ConnectError,
    ConnectingCancelledError,
    ConnectionClosed,
    DNSLookupError,
)
from twisted.internet.error import (
    TimeoutError as ConnectTimeoutError,
)
from twisted.internet.interfaces import (
    IProtocol,
    IProtocolFactory,
    IReactorTCP,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    URI,
    Agent,
    HTTPConnectionPool,
    RequestTransmissionFailed,
    ResponseDone,
    ResponseFailed,
)
from twisted.web.error import SchemeNotSupported
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory, IPolicyForHTTPS, IResponse
from zope.interface import implementer

from metahub.config.file import UpstreamConfig
from metahub.oci.errors import (
    RegistryError,
    bad_gateway,
    blob_unknown,
    denied,
    digest_invalid,
    gateway_timeout,
    manifest_unknown,
    name_unknown,
    range_invalid,
    too_many_requests,
    unauthorized,
)
from metahub.oci.grammar import is_digest_reference
from metahub.oci.media import MAX_MANIFEST_SIZE, Manifest, sniff_media_type
from metahub.upstream.body import BodyProtocol
from metahub.upstream.tls import handshake_failure, https_policy
from metahub.upstream.wwwauth import Challenge, WWWAuthenticateError, parse_challenges
from storage import ALGORITHMS, algorithm_of, matches, sha256_digest

__all__ = ["HTTPRequester", "ManifestHead", "UpstreamClient", "make_http_clients"]

_TAGS_LIMIT = 4 * 1024 * 1024
# Token answers and error documents are a few hundred bytes.
_SMALL_LIMIT = 64 * 1024
_MAX_REDIRECTS = 5
_REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})
# The token spec's lifetime when ``expires_in`` is absent, and how early we renew, so that a
# token does not expire between our check and the upstream's.
_TOKEN_LIFETIME = 60.0
_TOKEN_MARGIN = 10.0
_TOKEN_CHARS = re.compile(r"[\x21-\x7e]+")
_UNSATISFIED_RANGE = re.compile(r"bytes \*/(\d+)")
# Not here: RequestNotSent, which Twisted does not export (it is defined in a private module of
# twisted.web). A connection raises it for a request it is not idle for; HTTPConnectionPool hands out
# only idle ones and retries a failed GET or HEAD (all an upstream gets) on a new connection.
_TRANSPORT_ERRORS = (
    CancelledError,
    ConnectError,
    ConnectingCancelledError,
    ConnectionClosed,
    DNSLookupError,
    RequestTransmissionFailed,
    ResponseFailed,
    SchemeNotSupported,
)


class HTTPRequester(typing.Protocol):
    """The part of treq that ``UpstreamClient`` uses.

    ``treq.client.HTTPClient`` (see ``make_http_clients``) and ``treq.testing.StubTreq`` fit. The
    ``treq`` module fits only when the clock is the real reactor, because it also uses ``reactor``
    to build its connection pool.
    """

    def request(
        self,
        method: str,
        url: str,
        *,
        headers: Headers,
        allow_redirects: bool,
        unbuffered: bool,
        timeout: float,
        reactor: IReactorTime,
    ) -> Deferred[IResponse]: ...


@dataclass(frozen=True)
class ManifestHead:
    """What a HEAD tells about a manifest: enough to revalidate a tag without counting as a pull."""

    digest: str
    media_type: str
    size: int


@dataclass(frozen=True)
class _Target:
    """What a request is about, so that an upstream 404 becomes the OCI error that fits the call.

    ``codes`` are the not-found codes that make sense for the call, the default first.
    """

    repo: str
    reference: str
    codes: tuple[str, ...]


@dataclass(frozen=True)
class _Token:
    """A cached bearer token; kept out of ``repr`` so it cannot reach a log line that way."""

    value: str = field(repr=False)
    renew_at: float


class _BodyTooLarge(Exception):
    pass


class _BodyTimeout(Exception):
    pass


class _Collector(BodyProtocol):
    """Buffers a body that is small by contract, and gives up on one that is not.

    Giving up closes the connection, so that a half-read response never goes back to the pool.
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._chunks: list[bytes] = []
        self._size = 0
        self.done: Deferred[bytes] = Deferred(lambda _: self._close())

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        self._size += len(data)
        if self._size > self._limit:
            self.abort(_BodyTooLarge())
        else:
            self._chunks.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self._chunks))
        else:
            self.done.errback(reason)

    def abort(self, why: Exception) -> None:
        if not self.done.called:
            self.done.errback(why)
            self._close()

    def _close(self) -> None:
        if self.transport is not None:
            self.producer.stopProducing()


class UpstreamClient:
    """Pulls manifests, blobs and tag lists from one upstream, handling its auth and redirects."""

    _log = Logger()

    def __init__(self, config: UpstreamConfig, http: HTTPRequester, clock: IReactorTime) -> None:
        self._config = config
        self._http = http
        self._clock = clock
        self._origin = _origin(config.url)
        # The last challenge answered: later requests answer it up front instead of first
        # asking anonymously and collecting a 401 for every new repository.
        self._challenge: Challenge | None = None
        self._tokens: dict[str, _Token] = {}  # scope -> bearer token
        # For the status page: when upstream last answered, and the last failure and why.
        self.last_success: float | None = None
        self.last_error: tuple[float, str] | None = None

    async def get_manifest(self, repo: str, reference: str, accept: list[str]) -> Manifest:
        """Fetch a manifest by tag or digest; a body that does not match its digest is a 502."""
        target = _Target(repo, reference, ("MANIFEST_UNKNOWN", "NAME_UNKNOWN"))
        response = await self._call("GET", target, f"manifests/{_quote(reference)}", {"Accept": ", ".join(accept)})
        body = await self._read(response, MAX_MANIFEST_SIZE, "a manifest")
        digest = self._checked_digest(body, reference, _header(response, b"Docker-Content-Digest"))
        return Manifest(body, _media_type(response) or sniff_media_type(body), digest)

    async def head_manifest(self, repo: str, reference: str, accept: list[str]) -> ManifestHead:
        """Ask for a manifest's digest, type and size without downloading it.

        Docker Hub does not count a HEAD against its pull rate limit, which is why tag revalidation
        uses this. An upstream that leaves out the digest or the size gets a GET instead.
        """
        target = _Target(repo, reference, ("MANIFEST_UNKNOWN", "NAME_UNKNOWN"))
        response = await self._call("HEAD", target, f"manifests/{_quote(reference)}", {"Accept": ", ".join(accept)})
        await self._discard(response)
        digest = reference if is_digest_reference(reference) else _header(response, b"Docker-Content-Digest")
        size = _content_length(response)
        if digest is None or size is None:
            manifest = await self.get_manifest(repo, reference, accept)
            return ManifestHead(manifest.digest, manifest.media_type, len(manifest.body))
        return ManifestHead(digest, _media_type(response), size)

    async def head_blob(self, repo: str, digest: str) -> int | None:
        """Confirm that upstream has the blob in ``repo``, and return its size if upstream says.

        This is what lets a cached blob be served to a repository not yet linked to it: a digest
        alone must not open one repository's layers to another name.
        """
        target = _Target(repo, digest, ("BLOB_UNKNOWN", "NAME_UNKNOWN"))
        response = await self._call("HEAD", target, f"blobs/{_quote(digest)}", {})
        await self._discard(response)
        return _content_length(response)

    async def get_blob(self, repo: str, digest: str, headers: Mapping[str, str] | None = None) -> IResponse:
        """Start a blob download and return the response once its headers are in (200 or 206).

        The body is not read: the caller streams it with ``response.deliverBody`` and must verify
        the digest itself. ``headers`` (``Range``, say) go to upstream as they are.
        """
        target = _Target(repo, digest, ("BLOB_UNKNOWN", "NAME_UNKNOWN"))
        return await self._call("GET", target, f"blobs/{_quote(digest)}", headers or {})

    async def tags_list(self, repo: str, n: int | None = None, last: str | None = None) -> tuple[bytes, str | None]:
        """The upstream's tag list JSON and its ``Link`` header, which names an upstream path."""
        query = {key: str(value) for key, value in (("n", n), ("last", last)) if value is not None}
        response = await self._call("GET", _Target(repo, "", ("NAME_UNKNOWN",)), "tags/list", {}, query)
        body = await self._read(response, _TAGS_LIMIT, "a tag list")
        return body, _header(response, b"Link")

    async def _call(
        self,
        method: str,
        target: _Target,
        path: str,
        headers: Mapping[str, str],
        query: Mapping[str, str] | None = None,
    ) -> IResponse:
        """Send an authorized request about ``target`` and return a 2xx response, or raise."""
        url = _with_query(f"{self._config.url}/v2/{quote(target.repo, safe='/')}/{path}", query)
        request_headers = Headers()
        for name, value in headers.items():
            request_headers.setRawHeaders(name, [value])
        try:
            response = await self._authorized(method, url, request_headers, f"repository:{target.repo}:pull")
            if 200 <= response.code < 300:
                self.last_success = self._clock.seconds()
                return response
            error = await self._failure(response, target, request_headers)
        except RegistryError as failed:
            self.last_error = (self._clock.seconds(), failed.message)
            raise
        if error.status == 404:  # the upstream answered; the name or reference does not exist
            self.last_success = self._clock.seconds()
        else:
            self.last_error = (self._clock.seconds(), error.message)
        raise error

    async def _authorized(self, method: str, url: str, headers: Headers, scope: str) -> IResponse:
        """Send with the authorization we already have; on a 401, answer its challenge and retry once.

        A 401 from the upstream (not from a host it redirected to) means what we sent is no good:
        a cached token is dropped and a new one fetched. A second 401 is left to the caller.
        """
        authorization = await self._known_authorization(scope)
        response, final_url = await self._follow(method, url, headers, authorization)
        if response.code != 401 or _origin(final_url) != self._origin:
            return response
        header = ", ".join(v.decode("latin-1") for v in response.headers.getRawHeaders(b"WWW-Authenticate", []))
        await self._discard(response)
        try:
            challenges = parse_challenges(header)
        except WWWAuthenticateError as exc:
            self._log.warn("upstream {upstream}: unusable WWW-Authenticate: {why}", upstream=self._config.name, why=exc)
            raise bad_gateway(f"upstream {self._config.name} answered 401 without a usable challenge") from None
        self._tokens.pop(scope, None)
        authorization = await self._answer(challenges, scope)
        response, final_url = await self._follow(method, url, headers, authorization)
        if response.code == 401 and _origin(final_url) == self._origin:
            self._tokens.pop(scope, None)
        return response

    async def _known_authorization(self, scope: str) -> str | None:
        token = self._tokens.get(scope)
        if token is not None and token.renew_at > self._clock.seconds():
            return f"Bearer {token.value}"
        if self._challenge is None:
            return None
        return await self._answer([self._challenge], scope)

    async def _answer(self, challenges: list[Challenge], scope: str) -> str:
        """The Authorization value for the challenge we can answer; Bearer is preferred."""
        bearer = next((c for c in challenges if c.scheme == "bearer" and "realm" in c.params), None)
        if bearer is not None:
            self._challenge = bearer
            return await self._fetch_token(bearer, scope)
        basic = next((c for c in challenges if c.scheme == "basic"), None)
        if basic is None:
            schemes = ", ".join(c.scheme for c in challenges)
            raise bad_gateway(f"upstream {self._config.name} asks for authentication metahub cannot do ({schemes})")
        authorization = self._basic()
        if authorization is None:
            raise unauthorized(f"upstream {self._config.name} requires credentials and none are configured")
        self._challenge = basic
        return authorization

    async def _fetch_token(self, challenge: Challenge, scope: str) -> str:
        """Get a bearer token for ``scope`` from the challenge's realm and cache it until near expiry."""
        realm = challenge.params["realm"]
        realm_scheme = urlsplit(realm).scheme
        if realm_scheme not in ("http", "https") or not urlsplit(realm).netloc:
            raise bad_gateway(f"upstream {self._config.name} named a token realm that is not an http(s) URL")
        authorization = self._basic()
        if authorization is not None and realm_scheme == "http" and urlsplit(self._config.url).scheme == "https":
            raise bad_gateway(f"upstream {self._config.name} wants credentials sent to a plain-http token realm")
        query = {"service": challenge.params["service"]} if "service" in challenge.params else {}
        query["scope"] = scope
        response, _ = await self._follow("GET", _with_query(realm, query), Headers(), authorization)
        if response.code != 200:
            raise await self._failure(response, None, Headers())
        body = await self._read(response, _SMALL_LIMIT, "a token")
        try:
            token, lifetime = _parse_token(body)
        except ValueError as exc:
            self._log.warn("upstream {upstream}: bad token answer: {why}", upstream=self._config.name, why=exc)
            raise bad_gateway(f"upstream {self._config.name} sent no usable token") from None
        now = self._clock.seconds()
        self._tokens = {s: t for s, t in self._tokens.items() if t.renew_at > now}
        self._tokens[scope] = _Token(token, now + lifetime - _TOKEN_MARGIN)
        self._log.info(
            "upstream {upstream}: new token for {scope}, valid {lifetime}s",
            upstream=self._config.name, scope=scope, lifetime=lifetime,
        )
        return f"Bearer {token}"

    def _basic(self) -> str | None:
        if self._config.username is None:
            return None
        pair = f"{self._config.username}:{self._config.password or ''}".encode()
        return "Basic " + base64.b64encode(pair).decode("ascii")

    async def _follow(
        self, method: str, url: str, headers: Headers, authorization: str | None
    ) -> tuple[IResponse, str]:
        """Send, following redirects by hand; return the last response and the URL that gave it.

        Registries send blob downloads to a CDN or an object store, which must never see our
        credentials or token: ``authorization`` goes only to the origin (scheme, host and port)
        of the first URL.
        """
        origin = _origin(url)
        for _ in range(_MAX_REDIRECTS + 1):
            sent = headers.copy()
            if authorization is not None and _origin(url) == origin:
                sent.setRawHeaders(b"Authorization", [authorization.encode("latin-1")])
            else:
                sent.removeHeader(b"Authorization")
            response = await self._exchange(method, url, sent)
            if response.code not in _REDIRECT_CODES:
                return response, url
            await self._discard(response)
            target = _redirect_target(url, _header(response, b"Location"))
            if target is None:
                raise bad_gateway(f"upstream {self._config.name} sent a redirect metahub cannot follow")
            url = target
            self._log.debug(
                "upstream {upstream}: redirected to {origin}", upstream=self._config.name, origin=_origin(url)
            )
        raise bad_gateway(f"upstream {self._config.name} redirected more than {_MAX_REDIRECTS} times")

    async def _exchange(self, method: str, url: str, headers: Headers) -> IResponse:
        """One request and response; a failure to get the response headers becomes a 502 or 504."""
        started = self._clock.seconds()
        try:
            response: IResponse = await self._http.request(
                method, url, headers=headers, allow_redirects=False, unbuffered=True,
                timeout=self._config.read_timeout, reactor=self._clock,
            )
        except _TRANSPORT_ERRORS as exc:
            timed_out = self._clock.seconds() - started >= self._config.read_timeout
            if _cancelled(exc) and not timed_out:
                # Our caller cancelled (its client went away): not the upstream's fault.
                raise CancelledError() from exc
            tls = _tls_failure(exc)
            if tls is not None:
                self._log.warn(
                    "upstream {upstream}: TLS handshake with {origin} failed: {why} ({method} {url})",
                    upstream=self._config.name, origin=_origin(url), why=tls, method=method, url=_without_query(url),
                )
                raise bad_gateway(f"upstream {self._config.name}: TLS handshake with {_origin(url)} failed: {tls}") from exc
            self._log.warn(
                "upstream {upstream}: {method} {url} failed: {why}",
                upstream=self._config.name, method=method, url=_without_query(url), why=_describe(exc),
            )
            if _cancelled(exc):
                raise gateway_timeout(
                    f"upstream {self._config.name} did not answer within {self._config.read_timeout:g} s"
                ) from exc
            if isinstance(exc, ConnectTimeoutError):
                raise gateway_timeout(f"upstream {self._config.name}: connecting to {_origin(url)} timed out") from exc
            raise bad_gateway(
                f"upstream {self._config.name} is unreachable ({_origin(url)}: {_describe(exc)})"
            ) from exc
        self._log.debug(
            "upstream {upstream}: {method} {url} -> {code}",
            upstream=self._config.name, method=method, url=_without_query(url), code=response.code,
        )
        return response

    async def _read(self, response: IResponse, limit: int, what: str) -> bytes:
        """The whole body of a response that is small by contract, read within the read timeout."""
        collector = _Collector(limit)
        response.deliverBody(collector)
        timer = self._clock.callLater(self._config.read_timeout, collector.abort, _BodyTimeout())
        try:
            return await collector.done
        except _BodyTooLarge:
            raise bad_gateway(f"upstream {self._config.name} sent more than {limit} bytes for {what}") from None
        except _BodyTimeout:
            raise gateway_timeout(f"upstream {self._config.name} stalled while sending {what}") from None
        except (ResponseFailed, ConnectionClosed) as exc:
            raise bad_gateway(f"upstream {self._config.name} broke off while sending {what}") from exc
        finally:
            if timer.active():
                timer.cancel()

    async def _discard(self, response: IResponse) -> None:
        """Read a body we do not need (a 401's, a redirect's) to its end.

        Twisted puts the connection back in the pool before the body's end reaches us, so the retry
        or the next hop reuses it instead of opening another. A body too big or too slow to read
        gets its connection closed instead, which is as good.
        """
        try:
            await self._read(response, _SMALL_LIMIT, "a body to discard")
        except RegistryError:
            pass

    async def _failure(self, response: IResponse, target: _Target | None, sent: Headers) -> RegistryError:
        """The error for a response that is neither 2xx nor a challenge we could answer."""
        name = self._config.name
        if response.code == 404 and target is not None:
            return _not_found(target, await self._error_code(response))
        await self._discard(response)
        if response.code == 401:
            who = "the configured credentials" if self._config.username is not None else "anonymous access"
            return unauthorized(f"upstream {name} refused {who}")
        if response.code == 403:
            return denied(f"upstream {name} denied access")
        if response.code == 429:
            return too_many_requests(_header(response, b"Retry-After"))
        if response.code == 416 and target is not None:
            sent_range = sent.getRawHeaders(b"Range", [b""])[0].decode("latin-1")
            unsatisfied = _UNSATISFIED_RANGE.fullmatch(_header(response, b"Content-Range") or "")
            return range_invalid(sent_range, int(unsatisfied.group(1)) if unsatisfied else None)
        self._log.warn("upstream {upstream}: answered HTTP {code}", upstream=name, code=response.code)
        return bad_gateway(f"upstream {name} answered HTTP {response.code}")

    async def _error_code(self, response: IResponse) -> str | None:
        """The first OCI error code in an error body, if it has one."""
        try:
            document = json.loads(await self._read(response, _SMALL_LIMIT, "an error"))
            code = document["errors"][0]["code"]
        except (RegistryError, ValueError, LookupError, TypeError):
            return None
        return code if isinstance(code, str) else None

    def _checked_digest(self, body: bytes, reference: str, header: str | None) -> str:
        """The manifest's digest, once we know the body is what the reference or header names.

        A tag's ``Docker-Content-Digest`` is checked too (when we know its algorithm), because it
        is the digest clients will pull by later.
        """
        if is_digest_reference(reference):
            claimed = reference
            if algorithm_of(claimed) not in ALGORITHMS:
                raise digest_invalid(reference, "unsupported digest algorithm")
        elif header is not None and algorithm_of(header) in ALGORITHMS:
            claimed = header
        else:
            return sha256_digest(body)
        if not matches(claimed, body):
            raise RegistryError(
                502, "DIGEST_INVALID",
                f"upstream {self._config.name} sent a manifest that does not match its digest",
                {"digest": claimed},
            )
        return claimed


def make_http_clients(reactor: IReactorTCP, upstreams: Iterable[UpstreamConfig]) -> dict[str, HTTPRequester]:
    """A treq client for each upstream (by name), with persistent connection pools.

    Pulls come in bursts of requests to the same few hosts, so connections are kept for reuse.
    Upstreams that trust the same certificates share a client, and so its pool; the others get
    their own, because a pooled connection is reused by scheme, host and port alone: one whose
    certificate was checked against one upstream's ``ca_file`` must never serve another that
    trusts differently (a CDN both redirect to, say). Redirects and token requests go through the
    upstream's client, so they are verified with the upstream's trust too.
    """
    upstreams = list(upstreams)
    by_trust: dict[tuple[bytes, ...], HTTPRequester] = {}
    clients: dict[str, HTTPRequester] = {}
    for upstream in upstreams:
        trust = upstream.ca_certificates
        if trust not in by_trust:
            pool = HTTPConnectionPool(reactor, persistent=True)
            pool.maxPersistentPerHost = 10
            pool.cachedConnectionTimeout = 60
            endpoints = _Endpoints(reactor, upstreams, https_policy(trust))
            client = HTTPClient(Agent.usingEndpointFactory(reactor, endpoints, pool=pool))
            # treq types request()'s reactor as one that could also build an Agent (TCP and a
            # resolver), and its result as Deferred[_Response]; it uses the reactor only for the
            # timeout's callLater, which UpstreamClient's clock (a Clock in tests) has.
            by_trust[trust] = typing.cast(HTTPRequester, client)
        clients[upstream.name] = by_trust[trust]
    return clients


@implementer(IAgentEndpointFactory)
class _Endpoints:
    """Connects with each upstream's own connect timeout, and verifies TLS with ``tls``.

    Hosts we are redirected to get the longest configured timeout.
    """

    def __init__(self, reactor: IReactorTCP, upstreams: Iterable[UpstreamConfig], tls: IPolicyForHTTPS) -> None:
        self._reactor = reactor
        self._tls = tls
        self._timeouts = {_host_port(URI.fromBytes(u.url.encode())): u.connect_timeout for u in upstreams}
        self._default = max(self._timeouts.values(), default=UpstreamConfig.connect_timeout)

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        timeout = self._timeouts.get(_host_port(uri), self._default)
        endpoint = _LargeReads(HostnameEndpoint(self._reactor, uri.host, uri.port, timeout=timeout))
        if uri.scheme == b"https":
            return wrapClientTLS(self._tls.creatorForNetloc(uri.host, uri.port), endpoint)
        if uri.scheme == b"http":
            return endpoint
        raise SchemeNotSupported(f"unsupported scheme {uri.scheme!r}")


#: Bytes per ``recv()`` on upstream connections. Twisted reads 64 KiB at a time; a blob body in
#: 64 KiB reads cost the reactor 40% of a cold pull (docs/benchmarks.md).
READ_SIZE = 1 << 20


@implementer(IStreamClientEndpoint)
class _LargeReads:
    """An endpoint whose connections read ``READ_SIZE`` bytes per ``recv()``."""

    def __init__(self, endpoint: IStreamClientEndpoint) -> None:
        self._endpoint = endpoint

    def connect(self, factory: IProtocolFactory) -> Deferred[IProtocol]:
        return self._endpoint.connect(factory).addCallback(self._enlarge)

    @staticmethod
    def _enlarge(protocol: IProtocol) -> IProtocol:
        # bufferSize is what twisted.internet.tcp.Connection.doRead asks recv() for. No interface
        # offers the read size, hence the ignore: it is an attribute of abstract.FileDescriptor.
        protocol.transport.bufferSize = READ_SIZE  # type: ignore[attr-defined]
        return protocol


def _host_port(uri: URI) -> tuple[bytes, int]:
    return uri.host.lower(), uri.port


def _origin(url: str) -> str:
    """``scheme://host:port``, with the default port filled in, so equal origins compare equal."""
    parts = urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    return f"{parts.scheme}://{(parts.hostname or '').lower()}:{port}"


def _without_query(url: str) -> str:
    return urlsplit(url)._replace(query="", fragment="").geturl()


def _with_query(url: str, query: Mapping[str, str] | None) -> str:
    if not query:
        return url
    return url + ("&" if urlsplit(url).query else "?") + urlencode(query)


def _redirect_target(url: str, location: str | None) -> str | None:
    """The absolute http(s) URL a redirect points to, or None if it points nowhere we can go."""
    if location is None:
        return None
    try:
        target = urljoin(url, location)
        _origin(target)  # raises for a malformed host or port, which the HTTP client would too
    except ValueError:
        return None
    parts = urlsplit(target)
    return target if parts.scheme in ("http", "https") and parts.hostname else None


def _quote(reference: str) -> str:
    return quote(reference, safe=":")


def _header(response: IResponse, name: bytes) -> str | None:
    """The first value of a header, decoded so that no byte an upstream sends can fail."""
    values = response.headers.getRawHeaders(name)
    return values[0].decode("latin-1") if values else None


def _media_type(response: IResponse) -> str:
    return (_header(response, b"Content-Type") or "").partition(";")[0].strip()


def _content_length(response: IResponse) -> int | None:
    value = _header(response, b"Content-Length")
    return int(value) if value is not None and re.fullmatch(r"[0-9]+", value) else None


def _cancelled(exc: BaseException) -> bool:
    """Whether the request was cancelled (by treq's timeout or our caller), at any stage."""
    if isinstance(exc, (ResponseFailed, RequestTransmissionFailed)):
        return any(reason.check(CancelledError) for reason in exc.reasons)
    return isinstance(exc, (CancelledError, ConnectingCancelledError))


def _tls_failure(exc: BaseException) -> str | None:
    """Why the TLS handshake failed, if that is why the request did."""
    if isinstance(exc, (ResponseFailed, RequestTransmissionFailed)):
        return next((r for r in map(handshake_failure, (f.value for f in exc.reasons)) if r is not None), None)
    return None


def _describe(exc: BaseException) -> str:
    """A short reason for logs and messages: exception class names, never their arguments."""
    if isinstance(exc, (ResponseFailed, RequestTransmissionFailed)):
        return f"{type(exc).__name__}({', '.join(type(r.value).__name__ for r in exc.reasons)})"
    return type(exc).__name__


def _not_found(target: _Target, upstream_code: str | None) -> RegistryError:
    """The upstream's own code when it fits the call, else the call's default."""
    code = upstream_code if upstream_code in target.codes else target.codes[0]
    if code == "NAME_UNKNOWN":
        return name_unknown(target.repo)
    if code == "BLOB_UNKNOWN":
        return blob_unknown(target.reference)
    return manifest_unknown(target.reference)


def _parse_token(body: bytes) -> tuple[str, float]:
    """The token and its lifetime from a token endpoint's JSON answer.

    The Docker token spec says ``token``; OAuth2-style endpoints say ``access_token``. Messages
    never quote the body, since it may hold a token.
    """
    document = json.loads(body)
    if not isinstance(document, dict):
        raise ValueError("answer is not a JSON object")
    token = document.get("token") or document.get("access_token")
    if not isinstance(token, str) or not _TOKEN_CHARS.fullmatch(token):
        raise ValueError("no token, or one that cannot go into a header")
    expires_in = document.get("expires_in")
    if isinstance(expires_in, (int, float)) and not isinstance(expires_in, bool) and expires_in > 0:
        return token, float(expires_in)
    return token, _TOKEN_LIFETIME
