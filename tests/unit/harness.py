"""metahub's HTTP face in memory: the real ``RegistryResource`` behind ``treq.testing.StubTreq``, its
upstreams fake registries (:class:`FakeRegistry`) behind StubTreqs of their own, on a fake clock.

The server is built the way the running one is (by the composition root, ``Root``), except that each
upstream's HTTP client is a StubTreq of its fake registry and thread work runs inline (the reactor's
pool, download lanes and the logins' KDF pool). A request is pumped until it is answered, so a test
reads like a conversation: ``registry.get("/v2/library/alpine/manifests/latest").status == 200``.
No socket, thread or subprocess is involved; the wire-level guards of ``RegistrySite`` (which
StubTreq's own ``Site`` leaves out) are tested in tests/unit/web/test_http_face.py.
"""
from __future__ import annotations

import base64
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import treq
from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from metahub.app import root as root_module
from metahub.app.root import Root
from metahub.config.file import UpstreamConfig, parse_config
from metahub.oci import media
from metahub.web.api import RegistryResource
from tests.unit.fakes import (
    FakeReactor,
    inline_threads,
    minimal,
)

_PATH = re.compile(r"/v2/(?P<repo>.+)/(?P<kind>manifests|blobs|tags)/(?P<rest>[^/]+)")


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def image_manifest(*layers: bytes) -> bytes:
    """An OCI image manifest whose layers are ``layers`` (config left out: metahub never needs it)."""
    return json.dumps({
        "schemaVersion": 2,
        "mediaType": media.OCI_MANIFEST,
        "layers": [
            {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": digest_of(layer), "size": len(layer)}
            for layer in layers
        ],
    }).encode()


def image_index(*builds: tuple[bytes, dict[str, Any]]) -> bytes:
    """An OCI image index over (manifest body, platform) pairs, in order."""
    return json.dumps({
        "schemaVersion": 2,
        "mediaType": media.OCI_INDEX,
        "manifests": [
            {"mediaType": media.OCI_MANIFEST, "digest": digest_of(body), "size": len(body), "platform": platform}
            for body, platform in builds
        ],
    }).encode()


def oci_error(code: str, message: str = "the fake upstream says so") -> bytes:
    return json.dumps({"errors": [{"code": code, "message": message}]}).encode()


@dataclass
class Forced:
    """An answer :class:`FakeRegistry` gives for one path instead of the real one."""

    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


class FakeRegistry(Resource):
    """An upstream registry held in dicts: manifests by repository and reference, blobs by
    repository and digest, tag lists from the manifests' tags.

    With ``token=True`` it wants a bearer token from its own ``/token`` realm, as Docker Hub does;
    with ``credentials`` that realm (and only it) asks for those Basic credentials. ``forced``
    answers a path with a fixed status (a 429, a 500); a path in ``hanging`` is never answered.
    """

    isLeaf = True

    def __init__(self, host: str = "upstream.test", token: bool = False,
                 credentials: tuple[str, str] | None = None) -> None:
        super().__init__()
        self.host = host
        self.token = token
        self.credentials = credentials
        self.manifests: dict[str, dict[str, tuple[str, bytes]]] = {}
        self.blobs: dict[str, dict[str, bytes]] = {}
        self.forced: dict[str, Forced] = {}
        self.hanging: set[str] = set()
        self.issued: list[str] = []
        self.requests: list[tuple[str, str]] = []  # (method, path with query) as received

    # -- content ----------------------------------------------------------------------------------

    def add_blob(self, repo: str, data: bytes) -> str:
        digest = digest_of(data)
        self.blobs.setdefault(repo, {})[digest] = data
        return digest

    def add_manifest(self, repo: str, body: bytes, tag: str | None = None, media_type: str = media.OCI_MANIFEST) -> str:
        digest = digest_of(body)
        by_reference = self.manifests.setdefault(repo, {})
        by_reference[digest] = (media_type, body)
        if tag is not None:
            by_reference[tag] = (media_type, body)
        return digest

    def add_image(self, repo: str, tag: str, *layers: bytes) -> str:
        """A manifest under ``tag`` and its layers; returns the manifest's digest."""
        for layer in layers:
            self.add_blob(repo, layer)
        return self.add_manifest(repo, image_manifest(*layers), tag)

    def count(self, method: str, path: str) -> int:
        return sum(1 for seen in self.requests if seen == (method, path))

    # -- serving ----------------------------------------------------------------------------------

    def render(self, request: Request) -> bytes | int:
        path = request.path.decode()
        self.requests.append((request.method.decode(), request.uri.decode()))
        if path in self.hanging:
            return NOT_DONE_YET
        if path in self.forced:
            forced = self.forced[path]
            return self._answer(request, forced.status, forced.body, forced.headers)
        if path == "/token":
            return self._token(request)
        if self.token and not self._authorized(request):
            scope = f"repository:{m.group('repo')}:pull" if (m := _PATH.fullmatch(path)) else "registry:catalog:*"
            challenge = f'Bearer realm="http://{self.host}/token",service="{self.host}",scope="{scope}"'
            return self._answer(request, 401, oci_error("UNAUTHORIZED"), {"WWW-Authenticate": challenge})
        if path == "/v2/":
            return self._answer(request, 200, b"{}", {"Content-Type": "application/json"})
        match = _PATH.fullmatch(path)
        if match is None:
            return self._answer(request, 404, oci_error("NOT_FOUND"))
        repo, kind, rest = match.group("repo", "kind", "rest")
        if repo not in self.manifests and repo not in self.blobs:
            return self._answer(request, 404, oci_error("NAME_UNKNOWN"))
        if kind == "manifests":
            found = self.manifests.get(repo, {}).get(rest)
            if found is None:
                return self._answer(request, 404, oci_error("MANIFEST_UNKNOWN"))
            media_type, body = found
            headers = {"Content-Type": media_type, "Docker-Content-Digest": digest_of(body)}
            return self._answer(request, 200, body, headers)
        if kind == "blobs":
            data = self.blobs.get(repo, {}).get(rest)
            if data is None:
                return self._answer(request, 404, oci_error("BLOB_UNKNOWN"))
            headers = {"Content-Type": "application/octet-stream", "Docker-Content-Digest": rest}
            return self._answer(request, 200, data, headers)
        tags = sorted(ref for ref in self.manifests.get(repo, {}) if not ref.startswith("sha256:"))
        return self._answer(request, 200, json.dumps({"name": repo, "tags": tags}).encode(),
                            {"Content-Type": "application/json"})

    def _authorized(self, request: Request) -> bool:
        authorization = (request.getHeader(b"authorization") or b"").decode()
        return authorization.startswith("Bearer ") and authorization.removeprefix("Bearer ") in self.issued

    def _token(self, request: Request) -> bytes:
        if self.credentials is not None:
            expected = "Basic " + base64.b64encode(":".join(self.credentials).encode()).decode()
            if (request.getHeader(b"authorization") or b"").decode() != expected:
                return self._answer(request, 401, oci_error("UNAUTHORIZED"), {"WWW-Authenticate": 'Basic realm="fake"'})
        self.issued.append(f"token-{len(self.issued) + 1}")
        return self._answer(request, 200, json.dumps({"token": self.issued[-1], "expires_in": 300}).encode(),
                            {"Content-Type": "application/json"})

    @staticmethod
    def _answer(request: Request, status: int, body: bytes, headers: dict[str, str] | None = None) -> bytes:
        request.setResponseCode(status)
        for name, value in (headers or {}).items():
            request.setHeader(name, value)
        if status >= 400 and "Content-Type" not in (headers or {}):
            request.setHeader("Content-Type", "application/json")
        return body  # twisted.web sets Content-Length, and leaves the body out of a HEAD answer


@dataclass
class Answer:
    status: int
    headers: dict[str, str]  # names lower-cased, several values joined with ", "
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def error(self) -> dict[str, Any]:
        """The OCI error body's only entry; it must be served as JSON."""
        assert self.headers.get("content-type") == "application/json", self.headers
        errors = self.json()["errors"]
        assert len(errors) == 1
        return errors[0]


def basic(username: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()}


class Pending:
    """A request sent, and its answer (or failure) once it has come."""

    def __init__(self, exchange: Deferred[Answer]) -> None:
        self.outcome: list[Answer | Failure] = []
        exchange.addBoth(self.outcome.append)


#: Rounds of pumping a request gets before it counts as unanswered (each moves every byte queued).
_ROUNDS = 50


class InMemoryRegistry:
    """metahub over StubTreq with fake upstreams; see the module docstring."""

    def __init__(self, root: Root, resource: RegistryResource, upstreams: dict[str, StubTreq]) -> None:
        self.root = root
        self.resource = resource
        self.reactor: FakeReactor = root.reactor
        # StubTreq sets treq's functions (request, get, ...) on itself at runtime: typed Any.
        self.http: Any = StubTreq(resource)
        self._upstream_http = upstreams

    def start(self, method: str, path: str, headers: dict[str, str] | None = None) -> Pending:
        """Send a request; its answer is there once :meth:`settle` has pumped enough."""
        sent = Headers({"Host": ["metahub.test"]})
        for name, value in (headers or {}).items():
            sent.setRawHeaders(name, [value])

        async def exchange() -> Answer:
            response = await self.http.request(method, "http://metahub.test" + path, headers=sent)
            body = await treq.content(response)
            collected = {name.decode().lower(): b", ".join(values).decode("latin-1")
                         for name, values in response.headers.getAllRawHeaders()}
            # Twisted's client keeps a GET answer's Content-Length to itself, as the response's
            # length (a HEAD answer's stays a header); treq's decoder leaves an empty encoding.
            if response.length is not UNKNOWN_LENGTH and method != "HEAD":
                collected["content-length"] = str(response.length)
            if collected.get("content-encoding") == "":
                del collected["content-encoding"]
            return Answer(response.code, collected, body)

        return Pending(Deferred.fromCoroutine(exchange()))

    def settle(self, pending: Pending) -> Answer | None:
        """Pump client and upstream connections until ``pending`` is answered (None if it is not)."""
        for _ in range(_ROUNDS):
            if pending.outcome:
                break
            for http in (self.http, *self._upstream_http.values()):
                http.flush()
            self.reactor.advance(0)
        if not pending.outcome:
            return None
        outcome = pending.outcome[0]
        if isinstance(outcome, Failure):
            outcome.raiseException()
        return outcome

    def request(self, method: str, path: str, headers: dict[str, str] | None = None) -> Answer:
        answer = self.settle(self.start(method, path, headers))
        assert answer is not None, f"{method} {path} got no answer"
        return answer

    def get(self, path: str, headers: dict[str, str] | None = None) -> Answer:
        return self.request("GET", path, headers)

    def head(self, path: str, headers: dict[str, str] | None = None) -> Answer:
        return self.request("HEAD", path, headers)

    def token(self, credentials: dict[str, str] | None = None) -> dict[str, str]:
        """An ``Authorization`` header with a token from metahub's ``/token`` (anonymous without
        ``credentials``), as clients get one after the challenge."""
        answer = self.get("/token?service=metahub", credentials)
        assert answer.status == 200, answer
        return {"Authorization": "Bearer " + answer.json()["token"]}

    def close(self) -> None:
        self.root.close()


def fake_network(
    monkeypatch: pytest.MonkeyPatch, module: ModuleType, fakes: dict[str, FakeRegistry]
) -> dict[str, StubTreq]:
    """Make ``module`` (one that builds upstream clients) reach each upstream's fake registry
    through a StubTreq, in place of the network; returns the StubTreqs by upstream name.

    This is the one seam: the real code calls ``make_http_clients`` for treq clients on the network.
    """
    stubs = {name: StubTreq(fake) for name, fake in fakes.items()}

    def http_clients(reactor: object, configs: list[UpstreamConfig]) -> dict[str, StubTreq]:
        return {upstream.name: stubs[upstream.name] for upstream in configs}

    monkeypatch.setattr(module, "make_http_clients", http_clients)
    return stubs


def in_memory_registry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fakes: dict[str, FakeRegistry], **config: Any
) -> InMemoryRegistry:
    """metahub configured with ``minimal`` plus ``config``, one upstream per entry of ``fakes``
    (``http://<its host>``), each served by its fake registry."""
    data = minimal(tmp_path) | {
        "upstreams": {name: {"url": f"http://{fake.host}"} for name, fake in fakes.items()},
        "default_upstream": next(iter(fakes)),
    } | config
    stubs = fake_network(monkeypatch, root_module, fakes)
    root = Root(config=parse_config(data, str(tmp_path)), reactor=FakeReactor(), listen="tcp:0")
    inline_threads(root)
    return InMemoryRegistry(root, root.resource, stubs)
