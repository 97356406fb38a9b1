"""Every upstream's client by name, counting the upstream metrics where the requests are made.

Callers ask :class:`Upstreams` for an upstream's client and use it like an
:class:`~metahub.upstream.client.UpstreamClient`; each request is counted in
``metahub_upstream_fetches{upstream,kind}``, and one the upstream could not answer (a 5xx of
its own, unreachable, timed out, rate limited: :func:`unavailable`) in
``metahub_upstream_failures{upstream}``. A refusal (404, 401, 403) is an answer, not a failure.
"""
from __future__ import annotations

from collections.abc import Awaitable, Mapping
from typing import TypeVar

from twisted.web.iweb import IResponse

from metahub.oci.errors import RegistryError
from metahub.oci.media import Manifest
from metahub.runtime.metrics import Metrics
from metahub.upstream.client import ManifestHead, UpstreamClient

T = TypeVar("T")


def unavailable(error: RegistryError) -> bool:
    """Upstream could not answer (as opposed to answering "no")."""
    return error.status >= 500 or error.status == 429


class CountedClient:
    """One upstream's client, counting each request it makes and each the upstream failed."""

    #: The metric's ``kind`` for each request.
    KINDS = ("manifest", "head", "blob", "tags")

    def __init__(self, *, name: str, client: UpstreamClient, metrics: Metrics) -> None:
        self.name = name
        self._client = client
        # Bound once: a label lookup per request would take a lock and hash the labels each time.
        self._fetches = {kind: metrics.upstream_fetches.labels(name, kind) for kind in self.KINDS}
        self._failures = metrics.upstream_failures.labels(name)
        self._bytes = metrics.upstream_bytes.labels(name)

    @property
    def last_success(self) -> float | None:
        return self._client.last_success

    @property
    def last_error(self) -> tuple[float, str] | None:
        return self._client.last_error

    async def _counted(self, kind: str, request: Awaitable[T]) -> T:
        self._fetches[kind].inc()
        try:
            return await request
        except RegistryError as error:
            if unavailable(error):
                self._failures.inc()
            raise

    async def get_manifest(self, repo: str, reference: str, accept: list[str]) -> Manifest:
        return await self._counted("manifest", self._client.get_manifest(repo, reference, accept))

    async def head_manifest(self, repo: str, reference: str, accept: list[str]) -> ManifestHead:
        return await self._counted("head", self._client.head_manifest(repo, reference, accept))

    async def head_blob(self, repo: str, digest: str) -> int | None:
        return await self._counted("head", self._client.head_blob(repo, digest))

    async def get_blob(self, repo: str, digest: str) -> IResponse:
        """The response once its headers are in; the caller reads the body (see :meth:`received`)."""
        return await self._counted("blob", self._client.get_blob(repo, digest))

    async def tags_list(self, repo: str, n: int | None = None, last: str | None = None) -> tuple[bytes, str | None]:
        return await self._counted("tags", self._client.tags_list(repo, n, last))

    def received(self, size: int) -> None:
        """A blob body of ``size`` bytes came in (whole or not)."""
        self._bytes.inc(size)

    def body_failed(self) -> None:
        """A blob body broke off or stalled after its headers: the request failed all the same."""
        self._failures.inc()


class Upstreams:
    """The configured upstreams' clients, by upstream name (a route's ``upstream.name``)."""

    def __init__(self, *, clients: Mapping[str, UpstreamClient], metrics: Metrics) -> None:
        self._clients = {name: CountedClient(name=name, client=client, metrics=metrics)
                         for name, client in clients.items()}

    def client(self, name: str) -> CountedClient:
        return self._clients[name]
