"""Upstreams counts every upstream request, and those the upstream could not answer, by itself."""
from __future__ import annotations

from typing import Any

import pytest
from treq.testing import StubTreq
from twisted.internet.defer import ensureDeferred, fail
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource

from metahub.config.file import UpstreamConfig
from metahub.oci.errors import RegistryError
from metahub.runtime.metrics import Metrics
from metahub.upstream.client import UpstreamClient
from metahub.upstream.upstreams import Upstreams

DIGEST = "sha256:" + "a" * 64
BODY = b'{"schemaVersion": 2}'

_check = SynchronousTestCase()  # for successResultOf / failureResultOf


class _Upstream(Resource):
    """The repository names the answer: ``ok`` has everything, ``gone`` nothing, ``busy`` is rate
    limited, ``broken`` fails."""

    isLeaf = True

    def render(self, request) -> bytes:
        repository = request.path.decode().split("/")[2]
        request.setResponseCode({"ok": 200, "gone": 404, "busy": 429}.get(repository, 500))
        if repository == "ok" and b"/tags/" in request.path:
            return b'{"name": "ok", "tags": ["1"]}'
        if repository == "ok" and b"/manifests/" in request.path:
            request.setHeader("Content-Type", "application/vnd.oci.image.manifest.v1+json")
            return BODY
        request.setHeader("Content-Length", "0")
        return b""


class _Unreachable:
    def request(self, method: str, url: str, **kwargs: Any):
        return fail(ConnectionRefusedError())


def make(http: Any = None) -> tuple[Upstreams, Metrics]:
    metrics = Metrics()
    client = UpstreamClient(config=UpstreamConfig("local", "http://upstream.test"),
                            http=http or StubTreq(_Upstream()), clock=Clock())
    return Upstreams(clients={"local": client}, metrics=metrics), metrics


def count(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, {"upstream": "local", **labels}) or 0


def test_each_request_is_counted_by_its_kind() -> None:
    upstreams, metrics = make()
    client = upstreams.client("local")
    assert _check.successResultOf(ensureDeferred(client.get_manifest("ok", "1", ["*/*"]))).body == BODY
    _check.successResultOf(ensureDeferred(client.head_blob("ok", DIGEST)))
    _check.successResultOf(ensureDeferred(client.get_blob("ok", DIGEST)))
    _check.successResultOf(ensureDeferred(client.tags_list("ok")))
    kinds = {kind: count(metrics, "metahub_upstream_fetches_total", kind=kind)
             for kind in ("manifest", "head", "blob", "tags")}
    assert kinds == {"manifest": 1, "head": 1, "blob": 1, "tags": 1}
    assert count(metrics, "metahub_upstream_failures_total") == 0


@pytest.mark.parametrize("repository, failed", [("gone", 0), ("busy", 1), ("broken", 1)])
def test_a_failure_is_an_upstream_that_could_not_answer_not_one_that_said_no(repository: str, failed: int) -> None:
    upstreams, metrics = make()
    _check.failureResultOf(ensureDeferred(upstreams.client("local").get_blob(repository, DIGEST)), RegistryError)
    assert count(metrics, "metahub_upstream_fetches_total", kind="blob") == 1
    assert count(metrics, "metahub_upstream_failures_total") == failed


def test_an_unreachable_upstream_is_a_failure_and_the_client_remembers_it() -> None:
    upstreams, metrics = make(_Unreachable())
    client = upstreams.client("local")
    _check.failureResultOf(ensureDeferred(client.head_blob("ok", DIGEST)), RegistryError)
    assert count(metrics, "metahub_upstream_failures_total") == 1
    assert client.last_success is None and client.last_error is not None and "unreachable" in client.last_error[1]


def test_bodies_and_their_failures_are_counted_when_the_caller_reads_them() -> None:
    upstreams, metrics = make()
    client = upstreams.client("local")
    client.received(1000)
    client.body_failed()
    assert count(metrics, "metahub_upstream_bytes_total") == 1000
    assert count(metrics, "metahub_upstream_failures_total") == 1
