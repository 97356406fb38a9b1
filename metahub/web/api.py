"""The registry's HTTP face: routes ``/v2/...`` to handlers and turns errors into OCI error bodies.

One small adapter (:meth:`RegistryResource.render`) bridges ``twisted.web`` to ``async def``
handlers: it starts the coroutine, returns ``NOT_DONE_YET``, and makes sure that whatever the handler
raises becomes a proper response, never a hung connection or a 500 with a traceback for bad input.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

from twisted.internet.defer import ensureDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from metahub.cache.manifests import Manifests
from metahub.cache.routing import Route, route, spellings
from metahub.cache.virtual import VirtualImages
from metahub.config.file import Config
from metahub.hardware import inspect
from metahub.hardware.machine import MachineType
from metahub.oci import errors, media
from metahub.oci.grammar import split_reference
from metahub.oci.names import check_digest, check_name, check_reference, is_tag
from metahub.runtime.metrics import Metrics, method_label, status_label
from metahub.runtime.threads import ThreadRunner
from metahub.upstream.upstreams import Upstreams
from metahub.web import login
from metahub.web.addresses import require_allowed
from metahub.web.auth import Authenticator, Identity
from metahub.web.blobs import Blobs
from metahub.web.connection import abort
from metahub.web.headers import API_VERSION, check_host
from metahub.web.status import PullCounts, StatusPage

log = Logger()

# ``rest`` may hold anything (``sha256:../x``): it is checked as a reference, so a malformed one is
# a DIGEST_INVALID or MANIFEST_UNKNOWN rather than an unknown endpoint.
_ROUTE = re.compile(r"/v2/(?P<name>.+)/(?P<kind>manifests|blobs|tags)/(?P<rest>.+)")
_READ_METHODS = (b"GET", b"HEAD")
#: ``n`` of a tags list: ASCII digits only (str.isdigit() also takes "²", which int() refuses),
#: and few enough that int() is cheap and the number fits an upstream's integer.
_PAGE_SIZE_DIGITS = 9
_PAGE_SIZE = re.compile(f"[0-9]{{1,{_PAGE_SIZE_DIGITS}}}")


@dataclass(kw_only=True)
class Registry:
    """Everything a request handler needs, built once per server by the composition root (metahub.app.root)."""

    config: Config
    upstreams: Upstreams
    manifests: Manifests
    blobs: Blobs
    metrics: Metrics
    auth: Authenticator
    in_thread: ThreadRunner  # for the logins' KDF: its own small pool (threads.BoundedPool)
    virtual: VirtualImages
    pulls: PullCounts = field(default_factory=PullCounts)
    status: StatusPage | None = None  # the page at / (wired by the service)


def _query(request: Request) -> dict[str, str]:
    if b"?" not in request.uri:  # most requests: no parsing of a query they don't have
        return {}
    query = parse_qs(urlsplit(request.uri.decode("latin-1")).query, keep_blank_values=True)
    return {key: values[-1] for key, values in query.items()}


def _route_label(kind: str | None, path: str) -> str:
    if kind:
        return kind
    known = {"/v2/": "ping", "/v2": "ping", "/metrics": "metrics", "/token": "token", "/_metahub/v1/resolve": "resolve"}
    return known.get(path, "other")


class RegistryResource(Resource):
    isLeaf = True

    def __init__(self, registry: Registry) -> None:
        super().__init__()
        self.registry = registry

    def render(self, request: Request) -> int:
        request.setHeader(*API_VERSION)
        # twisted.web has no public "the client went away" flag (Request keeps a private one);
        # notifyFinish() errbacks when the connection is lost before finish(), so record that here.
        # Registered first, it fires before any errback that could make the handler fail.
        lost: list[Failure] = []
        request.notifyFinish().addErrback(lost.append)
        done = ensureDeferred(self._dispatch(request))
        done.addErrback(self._failed, request, lost)
        return NOT_DONE_YET

    async def _dispatch(self, request: Request) -> None:
        path = request.path.decode("latin-1")
        match = _ROUTE.fullmatch(path)
        kind = match.group("kind") if match else None
        request.notifyFinish().addBoth(
            lambda _: self.registry.metrics.count_request(
                _route_label(kind, path), method_label(request.method), status_label(request.code)
            )
        )
        check_host(request)
        registry = self.registry
        if path in ("/", "/_metahub/") and registry.status is not None:
            return await registry.status.serve(request, self.resolve)
        if path == "/token":
            return self._json(request, 200, await login.token(request, registry.auth, registry.in_thread))
        # Everything else is read-only: GET, and HEAD answering exactly what GET would.
        self._require_read(request)
        if path in ("/v2/", "/v2"):
            await login.identify(request, registry.auth, registry.in_thread)
            return self._json(request, 200, b"{}")
        if path == "/_metahub/v1/resolve":
            return await self._resolve_query(request)
        if path == "/metrics":
            require_allowed(request, registry.config.metrics.allow, "/metrics")
            body = self.registry.metrics.render()
            request.setHeader("Content-Type", "text/plain; version=0.0.4")
            request.setHeader("Content-Length", str(len(body)))
            if request.method != b"HEAD":
                request.write(body)
            request.finish()
            return
        if match is None:
            raise errors.RegistryError(404, "NOT_FOUND", "no such endpoint", {"path": path[:200]})
        identity = await login.identify(request, registry.auth, registry.in_thread)
        name = check_name(match.group("name"))
        rest = match.group("rest")
        query = _query(request)
        target = route(registry.config, name, query.get("ns"))
        # Against where the request really goes: ?ns= and a prefix both pick the upstream.
        registry.auth.check_repository(identity, spellings(registry.config, target))
        head = request.method == b"HEAD"
        if kind == "manifests":
            machine_type = registry.auth.machine_type(identity)
            await self._manifest(request, name, target, check_reference(rest), machine_type, head)
        elif kind == "blobs":
            digest = check_digest(rest)
            source = await registry.virtual.route_of(registry.manifests, target, digest)
            await registry.blobs.serve(request, source, digest, head)
        elif rest == "list":
            await self._tags(request, name, target, query)
        else:
            raise errors.RegistryError(404, "NOT_FOUND", "no such endpoint", {"path": path[:200]})

    def _require_read(self, request: Request) -> None:
        if request.method not in _READ_METHODS:
            raise errors.unsupported(request.method.decode("latin-1")[:20])

    async def _manifest(
        self, request: Request, name: str, target: Route, reference: str, machine_type: MachineType | None, head: bool
    ) -> None:
        manifest = await self.registry.virtual.manifest(self.registry.manifests, target, reference)
        if machine_type is not None and is_tag(reference) and manifest.media_type in media.INDEX_TYPES:
            # The login's machine type picks one build; a pull by digest is never rewritten.
            manifest = await self.registry.manifests.for_machine_type(target, manifest, machine_type, f"{name}:{reference}")
        accepted = media.parse_accept([v.decode("latin-1") for v in request.requestHeaders.getRawHeaders(b"accept", [])])
        if not media.acceptable(manifest.media_type, accepted):
            raise errors.manifest_unknown(
                reference,
                f"manifest is {manifest.media_type}, which the request's Accept header does not list",
                {"reference": reference, "media_type": manifest.media_type},
            )
        request.setResponseCode(200)
        request.setHeader("Content-Type", manifest.media_type)
        request.setHeader("Docker-Content-Digest", manifest.digest)
        request.setHeader("Content-Length", str(len(manifest.body)))
        if not head:
            request.write(manifest.body)
            if manifest.media_type not in media.INDEX_TYPES:  # each platform's pull ends with one of these
                self.registry.pulls.add(target.key)
        request.finish()

    async def _resolve_query(self, request: Request) -> None:
        """``?image=NAME[:TAG]``: the builds it offers and what each machine type gets, as JSON."""
        registry = self.registry
        identity = await login.identify(request, registry.auth, registry.in_thread)
        if identity.anonymous and registry.auth.enabled:
            raise errors.unauthorized("log in to query resolutions", login.challenge(request))
        result = await self.resolve(identity, _query(request).get("image", ""))
        self._json(request, 200, json.dumps(result).encode())

    async def resolve(self, identity: Identity, image: str) -> dict[str, Any]:
        """The resolve report for ``NAME[:TAG]`` as ``identity`` may see it (JSON API and status page)."""
        registry = self.registry
        try:
            name, reference = split_reference(image)
        except ValueError as error:
            raise errors.name_invalid(image[:200], str(error)) from None
        target = route(registry.config, name)
        registry.auth.check_repository(identity, spellings(registry.config, target))
        manifest = await registry.virtual.manifest(registry.manifests, target, reference)
        return inspect.report(image, manifest.body, manifest.media_type, manifest.digest, registry.config)

    async def _tags(self, request: Request, name: str, target: Route, query: dict[str, str]) -> None:
        n_text, last = query.get("n"), query.get("last")
        if n_text is not None and not _PAGE_SIZE.fullmatch(n_text):
            raise errors.RegistryError(
                400, "PAGINATION_NUMBER_INVALID", f"n must be a whole number of at most {_PAGE_SIZE_DIGITS} digits",
                {"n": n_text[:50]},
            )
        n = int(n_text) if n_text is not None else None
        body, link = await self.registry.upstreams.client(target.upstream.name).tags_list(target.repository, n, last)
        tags = media.load(body).get("tags") or []
        # Upstreams that ignore n/last (distribution 2.8 does) return everything, in any order:
        # the spec's pagination is applied here, over the lexically sorted list.
        tags = sorted(tag for tag in tags if isinstance(tag, str) and (last is None or tag > last))
        if n is not None and len(tags) > n:
            tags = tags[:n]
            link = f'</v2/{name}/tags/list?{urlencode({"n": n, "last": tags[-1]})}>; rel="next"' if tags else None
        elif link:
            # Upstream paginated itself, linking to its own name for the repository.
            link = link.replace(f"/v2/{target.repository}/tags/list", f"/v2/{name}/tags/list", 1)
        if link:
            request.setHeader("Link", link)
        self._json(request, 200, json.dumps({"name": name, "tags": tags}).encode())

    def _json(self, request: Request, status: int, body: bytes) -> None:
        request.setResponseCode(status)
        request.setHeader("Content-Type", "application/json")
        request.setHeader("Content-Length", str(len(body)))
        if request.method != b"HEAD":
            request.write(body)
        request.finish()

    def _failed(self, failure: Failure, request: Request, lost: list[Failure]) -> None:
        if request.finished or lost:
            return
        if isinstance(failure.value, errors.RegistryError):
            error = failure.value
        else:
            log.failure("unhandled error serving {method} {path}", failure, method=request.method, path=request.path)
            error = errors.RegistryError(500, "UNKNOWN", "internal error")
        if request.startedWriting:
            # Headers (and maybe bytes) are out: the only honest signal left is a broken connection.
            abort(request)
            return
        # Headers of the success that was being prepared go; the error's own (a 416's
        # ``Content-Range: bytes */size``) are set after, so they stay.
        request.responseHeaders.removeHeader("Docker-Content-Digest")
        request.responseHeaders.removeHeader("Content-Range")
        for header, value in error.headers.items():
            request.setHeader(header, value)
        self._json(request, error.status, error.body())
