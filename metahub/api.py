"""The registry's HTTP face: routes ``/v2/...`` to handlers and turns errors into OCI error bodies.

One small adapter (:meth:`RegistryResource.render`) bridges ``twisted.web`` to ``async def``
handlers: it starts the coroutine, returns ``NOT_DONE_YET``, and makes sure that whatever the handler
raises becomes a proper response, never a hung connection or a 500 with a traceback for bad input.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from urllib.parse import parse_qs, urlencode, urlsplit

from twisted.internet.defer import ensureDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from . import errors, media
from .blobs import Blobs
from .config import Config
from .manifests import Manifests
from .metrics import Metrics
from .names import Route, check_digest, check_name, check_reference, route
from .upstream import UpstreamClient

log = Logger()

API_VERSION = ("Docker-Distribution-API-Version", "registry/2.0")
# ``rest`` may hold anything (``sha256:../x``): it is checked as a reference, so a malformed one is
# a DIGEST_INVALID or MANIFEST_UNKNOWN rather than an unknown endpoint.
_ROUTE = re.compile(r"/v2/(?P<name>.+)/(?P<kind>manifests|blobs|tags)/(?P<rest>.+)")
_READ_METHODS = (b"GET", b"HEAD")


@dataclass
class Registry:
    """Everything a request handler needs, built once per server in ``startService``."""

    config: Config
    clients: dict[str, UpstreamClient]
    manifests: Manifests
    blobs: Blobs
    metrics: Metrics


def _query(request: Request) -> dict[str, str]:
    query = parse_qs(urlsplit(request.uri.decode("latin-1")).query, keep_blank_values=True)
    return {key: values[-1] for key, values in query.items()}


def _route_label(kind: str | None, path: str) -> str:
    if kind:
        return kind
    return {"/v2/": "ping", "/v2": "ping", "/metrics": "metrics"}.get(path, "other")


class RegistryResource(Resource):
    isLeaf = True

    def __init__(self, registry: Registry) -> None:
        super().__init__()
        self.registry = registry

    def render(self, request: Request) -> int:
        request.setHeader(*API_VERSION)
        done = ensureDeferred(self._dispatch(request))
        done.addErrback(self._failed, request)
        return NOT_DONE_YET

    async def _dispatch(self, request: Request) -> None:
        path = request.path.decode("latin-1")
        match = _ROUTE.fullmatch(path)
        kind = match.group("kind") if match else None
        request.notifyFinish().addBoth(
            lambda _: self.registry.metrics.requests.labels(
                _route_label(kind, path), request.method.decode("latin-1"), str(request.code)
            ).inc()
        )
        if path in ("/v2/", "/v2"):
            self._require_read(request)
            return self._json(request, 200, b"{}")
        if path == "/metrics" and request.method == b"GET":
            request.setHeader("Content-Type", "text/plain; version=0.0.4")
            request.write(self.registry.metrics.render())
            request.finish()
            return
        if match is None:
            if path.startswith("/v2/") and request.method not in _READ_METHODS:
                raise errors.unsupported(request.method.decode("latin-1"))
            raise errors.RegistryError(404, "NOT_FOUND", "no such endpoint", {"path": path[:200]})
        self._require_read(request)
        name = check_name(match.group("name"))
        rest = match.group("rest")
        query = _query(request)
        target = route(self.registry.config, name, query.get("ns"))
        head = request.method == b"HEAD"
        if kind == "manifests":
            await self._manifest(request, target, check_reference(rest), head)
        elif kind == "blobs":
            await self.registry.blobs.serve(request, target, check_digest(rest), head)
        elif rest == "list":
            await self._tags(request, name, target, query)
        else:
            raise errors.RegistryError(404, "NOT_FOUND", "no such endpoint", {"path": path[:200]})

    def _require_read(self, request: Request) -> None:
        if request.method not in _READ_METHODS:
            raise errors.unsupported(request.method.decode("latin-1"))

    async def _manifest(self, request: Request, target: Route, reference: str, head: bool) -> None:
        manifest = await self.registry.manifests.get(target, reference)
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
        request.finish()

    async def _tags(self, request: Request, name: str, target: Route, query: dict[str, str]) -> None:
        n_text, last = query.get("n"), query.get("last")
        if n_text is not None and not n_text.isdigit():
            raise errors.RegistryError(400, "PAGINATION_NUMBER_INVALID", "n must be a non-negative integer", {"n": n_text[:50]})
        n = int(n_text) if n_text is not None else None
        client = self.registry.clients[target.upstream.name]
        self.registry.metrics.upstream_fetches.labels(target.upstream.name, "tags").inc()
        body, link = await client.tags_list(target.repository, n, last)
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

    def _failed(self, failure: Failure, request: Request) -> None:
        if request.finished or request._disconnected:
            return
        if failure.check(errors.RegistryError):
            error: errors.RegistryError = failure.value
        else:
            log.failure("unhandled error serving {method} {path}", failure, method=request.method, path=request.path)
            error = errors.RegistryError(500, "UNKNOWN", "internal error")
        if request.startedWriting:
            # Headers (and maybe bytes) are out: the only honest signal left is a broken connection.
            request.transport.abortConnection()
            return
        for header, value in error.headers.items():
            request.setHeader(header, value)
        request.responseHeaders.removeHeader("Docker-Content-Digest")
        request.responseHeaders.removeHeader("Content-Range")
        self._json(request, error.status, error.body())
