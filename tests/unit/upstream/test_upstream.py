"""``UpstreamClient`` against a fake registry, token service and CDN, all served through ``StubTreq``.

Every request the client makes lands in ``FakeUpstream.seen``, so tests assert exactly what went over
the wire (which host, which headers) as well as what came back. Time is a ``Clock``; a test that
leaves a timer behind fails in ``tearDown``.
"""
from __future__ import annotations

import base64
import hashlib
import json
import tempfile
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import treq
from OpenSSL import SSL
from treq.testing import StubTreq
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.error import (
    ConnectionLost,
    ConnectionRefusedError,
    DNSLookupError,
)
from twisted.internet.error import TimeoutError as ConnectTimeoutError
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogEvent, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseNeverReceived
from twisted.web.iweb import IResponse
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from metahub.config.file import UpstreamConfig
from metahub.oci.errors import RegistryError
from metahub.oci.media import Manifest
from metahub.upstream.client import (
    READ_SIZE,
    ManifestHead,
    UpstreamClient,
    make_http_clients,
)
from metahub.upstream.tls import CertificateRejected
from tests.peers.tls import make_ca

T = TypeVar("T")

MANIFEST = b'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","layers":[]}'
MANIFEST_DIGEST = "sha256:" + hashlib.sha256(MANIFEST).hexdigest()
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
ACCEPT = [OCI_MANIFEST, "application/vnd.oci.image.index.v1+json"]
BLOB_DIGEST = "sha256:" + "ab" * 32
REALM = "https://auth.test/token"
PASSWORD = "pw-s3cret"

Response = tuple[int, dict[str, str | list[str]], bytes]  # a list is several lines of one header
Handler = Callable[["Seen"], Response]


@dataclass
class Seen:
    """One request as the fake upstream received it; header names lower-cased."""

    method: str
    host: str
    path: str
    args: dict[str, list[str]]
    headers: dict[str, str]


class FakeUpstream(Resource):
    """Every host (registry, token realm, CDN) in one resource, routed by ``host + path``."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.routes: dict[str, Handler] = {}
        self.seen: list[Seen] = []

    def on(self, host_path: str, answer: Handler | Response) -> None:
        self.routes[host_path] = answer if callable(answer) else (lambda _seen: answer)

    def to(self, host: str) -> list[Seen]:
        return [seen for seen in self.seen if seen.host == host]

    def render(self, request: Request) -> bytes:
        seen = Seen(
            method=request.method.decode(),
            host=(request.getHeader(b"host") or b"").decode(),
            path=request.path.decode(),
            args={k.decode(): [v.decode() for v in vs] for k, vs in request.args.items()},
            headers={
                k.decode().lower(): b", ".join(vs).decode() for k, vs in request.requestHeaders.getAllRawHeaders()
            },
        )
        self.seen.append(seen)
        handler = self.routes.get(seen.host + seen.path)
        code, headers, body = handler(seen) if handler else (599, {}, b"no route")
        request.setResponseCode(code)
        for name, value in headers.items():
            request.responseHeaders.setRawHeaders(name, value if isinstance(value, list) else [value])
        return body


class TokenService:
    """A token realm that hands out ``tok-1``, ``tok-2``, ... and remembers what it was asked."""

    def __init__(self, expires_in: int | None = 300, field: str = "token") -> None:
        self.expires_in = expires_in
        self.field = field
        self.issued: list[str] = []

    def __call__(self, seen: Seen) -> Response:
        token = f"tok-{len(self.issued) + 1}"
        self.issued.append(token)
        answer: dict[str, Any] = {self.field: token}
        if self.expires_in is not None:
            answer["expires_in"] = self.expires_in
        return 200, {"Content-Type": "application/json"}, json.dumps(answer).encode()


def bearer_only(accepts: Callable[[str], bool], answer: Response, repo: str = "library/alpine") -> Handler:
    """A registry route that wants a bearer token that ``accepts`` likes."""

    def handler(seen: Seen) -> Response:
        authorization = seen.headers.get("authorization", "")
        if authorization.startswith("Bearer ") and accepts(authorization.removeprefix("Bearer ")):
            return answer
        challenge = f'Bearer realm="{REALM}",service="registry.test",scope="repository:{repo}:pull"'
        return 401, {"WWW-Authenticate": challenge}, b'{"errors":[{"code":"UNAUTHORIZED"}]}'

    return handler


def manifest_answer(body: bytes = MANIFEST, digest: str | None = MANIFEST_DIGEST) -> Response:
    headers: dict[str, str | list[str]] = {"Content-Type": OCI_MANIFEST}
    if digest is not None:
        headers["Docker-Content-Digest"] = digest
    return 200, headers, body


def oci_error(code: str) -> bytes:
    return json.dumps({"errors": [{"code": code, "message": "upstream says so"}]}).encode()


class Hang(Resource):
    """Never answers; with ``partial``, sends headers and some body, then stalls."""

    isLeaf = True

    def __init__(self, partial: bool = False) -> None:
        super().__init__()
        self.partial = partial

    def render(self, request: Request) -> object:
        if self.partial:
            request.setHeader(b"content-type", OCI_MANIFEST.encode())
            request.setHeader(b"content-length", b"1000")
            request.write(b"{")
        return NOT_DONE_YET


class RecordingHTTP:
    """Passes requests to StubTreq, keeping the keyword arguments the client used."""

    def __init__(self, inner: StubTreq) -> None:
        self.inner = inner
        self.kwargs: list[dict[str, Any]] = []

    def request(self, method: str, url: str, **kwargs: Any) -> Deferred[IResponse]:
        self.kwargs.append(kwargs)
        return self.inner.request(method, url, **kwargs)


class FailingHTTP:
    """A network where every request fails with one exception."""

    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    def request(self, method: str, url: str, **kwargs: Any) -> Deferred[IResponse]:
        return fail(self.exc)


class UpstreamTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.upstream = FakeUpstream()
        self.logged: list[str] = []

        def observe(event: LogEvent) -> None:
            self.logged.append(formatEvent(event) or "")

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)

    def tearDown(self) -> None:
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def client(
        self, username: str | None = None, http: Any = None, read_timeout: float = 30.0
    ) -> UpstreamClient:
        config = UpstreamConfig(
            "hub", "https://registry.test", username=username, password=PASSWORD if username else None,
            read_timeout=read_timeout,
        )
        return UpstreamClient(config, http or StubTreq(self.upstream), self.clock)

    def ok(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return self.successResultOf(Deferred.fromCoroutine(coroutine))

    def error(self, coroutine: Coroutine[Any, Any, object]) -> RegistryError:
        failure = self.failureResultOf(Deferred.fromCoroutine(coroutine), RegistryError)
        assert isinstance(failure.value, RegistryError)
        return failure.value

    def authorizations(self) -> list[str | None]:
        """The Authorization header of each request the registry (not its token realm) got."""
        return [seen.headers.get("authorization") for seen in self.upstream.to("registry.test")]

    def assert_no_secrets(self, *texts: str, tokens: tuple[str, ...] = ()) -> None:
        basic = base64.b64encode(f"robot:{PASSWORD}".encode()).decode()
        for text in [*texts, *self.logged]:
            for secret in (PASSWORD, basic, *tokens):
                self.assertNotIn(secret, text)


class AnonymousTests(UpstreamTestCase):
    def test_get_manifest_by_tag(self) -> None:
        self.upstream.on("registry.test/v2/library/alpine/manifests/latest", manifest_answer())
        manifest = self.ok(self.client().get_manifest("library/alpine", "latest", ACCEPT))
        self.assertEqual(manifest, Manifest(MANIFEST, OCI_MANIFEST, MANIFEST_DIGEST))
        [seen] = self.upstream.seen
        self.assertEqual(seen.method, "GET")
        self.assertEqual(seen.headers["accept"], ", ".join(ACCEPT))
        self.assertNotIn("authorization", seen.headers)

    def test_digest_is_computed_when_upstream_does_not_send_one(self) -> None:
        self.upstream.on("registry.test/v2/library/alpine/manifests/latest", manifest_answer(digest=None))
        manifest = self.ok(self.client().get_manifest("library/alpine", "latest", ACCEPT))
        self.assertEqual(manifest.digest, MANIFEST_DIGEST)

    def test_media_type_drops_parameters(self) -> None:
        self.upstream.on(
            "registry.test/v2/library/alpine/manifests/latest",
            (200, {"Content-Type": f"{OCI_MANIFEST}; charset=utf-8"}, MANIFEST),
        )
        manifest = self.ok(self.client().get_manifest("library/alpine", "latest", ACCEPT))
        self.assertEqual(manifest.media_type, OCI_MANIFEST)

    def test_manifest_without_content_type_goes_by_its_own_media_type(self) -> None:
        body = MANIFEST.replace(OCI_MANIFEST.encode(), b"application/vnd.docker.distribution.manifest.v2+json")
        self.upstream.on("registry.test/v2/library/alpine/manifests/latest", (200, {"Content-Type": ""}, body))
        manifest = self.ok(self.client().get_manifest("library/alpine", "latest", ACCEPT))
        self.assertEqual(manifest.media_type, "application/vnd.docker.distribution.manifest.v2+json")

    def test_tag_whose_digest_header_lies_is_rejected(self) -> None:
        wrong = "sha256:" + "0" * 64
        self.upstream.on("registry.test/v2/library/alpine/manifests/latest", manifest_answer(digest=wrong))
        error = self.error(self.client().get_manifest("library/alpine", "latest", ACCEPT))
        self.assertEqual((error.status, error.code, error.detail), (502, "DIGEST_INVALID", {"digest": wrong}))

    def test_get_manifest_by_digest_verifies_the_body(self) -> None:
        self.upstream.on(f"registry.test/v2/library/alpine/manifests/{MANIFEST_DIGEST}", manifest_answer(digest=None))
        manifest = self.ok(self.client().get_manifest("library/alpine", MANIFEST_DIGEST, ACCEPT))
        self.assertEqual(manifest.digest, MANIFEST_DIGEST)

    def test_get_manifest_by_digest_rejects_other_bytes(self) -> None:
        # The header agrees with the reference; only hashing the body shows the lie.
        self.upstream.on(
            f"registry.test/v2/library/alpine/manifests/{MANIFEST_DIGEST}", manifest_answer(body=MANIFEST + b" ")
        )
        error = self.error(self.client().get_manifest("library/alpine", MANIFEST_DIGEST, ACCEPT))
        self.assertEqual((error.status, error.code), (502, "DIGEST_INVALID"))
        self.assertEqual(error.detail, {"digest": MANIFEST_DIGEST})
        self.assertIn("hub", error.message)

    def test_get_manifest_by_sha512_digest(self) -> None:
        digest = "sha512:" + hashlib.sha512(MANIFEST).hexdigest()
        self.upstream.on(f"registry.test/v2/library/alpine/manifests/{digest}", manifest_answer(digest=None))
        self.assertEqual(self.ok(self.client().get_manifest("library/alpine", digest, ACCEPT)).digest, digest)

    def test_unknown_digest_algorithm_is_invalid(self) -> None:
        self.upstream.on("registry.test/v2/library/alpine/manifests/md5:abc", manifest_answer(digest=None))
        error = self.error(self.client().get_manifest("library/alpine", "md5:abc", ACCEPT))
        self.assertEqual((error.status, error.code), (400, "DIGEST_INVALID"))

    def test_oversized_manifest_is_bad_gateway(self) -> None:
        self.upstream.on(
            "registry.test/v2/library/alpine/manifests/latest", manifest_answer(body=b" " * (4 * 1024 * 1024 + 1))
        )
        error = self.error(self.client().get_manifest("library/alpine", "latest", ACCEPT))
        self.assertEqual(error.status, 502)
        self.assertIn("more than 4194304 bytes", error.message)

    def test_head_manifest(self) -> None:
        self.upstream.on("registry.test/v2/library/alpine/manifests/latest", manifest_answer())
        head = self.ok(self.client().head_manifest("library/alpine", "latest", ACCEPT))
        self.assertEqual(head, ManifestHead(MANIFEST_DIGEST, OCI_MANIFEST, len(MANIFEST)))
        [seen] = self.upstream.seen
        self.assertEqual(seen.method, "HEAD")
        self.assertEqual(seen.headers["accept"], ", ".join(ACCEPT))

    def test_head_manifest_without_digest_header_falls_back_to_get(self) -> None:
        self.upstream.on("registry.test/v2/library/alpine/manifests/latest", manifest_answer(digest=None))
        head = self.ok(self.client().head_manifest("library/alpine", "latest", ACCEPT))
        self.assertEqual(head, ManifestHead(MANIFEST_DIGEST, OCI_MANIFEST, len(MANIFEST)))
        self.assertEqual([seen.method for seen in self.upstream.seen], ["HEAD", "GET"])

    def test_head_manifest_by_digest_needs_no_digest_header(self) -> None:
        self.upstream.on(f"registry.test/v2/library/alpine/manifests/{MANIFEST_DIGEST}", manifest_answer(digest=None))
        head = self.ok(self.client().head_manifest("library/alpine", MANIFEST_DIGEST, ACCEPT))
        self.assertEqual(head, ManifestHead(MANIFEST_DIGEST, OCI_MANIFEST, len(MANIFEST)))
        self.assertEqual([seen.method for seen in self.upstream.seen], ["HEAD"])

    def test_head_blob_returns_size(self) -> None:
        self.upstream.on(f"registry.test/v2/library/alpine/blobs/{BLOB_DIGEST}", (200, {}, b"0123456789"))
        self.assertEqual(self.ok(self.client().head_blob("library/alpine", BLOB_DIGEST)), 10)
        self.assertEqual([seen.method for seen in self.upstream.seen], ["HEAD"])

    def test_head_blob_follows_redirects(self) -> None:
        self.upstream.on(
            f"registry.test/v2/library/alpine/blobs/{BLOB_DIGEST}", (307, {"Location": "https://cdn.test/b"}, b"")
        )
        self.upstream.on("cdn.test/b", (200, {}, b"0123"))
        self.assertEqual(self.ok(self.client().head_blob("library/alpine", BLOB_DIGEST)), 4)
        self.assertEqual(
            [(seen.method, seen.host) for seen in self.upstream.seen], [("HEAD", "registry.test"), ("HEAD", "cdn.test")]
        )

    def test_head_blob_unknown(self) -> None:
        self.upstream.on(f"registry.test/v2/library/alpine/blobs/{BLOB_DIGEST}", (404, {}, b""))
        error = self.error(self.client().head_blob("library/alpine", BLOB_DIGEST))
        self.assertEqual((error.status, error.code, error.detail), (404, "BLOB_UNKNOWN", {"digest": BLOB_DIGEST}))

    def test_tags_list_passes_n_and_last_and_returns_link(self) -> None:
        link = '</v2/library/alpine/tags/list?last=3.19&n=2>; rel="next"'
        body = b'{"name":"library/alpine","tags":["3.18","3.19"]}'
        self.upstream.on("registry.test/v2/library/alpine/tags/list", (200, {"Link": link}, body))
        self.assertEqual(self.ok(self.client().tags_list("library/alpine", n=2, last="3.17")), (body, link))
        self.assertEqual(self.upstream.seen[0].args, {"n": ["2"], "last": ["3.17"]})

    def test_tags_list_without_paging(self) -> None:
        self.upstream.on("registry.test/v2/library/alpine/tags/list", (200, {}, b'{"tags":[]}'))
        self.assertEqual(self.ok(self.client().tags_list("library/alpine")), (b'{"tags":[]}', None))
        self.assertEqual(self.upstream.seen[0].args, {})

    def test_get_blob_streams_and_forwards_headers(self) -> None:
        self.upstream.on(
            f"registry.test/v2/library/alpine/blobs/{BLOB_DIGEST}", (206, {"Content-Range": "bytes 2-4/10"}, b"yer")
        )
        http = RecordingHTTP(StubTreq(self.upstream))
        response = self.ok(self.client(http=http).get_blob("library/alpine", BLOB_DIGEST, {"Range": "bytes=2-4"}))
        self.assertEqual(response.code, 206)
        self.assertEqual(self.successResultOf(treq.content(response)), b"yer")
        self.assertEqual(self.upstream.seen[0].headers["range"], "bytes=2-4")
        # Unbuffered, or treq would hold the whole layer in memory; redirects are ours to follow.
        self.assertEqual([(k["unbuffered"], k["allow_redirects"]) for k in http.kwargs], [(True, False)])
        self.assertEqual(http.kwargs[0]["timeout"], 30.0)
        self.assertIs(http.kwargs[0]["reactor"], self.clock)

    def test_caller_cannot_smuggle_an_authorization_header(self) -> None:
        self.upstream.on(f"registry.test/v2/library/alpine/blobs/{BLOB_DIGEST}", (200, {}, b"layer"))
        self.ok(self.client().get_blob("library/alpine", BLOB_DIGEST, {"Authorization": "Basic bWV0YWh1Yi11c2Vy"}))
        self.assertNotIn("authorization", self.upstream.seen[0].headers)

    def test_repository_and_reference_are_quoted(self) -> None:
        self.upstream.on("registry.test/v2/org/a%20b/manifests/x%3Fy", manifest_answer())
        self.ok(self.client().get_manifest("org/a b", "x?y", ACCEPT))
        self.assertEqual(self.upstream.seen[0].path, "/v2/org/a%20b/manifests/x%3Fy")


class BasicAuthTests(UpstreamTestCase):
    def setUp(self) -> None:
        super().setUp()
        expected = "Basic " + base64.b64encode(f"robot:{PASSWORD}".encode()).decode()

        def handler(seen: Seen) -> Response:
            if seen.headers.get("authorization") == expected:
                return manifest_answer()
            return 401, {"WWW-Authenticate": 'Basic realm="Registry Realm"'}, b""

        self.expected = expected
        self.upstream.on("registry.test/v2/private/app/manifests/1.0", handler)

    def test_anonymous_first_then_credentials(self) -> None:
        manifest = self.ok(self.client("robot").get_manifest("private/app", "1.0", ACCEPT))
        self.assertEqual(manifest.digest, MANIFEST_DIGEST)
        self.assertEqual(
            [seen.headers.get("authorization") for seen in self.upstream.seen], [None, self.expected]
        )
        self.assert_no_secrets()

    def test_later_requests_send_credentials_up_front(self) -> None:
        client = self.client("robot")
        self.ok(client.get_manifest("private/app", "1.0", ACCEPT))
        self.ok(client.get_manifest("private/app", "1.0", ACCEPT))
        self.assertEqual(
            [seen.headers.get("authorization") for seen in self.upstream.seen], [None, self.expected, self.expected]
        )

    def test_without_credentials_is_unauthorized(self) -> None:
        error = self.error(self.client().get_manifest("private/app", "1.0", ACCEPT))
        self.assertEqual((error.status, error.code), (401, "UNAUTHORIZED"))
        self.assertEqual(error.message, "upstream hub requires credentials and none are configured")
        self.assertEqual(len(self.upstream.seen), 1)

    def test_refused_credentials_are_unauthorized(self) -> None:
        self.upstream.on(
            "registry.test/v2/private/app/manifests/1.0", (401, {"WWW-Authenticate": "Basic realm=r"}, b"")
        )
        error = self.error(self.client("robot").get_manifest("private/app", "1.0", ACCEPT))
        self.assertEqual((error.status, error.code), (401, "UNAUTHORIZED"))
        self.assertEqual(error.message, "upstream hub refused the configured credentials")
        self.assertEqual(error.headers, {})
        self.assertEqual(len(self.upstream.seen), 2)
        self.assert_no_secrets(str(error), error.message)


class BearerAuthTests(UpstreamTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.tokens = TokenService()
        self.upstream.on("auth.test/token", self.tokens)
        self.accepted: Callable[[str], bool] = lambda token: token in self.tokens.issued
        self.upstream.on(
            "registry.test/v2/library/alpine/manifests/latest",
            bearer_only(lambda token: self.accepted(token), manifest_answer()),
        )

    def test_token_flow(self) -> None:
        manifest = self.ok(self.client().get_manifest("library/alpine", "latest", ACCEPT))
        self.assertEqual(manifest.digest, MANIFEST_DIGEST)
        registry = self.upstream.to("registry.test")
        self.assertEqual([seen.headers.get("authorization") for seen in registry], [None, "Bearer tok-1"])
        [token_request] = self.upstream.to("auth.test")
        self.assertEqual(token_request.path, "/token")
        self.assertEqual(
            token_request.args, {"service": ["registry.test"], "scope": ["repository:library/alpine:pull"]}
        )
        self.assertNotIn("authorization", token_request.headers)

    def test_token_request_carries_basic_credentials(self) -> None:
        self.ok(self.client("robot").get_manifest("library/alpine", "latest", ACCEPT))
        [token_request] = self.upstream.to("auth.test")
        expected = "Basic " + base64.b64encode(f"robot:{PASSWORD}".encode()).decode()
        self.assertEqual(token_request.headers["authorization"], expected)
        # The registry itself only ever sees the token.
        self.assertEqual(self.authorizations(), [None, "Bearer tok-1"])
        self.assert_no_secrets(tokens=("tok-1",))

    def test_token_is_requested_once_for_two_calls(self) -> None:
        client = self.client()
        self.ok(client.get_manifest("library/alpine", "latest", ACCEPT))
        self.ok(client.get_manifest("library/alpine", "latest", ACCEPT))
        self.assertEqual(self.tokens.issued, ["tok-1"])
        self.assertEqual(self.authorizations(), [None, "Bearer tok-1", "Bearer tok-1"])

    def assert_renewed_at_50_seconds(self, client: UpstreamClient) -> None:
        """A 60-second token is used for 49 s and renewed by 51 s (10 s before it expires)."""
        self.ok(client.get_manifest("library/alpine", "latest", ACCEPT))
        self.clock.advance(49)
        self.ok(client.get_manifest("library/alpine", "latest", ACCEPT))
        self.assertEqual(self.tokens.issued, ["tok-1"])
        self.clock.advance(2)
        self.ok(client.get_manifest("library/alpine", "latest", ACCEPT))
        self.assertEqual(self.tokens.issued, ["tok-1", "tok-2"])

    def test_token_is_renewed_shortly_before_it_expires(self) -> None:
        self.tokens.expires_in = 60
        client = self.client()
        self.assert_renewed_at_50_seconds(client)
        # The expired token is not tried: the challenge is known, so the new one is fetched first.
        self.assertEqual(self.authorizations(), [None, "Bearer tok-1", "Bearer tok-1", "Bearer tok-2"])

    def test_access_token_and_default_lifetime_of_60_seconds(self) -> None:
        self.tokens.field = "access_token"
        self.tokens.expires_in = None
        self.assert_renewed_at_50_seconds(self.client())

    def test_tokens_are_per_scope(self) -> None:
        self.upstream.on(
            "registry.test/v2/library/busybox/manifests/latest",
            bearer_only(lambda token: token == "tok-2", manifest_answer(), repo="library/busybox"),
        )
        client = self.client()
        self.ok(client.get_manifest("library/alpine", "latest", ACCEPT))
        self.ok(client.get_manifest("library/busybox", "latest", ACCEPT))
        self.assertEqual(
            [seen.args["scope"] for seen in self.upstream.to("auth.test")],
            [["repository:library/alpine:pull"], ["repository:library/busybox:pull"]],
        )
        # The second repository skips the anonymous attempt: the realm is known by then.
        self.assertEqual(
            [(seen.path.split("/")[3], seen.headers.get("authorization"))
             for seen in self.upstream.to("registry.test")],
            [("alpine", None), ("alpine", "Bearer tok-1"), ("busybox", "Bearer tok-2")],
        )

    def test_rejected_cached_token_is_refetched_once_then_unauthorized(self) -> None:
        client = self.client()
        self.ok(client.get_manifest("library/alpine", "latest", ACCEPT))
        self.accepted = lambda token: False
        error = self.error(client.get_manifest("library/alpine", "latest", ACCEPT))
        self.assertEqual((error.status, error.code), (401, "UNAUTHORIZED"))
        self.assertEqual(error.message, "upstream hub refused anonymous access")
        self.assertEqual(self.tokens.issued, ["tok-1", "tok-2"])
        self.assertEqual(self.authorizations(), [None, "Bearer tok-1", "Bearer tok-1", "Bearer tok-2"])
        self.assert_no_secrets(str(error), tokens=("tok-1", "tok-2"))
        # The refused token is not offered again.
        self.error(client.get_manifest("library/alpine", "latest", ACCEPT))
        self.assertEqual(self.upstream.to("registry.test")[4].headers["authorization"], "Bearer tok-3")

    def test_rejected_token_is_dropped_even_when_renewal_fails(self) -> None:
        client = self.client()
        self.ok(client.get_manifest("library/alpine", "latest", ACCEPT))
        self.accepted = lambda token: token == "tok-2"
        self.upstream.on("auth.test/token", (503, {}, b""))
        self.assertEqual(self.error(client.get_manifest("library/alpine", "latest", ACCEPT)).status, 502)
        self.upstream.on("auth.test/token", self.tokens)
        self.ok(client.get_manifest("library/alpine", "latest", ACCEPT))
        self.assertEqual(self.authorizations(), [None, "Bearer tok-1", "Bearer tok-1", "Bearer tok-2"])

    def test_rejected_cached_token_recovers_with_a_new_one(self) -> None:
        client = self.client()
        self.ok(client.get_manifest("library/alpine", "latest", ACCEPT))
        self.accepted = lambda token: token == "tok-2"
        self.ok(client.get_manifest("library/alpine", "latest", ACCEPT))
        self.ok(client.get_manifest("library/alpine", "latest", ACCEPT))
        self.assertEqual(self.tokens.issued, ["tok-1", "tok-2"])

    def test_token_endpoint_refusing_credentials_is_unauthorized(self) -> None:
        self.upstream.on("auth.test/token", (401, {}, b'{"details":"incorrect username or password"}'))
        error = self.error(self.client("robot").get_manifest("library/alpine", "latest", ACCEPT))
        self.assertEqual((error.status, error.code), (401, "UNAUTHORIZED"))
        self.assertEqual(error.message, "upstream hub refused the configured credentials")
        self.assert_no_secrets(str(error))

    def test_token_endpoint_down_is_bad_gateway(self) -> None:
        self.upstream.on("auth.test/token", (503, {}, b""))
        error = self.error(self.client().get_manifest("library/alpine", "latest", ACCEPT))
        self.assertEqual(
            (error.status, error.code, error.message), (502, "UNAVAILABLE", "upstream hub answered HTTP 503")
        )

    def test_token_answer_without_token_is_bad_gateway(self) -> None:
        for body in (b"not json", b"[]", b'{"token": 5}', b'{"token": "a b"}', b'{"token": ""}'):
            self.upstream.on("auth.test/token", (200, {}, body))
            error = self.error(self.client().get_manifest("library/alpine", "latest", ACCEPT))
            self.assertEqual((error.status, error.message), (502, "upstream hub sent no usable token"), body)

    def test_credentials_are_not_sent_to_a_plain_http_realm(self) -> None:
        self.upstream.on(
            "registry.test/v2/library/alpine/manifests/latest",
            (401, {"WWW-Authenticate": 'Bearer realm="http://auth.test/token"'}, b""),
        )
        error = self.error(self.client("robot").get_manifest("library/alpine", "latest", ACCEPT))
        self.assertEqual(error.status, 502)
        self.assertEqual(self.upstream.to("auth.test"), [])

    def test_realm_that_is_not_a_url_is_bad_gateway(self) -> None:
        self.upstream.on(
            "registry.test/v2/library/alpine/manifests/latest",
            (401, {"WWW-Authenticate": 'Bearer realm="/token"'}, b""),
        )
        error = self.error(self.client().get_manifest("library/alpine", "latest", ACCEPT))
        self.assertEqual(error.status, 502)
        self.assertEqual(len(self.upstream.seen), 1)

    def test_bearer_is_preferred_over_basic_across_header_lines(self) -> None:
        def handler(seen: Seen) -> Response:
            if seen.headers.get("authorization") == "Bearer tok-1":
                return manifest_answer()
            return 401, {"WWW-Authenticate": ['Basic realm="r"', f'Bearer realm="{REALM}"']}, b""

        self.upstream.on("registry.test/v2/library/alpine/manifests/latest", handler)
        self.ok(self.client("robot").get_manifest("library/alpine", "latest", ACCEPT))
        self.assertEqual(self.tokens.issued, ["tok-1"])

    def test_unusable_challenges_are_bad_gateway(self) -> None:
        for header in ({}, {"WWW-Authenticate": 'Bearer realm="unterminated'}, {"WWW-Authenticate": "Negotiate abc=="}):
            self.upstream.seen.clear()
            self.upstream.on("registry.test/v2/library/alpine/manifests/latest", (401, header, b""))
            error = self.error(self.client().get_manifest("library/alpine", "latest", ACCEPT))
            self.assertEqual((error.status, error.code), (502, "UNAVAILABLE"), header)
            self.assertEqual(len(self.upstream.seen), 1)


class RedirectTests(UpstreamTestCase):
    blob = f"registry.test/v2/library/alpine/blobs/{BLOB_DIGEST}"

    def setUp(self) -> None:
        super().setUp()
        self.tokens = TokenService()
        self.upstream.on("auth.test/token", self.tokens)

    def redirect_to(self, location: str, code: int = 307) -> None:
        self.upstream.on(self.blob, bearer_only(lambda token: True, (code, {"Location": location}, b"")))

    def body_of(self, client: UpstreamClient) -> bytes:
        response = self.ok(client.get_blob("library/alpine", BLOB_DIGEST))
        self.assertEqual(response.code, 200)
        return self.successResultOf(treq.content(response))

    def test_other_host_does_not_get_the_authorization(self) -> None:
        self.redirect_to("https://cdn.test/layers/1?X-Amz-Signature=sig-secret")
        self.upstream.on("cdn.test/layers/1", (200, {}, b"layer"))
        self.assertEqual(self.body_of(self.client()), b"layer")
        [cdn] = self.upstream.to("cdn.test")
        self.assertNotIn("authorization", cdn.headers)
        self.assertEqual(cdn.args, {"X-Amz-Signature": ["sig-secret"]})
        self.assertEqual(self.upstream.to("registry.test")[-1].headers["authorization"], "Bearer tok-1")
        self.assertIn("upstream hub: redirected to https://cdn.test:443", self.logged)
        self.assertIn("upstream hub: GET https://cdn.test/layers/1 -> 200", self.logged)
        self.assert_no_secrets(tokens=("tok-1", "sig-secret"))

    def test_same_host_keeps_the_authorization(self) -> None:
        self.redirect_to("/storage/1", code=302)
        self.upstream.on("registry.test/storage/1", (200, {}, b"layer"))
        self.assertEqual(self.body_of(self.client()), b"layer")
        self.assertEqual(self.upstream.seen[-1].path, "/storage/1")
        self.assertEqual(self.upstream.seen[-1].headers["authorization"], "Bearer tok-1")

    def test_other_port_or_scheme_is_another_origin(self) -> None:
        for location in ("https://registry.test:8443/storage/1", "http://registry.test/storage/1"):
            self.upstream.seen.clear()
            self.redirect_to(location)
            host = "registry.test:8443" if ":8443" in location else "registry.test"
            self.upstream.on(f"{host}/storage/1", (200, {}, b"layer"))
            self.assertEqual(self.body_of(self.client()), b"layer")
            self.assertNotIn("authorization", self.upstream.seen[-1].headers, location)

    def test_a_cdn_401_is_not_answered_with_credentials(self) -> None:
        self.redirect_to("https://cdn.test/layers/1")
        self.upstream.on("cdn.test/layers/1", (401, {"WWW-Authenticate": 'Basic realm="cdn"'}, b""))
        client = self.client("robot")
        self.assertEqual(self.error(client.get_blob("library/alpine", BLOB_DIGEST)).status, 401)
        self.upstream.seen.clear()
        # With the token cached, the first attempt ends at the CDN; its challenge is not the
        # upstream's, so nothing answers it and nothing is retried.
        self.assertEqual(self.error(client.get_blob("library/alpine", BLOB_DIGEST)).status, 401)
        self.assertEqual(
            [(seen.host, seen.headers.get("authorization")) for seen in self.upstream.seen],
            [("registry.test", "Bearer tok-1"), ("cdn.test", None)],
        )

    def chain(self, hops: int) -> None:
        """The blob URL redirects, then each hop to the next, ``hops`` redirects in all."""
        self.redirect_to("https://cdn.test/hop/1")
        for hop in range(1, hops):
            self.upstream.on(f"cdn.test/hop/{hop}", (307, {"Location": f"/hop/{hop + 1}"}, b""))
        self.upstream.on(f"cdn.test/hop/{hops}", (200, {}, b"layer"))

    def test_five_redirects_are_followed(self) -> None:
        self.chain(5)
        self.assertEqual(self.body_of(self.client()), b"layer")

    def test_six_redirects_are_too_many(self) -> None:
        self.chain(6)
        error = self.error(self.client().get_blob("library/alpine", BLOB_DIGEST))
        self.assertEqual((error.status, error.message), (502, "upstream hub redirected more than 5 times"))
        self.assertEqual([seen.path for seen in self.upstream.to("cdn.test")], [f"/hop/{n}" for n in range(1, 6)])

    def test_redirects_nowhere_are_bad_gateway(self) -> None:
        for answer in (
            (307, {"Location": "ftp://cdn.test/x"}, b""),
            (302, {}, b""),
            (307, {"Location": "http://cdn.test:port/"}, b""),
            (307, {"Location": "http://[::1/"}, b""),
        ):
            self.upstream.on(self.blob, answer)
            error = self.error(self.client().get_blob("library/alpine", BLOB_DIGEST))
            self.assertEqual((error.status, error.message), (502, "upstream hub sent a redirect metahub cannot follow"))


class ErrorMappingTests(UpstreamTestCase):
    manifest = "registry.test/v2/library/alpine/manifests/latest"
    blob = f"registry.test/v2/library/alpine/blobs/{BLOB_DIGEST}"
    tags = "registry.test/v2/library/alpine/tags/list"

    def manifest_error(self) -> RegistryError:
        return self.error(self.client().get_manifest("library/alpine", "latest", ACCEPT))

    def blob_error(self) -> RegistryError:
        return self.error(self.client().get_blob("library/alpine", BLOB_DIGEST))

    def test_manifest_404(self) -> None:
        for body, code in (
            (oci_error("MANIFEST_UNKNOWN"), "MANIFEST_UNKNOWN"),
            (oci_error("NAME_UNKNOWN"), "NAME_UNKNOWN"),
            (b"404 page not found", "MANIFEST_UNKNOWN"),
            (oci_error("BLOB_UNKNOWN"), "MANIFEST_UNKNOWN"),  # not a code a manifest request can get
        ):
            self.upstream.on(self.manifest, (404, {}, body))
            error = self.manifest_error()
            self.assertEqual((error.status, error.code), (404, code), body)
        self.assertEqual(error.detail, {"reference": "latest"})

    def test_blob_404(self) -> None:
        for body, code in (
            (oci_error("BLOB_UNKNOWN"), "BLOB_UNKNOWN"),
            (oci_error("NAME_UNKNOWN"), "NAME_UNKNOWN"),
            (b"", "BLOB_UNKNOWN"),
            (b'{"errors": []}', "BLOB_UNKNOWN"),
        ):
            self.upstream.on(self.blob, (404, {}, body))
            error = self.blob_error()
            self.assertEqual((error.status, error.code), (404, code), body)
        self.assertEqual(error.detail, {"digest": BLOB_DIGEST})

    def test_tags_404(self) -> None:
        for body in (oci_error("NAME_UNKNOWN"), oci_error("MANIFEST_UNKNOWN"), b"nope"):
            self.upstream.on(self.tags, (404, {}, body))
            error = self.error(self.client().tags_list("library/alpine"))
            self.assertEqual(
                (error.status, error.code, error.detail), (404, "NAME_UNKNOWN", {"name": "library/alpine"}), body
            )

    def test_403_is_denied(self) -> None:
        self.upstream.on(self.manifest, (403, {}, oci_error("DENIED")))
        error = self.manifest_error()
        self.assertEqual((error.status, error.code, error.message), (403, "DENIED", "upstream hub denied access"))

    def test_429_passes_retry_after_through(self) -> None:
        self.upstream.on(self.manifest, (429, {"Retry-After": "30"}, oci_error("TOOMANYREQUESTS")))
        error = self.manifest_error()
        self.assertEqual((error.status, error.code, error.headers), (429, "TOOMANYREQUESTS", {"Retry-After": "30"}))

    def test_429_without_retry_after(self) -> None:
        self.upstream.on(self.manifest, (429, {}, b""))
        self.assertEqual(self.manifest_error().headers, {})

    def test_5xx_is_bad_gateway_naming_the_upstream(self) -> None:
        for status in (500, 502, 503):
            self.upstream.on(self.blob, (status, {}, b"oops"))
            error = self.blob_error()
            self.assertEqual((error.status, error.code), (502, "UNAVAILABLE"))
            self.assertEqual(error.message, f"upstream hub answered HTTP {status}")

    def test_unexpected_status_is_bad_gateway(self) -> None:
        self.upstream.on(self.manifest, (400, {}, oci_error("TAG_INVALID")))
        self.assertEqual(self.manifest_error().status, 502)

    def test_416_is_range_invalid_with_size(self) -> None:
        self.upstream.on(self.blob, (416, {"Content-Range": "bytes */1234"}, b""))
        error = self.error(self.client().get_blob("library/alpine", BLOB_DIGEST, {"Range": "bytes=2000-"}))
        self.assertEqual((error.status, error.code), (416, "RANGE_INVALID"))
        self.assertEqual((error.detail, error.headers), ({"range": "bytes=2000-"}, {"Content-Range": "bytes */1234"}))


class TransportTests(UpstreamTestCase):
    def transport_error(self, exc: Exception) -> RegistryError:
        return self.error(self.client(http=FailingHTTP(exc)).get_manifest("library/alpine", "latest", ACCEPT))

    def test_unreachable_is_bad_gateway(self) -> None:
        for exc, reason in (
            (ConnectionRefusedError(), "ConnectionRefusedError"),
            (DNSLookupError("registry.test"), "DNSLookupError"),
            (ConnectionLost(), "ConnectionLost"),
        ):
            error = self.transport_error(exc)
            self.assertEqual((error.status, error.code), (502, "UNAVAILABLE"))
            self.assertEqual(error.message, f"upstream hub is unreachable (https://registry.test:443: {reason})")

    def test_tls_failure_names_upstream_origin_and_reason(self) -> None:
        for reason, why in (
            (CertificateRejected("certificate verify failed (cert has expired)"),
             "certificate verify failed (cert has expired)"),
            (SSL.Error([("SSL routines", "", "wrong version number")]), "wrong version number"),
            (SSL.Error([]), "TLS error"),
        ):
            self.logged.clear()
            error = self.transport_error(ResponseNeverReceived([Failure(reason)]))
            message = f"upstream hub: TLS handshake with https://registry.test:443 failed: {why}"
            self.assertEqual((error.status, error.code, error.message), (502, "UNAVAILABLE", message))
            self.assertIn(f"{message} (GET https://registry.test/v2/library/alpine/manifests/latest)", self.logged)

    def test_connect_timeout_is_gateway_timeout(self) -> None:
        error = self.transport_error(ConnectTimeoutError())
        self.assertEqual((error.status, error.code), (504, "UNAVAILABLE"))

    def test_read_timeout_is_gateway_timeout(self) -> None:
        client = self.client(http=StubTreq(Hang()), read_timeout=5)
        d = Deferred.fromCoroutine(client.get_manifest("library/alpine", "latest", ACCEPT))
        self.clock.advance(4.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        error = self.failureResultOf(d, RegistryError).value
        self.assertEqual((error.status, error.message), (504, "upstream hub did not answer within 5 s"))

    def test_stalled_body_is_gateway_timeout(self) -> None:
        client = self.client(http=StubTreq(Hang(partial=True)), read_timeout=5)
        d = Deferred.fromCoroutine(client.get_manifest("library/alpine", "latest", ACCEPT))
        self.assertNoResult(d)
        self.clock.advance(5)
        error = self.failureResultOf(d, RegistryError).value
        self.assertEqual((error.status, error.message), (504, "upstream hub stalled while sending a manifest"))

    def test_cancel_by_caller_is_not_an_upstream_error(self) -> None:
        client = self.client(http=StubTreq(Hang()), read_timeout=5)
        d = Deferred.fromCoroutine(client.get_manifest("library/alpine", "latest", ACCEPT))
        self.clock.advance(1)
        d.cancel()
        self.failureResultOf(d, CancelledError)


class MakeHTTPClientTests(SynchronousTestCase):
    def test_connect_timeouts_and_tls_per_upstream(self) -> None:
        reactor = MemoryReactorClock()
        client = make_http_clients(
            reactor,
            [
                UpstreamConfig("hub", "https://127.0.0.1:8443", connect_timeout=3),
                UpstreamConfig("plain", "http://127.0.0.2:5000", connect_timeout=7),
            ],
        )["hub"]
        for url in ("https://127.0.0.1:8443/v2/", "http://127.0.0.2:5000/v2/", "https://127.0.0.3/blob"):
            client.get(url, reactor=reactor)
        timeouts = [(port, timeout) for _, port, _, timeout, _ in reactor.tcpClients]
        # A host reached only by redirect (the third) gets the longest configured timeout.
        self.assertEqual(timeouts, [(8443, 3), (5000, 7), (443, 7)])
        tls = [type(factory._wrappedFactory).__name__ for _, _, factory, _, _ in reactor.tcpClients]
        self.assertEqual(tls, ["TLSMemoryBIOFactory", "_HTTP11ClientFactory", "TLSMemoryBIOFactory"])

    def test_a_client_per_trust(self) -> None:
        """A pooled connection is reused by host and port alone, so upstreams that trust different
        certificates must not share a pool; those that trust the same may."""
        reactor = MemoryReactorClock()
        with tempfile.TemporaryDirectory() as directory:
            private = (make_ca(Path(directory)).cert_path.read_bytes(),)
        clients = make_http_clients(reactor, [
            UpstreamConfig("hub", "https://registry-1.docker.io"),
            UpstreamConfig("ghcr", "https://ghcr.io"),
            UpstreamConfig("private", "https://registry.internal", ca_file="ca.pem", ca_certificates=private),
        ])
        self.assertEqual(list(clients), ["hub", "ghcr", "private"])
        self.assertIs(clients["hub"], clients["ghcr"])
        self.assertIsNot(clients["hub"], clients["private"])

    def test_upstream_connections_read_a_megabyte_per_recv(self) -> None:
        reactor = MemoryReactorClock()
        client = make_http_clients(reactor, [UpstreamConfig("plain", "http://127.0.0.2:5000")])["plain"]
        client.get("http://127.0.0.2:5000/v2/", reactor=reactor)
        transport = StringTransport()
        self.assertNotEqual(getattr(transport, "bufferSize", None), READ_SIZE)
        reactor.tcpClients[0][2].buildProtocol(None).makeConnection(transport)
        reactor.advance(0)
        self.assertEqual(transport.bufferSize, READ_SIZE)
