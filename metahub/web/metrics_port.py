"""``metrics.listen``: an endpoint of its own that serves ``/metrics`` and nothing else.

Operators bind it where only their monitoring reaches (an internal interface, a UNIX socket), so
scraping needs no allow-list and the registry's port need not serve metrics at all.
"""
from __future__ import annotations

from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from metahub.oci import errors
from metahub.runtime.metrics import Metrics


class MetricsResource(Resource):
    isLeaf = True

    def __init__(self, metrics: Metrics) -> None:
        super().__init__()
        self.metrics = metrics

    def render(self, request: Request) -> bytes:
        if request.path != b"/metrics":
            return self._error(request, errors.RegistryError(404, "NOT_FOUND", "only /metrics is served here"))
        if request.method not in (b"GET", b"HEAD"):  # twisted.web drops the body of a HEAD
            return self._error(request, errors.RegistryError(405, "UNSUPPORTED", "/metrics is read with GET"))
        request.setHeader("Content-Type", "text/plain; version=0.0.4")
        return self.metrics.render()

    @staticmethod
    def _error(request: Request, error: errors.RegistryError) -> bytes:
        request.setResponseCode(error.status)
        request.setHeader("Content-Type", "application/json")
        return error.body()


def metrics_site(metrics: Metrics) -> Site:
    site = Site(MetricsResource(metrics))
    site.displayTracebacks = False
    return site
