"""BlobCache: what a blob request is answered with (the store, a download to follow, upstream when
the store cannot take it), without HTTP: the answers are values, checked here on fake upstreams."""
from __future__ import annotations

import errno
import os
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest
from twisted.internet.defer import Deferred, ensureDeferred, fail, succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone

from metahub.cache.blobs import BlobCache, Bypass, Committed, Following
from metahub.cache.downloads import Downloads
from metahub.cache.routing import Route
from metahub.config.file import UpstreamConfig
from metahub.oci import errors
from metahub.runtime.metrics import Metrics
from metahub.upstream.upstreams import Upstreams
from storage import FollowState, Leases, Storage, sha256_digest
from tests.unit.fakes import InlineLane, blob_cache, commit_blob, inline, store_capacity

UPSTREAM = UpstreamConfig("local", "http://127.0.0.1:1", read_timeout=30.0)
ROUTE = Route(UPSTREAM, "team/app")
OTHER = Route(UPSTREAM, "team/other")
DATA = os.urandom(3000)
DIGEST = sha256_digest(DATA)

T = TypeVar("T")


class Transport:
    def __init__(self) -> None:
        self.stopped = False

    def stopProducing(self) -> None:  # noqa: N802
        self.stopped = True


class Response:
    """An upstream blob response whose body the test writes into ``protocol``."""

    def __init__(self, length: int) -> None:
        self.length = length
        self.protocol: Any = None
        self.transport = Transport()

    def deliverBody(self, protocol: Any) -> None:  # noqa: N802
        self.protocol = protocol
        protocol.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)
        self.protocol.connectionLost(Failure(ResponseDone()))


class Registry:
    """An upstream holding ``DATA`` in the repositories named: HEAD answers at once, a GET once the
    test calls :meth:`answer`."""

    def __init__(self, *repositories: str) -> None:
        self.repositories = set(repositories)
        self.heads: list[str] = []
        self.gets: list[Deferred[Response]] = []

    def head_blob(self, repository: str, digest: str) -> Deferred[int]:
        self.heads.append(repository)
        if repository in self.repositories and digest == DIGEST:
            return succeed(len(DATA))
        return fail(errors.blob_unknown(digest))

    def get_blob(self, repository: str, digest: str) -> Deferred[Response]:
        self.gets.append(Deferred())
        return self.gets[-1]

    def answer(self) -> Response:
        response = Response(len(DATA))
        self.gets[-1].callback(response)
        return response


class Node:
    def __init__(self, tmp_path: Any, registry: Registry) -> None:
        self.clock = Clock()
        self.metrics = Metrics()
        self.storage = Storage(str(tmp_path / "store"), str(tmp_path / "index"), clock=self.clock.seconds)
        upstreams = Upstreams(clients={"local": registry}, metrics=self.metrics)  # type: ignore[dict-item]
        self.downloads = Downloads(
            storage=self.storage, upstreams=upstreams, clock=self.clock, in_thread=inline, index_writes=inline,
            metrics=self.metrics,
            leases=Leases(str(tmp_path / "store"), clock=self.clock.seconds, node=None),
            lanes=lambda _: InlineLane(), capacity=store_capacity(self.clock, self.metrics),
        )
        self.cache: BlobCache = blob_cache(storage=self.storage, upstreams=upstreams, downloads=self.downloads,
                                           clock=self.clock, metrics=self.metrics)

    def sample(self, name: str, **labels: str) -> float | None:
        return self.metrics.registry.get_sample_value(name, labels)

    def store(self, *routes: Route) -> None:
        commit_blob(self.storage.blobs, DATA)
        self.storage.index.link([DIGEST], *(route.key for route in routes))


def now(coroutine: Coroutine[Any, Any, T]) -> T:
    """The coroutine's result, which the fakes give at once (raised if it failed)."""
    done = ensureDeferred(coroutine)
    outcome: list[Any] = []
    done.addBoth(outcome.append)
    assert outcome, "still waiting"
    if isinstance(outcome[0], Failure):
        outcome[0].raiseException()
    return outcome[0]  # type: ignore[no-any-return]


def read_all(committed: Committed) -> bytes:
    try:
        return committed.reader.read(committed.size + 1)
    finally:
        committed.reader.close()


def whole(size: int) -> bool:
    return False


def test_a_stored_blob_its_repository_is_linked_to_is_answered_open_without_asking_upstream(tmp_path) -> None:
    registry = Registry()
    node = Node(tmp_path, registry)
    node.store(ROUTE)
    node.clock.advance(500)
    committed = now(node.cache.cached(ROUTE, DIGEST))
    assert committed is not None and committed.size == len(DATA) and read_all(committed) == DATA
    assert registry.heads == [] and registry.gets == []
    assert node.sample("metahub_cache_lookups_total", kind="blob", result="hit") == 1
    record = node.storage.index.get_blob(DIGEST)  # adopted from the file into the index, access recorded
    assert record is not None and record.size == len(DATA)


def test_a_blob_another_repository_fetched_is_answered_only_once_upstream_confirms_it(tmp_path) -> None:
    registry = Registry("team/app")
    node = Node(tmp_path, registry)
    node.store(OTHER)
    with pytest.raises(errors.RegistryError) as refused:  # upstream: team/elsewhere has no such blob
        now(node.cache.cached(Route(UPSTREAM, "team/elsewhere"), DIGEST))
    assert refused.value.status == 404
    assert not node.storage.index.is_linked(DIGEST, Route(UPSTREAM, "team/elsewhere").key)
    committed = now(node.cache.cached(ROUTE, DIGEST))
    assert committed is not None and read_all(committed) == DATA
    assert registry.heads == ["team/elsewhere", "team/app"] and node.storage.index.is_linked(DIGEST, ROUTE.key)


def test_a_blob_not_stored_is_a_counted_miss(tmp_path) -> None:
    node = Node(tmp_path, Registry("team/app"))
    assert now(node.cache.cached(ROUTE, DIGEST)) is None
    assert node.sample("metahub_cache_lookups_total", kind="blob", result="miss") == 1
    assert node.sample("metahub_cache_lookups_total", kind="blob", result="hit") is None


def test_a_blob_the_index_names_but_whose_file_is_gone_is_a_miss_and_forgotten(tmp_path) -> None:
    node = Node(tmp_path, Registry("team/app"))
    node.store(ROUTE)
    node.storage.index.put_blob(DIGEST, len(DATA), 0.0)
    node.storage.blobs.remove(DIGEST)  # evicted by another node: this node's index still names it
    assert now(node.cache.cached(ROUTE, DIGEST)) is None
    assert node.storage.index.get_blob(DIGEST) is None


def test_a_cold_blob_is_answered_with_its_download_to_follow(tmp_path) -> None:
    registry = Registry("team/app")
    node = Node(tmp_path, registry)
    fetched = ensureDeferred(node.cache.fetch(ROUTE, DIGEST, whole))
    assert not fetched.called  # upstream has not answered yet
    response = registry.answer()
    following = fetched.result
    assert isinstance(following, Following) and following.size == len(DATA)
    follower = following.follower
    assert follower.read(len(DATA)) == b"" and follower.state is FollowState.WRITING  # nothing has landed
    response.send(DATA)
    read = b""
    while chunk := follower.read(len(DATA)):
        read += chunk
    assert read == DATA and follower.state is FollowState.COMMITTED
    assert len(registry.gets) == 1 and node.storage.blobs.stat(DIGEST) is not None


def test_a_partial_range_of_a_cold_blob_is_answered_from_the_store_once_verified(tmp_path) -> None:
    registry = Registry("team/app")
    node = Node(tmp_path, registry)
    asked: list[int] = []

    def partial(size: int) -> bool:
        asked.append(size)
        return True

    fetched = ensureDeferred(node.cache.fetch(ROUTE, DIGEST, partial))
    response = registry.answer()
    response.protocol.dataReceived(DATA[:-1])
    assert not fetched.called and asked == [len(DATA)]  # never from the download under way
    response.send(DATA[-1:])
    committed = fetched.result
    assert isinstance(committed, Committed) and read_all(committed) == DATA


def test_wrong_bytes_for_a_partial_range_are_a_bad_gateway_not_a_second_fetch(tmp_path) -> None:
    registry = Registry("team/app")
    node = Node(tmp_path, registry)
    fetched = ensureDeferred(node.cache.fetch(ROUTE, DIGEST, lambda size: True))
    registry.answer().send(os.urandom(len(DATA)))
    failure = fetched.result
    assert isinstance(failure, Failure) and failure.check(errors.RegistryError)
    assert failure.value.status == 502 and len(registry.gets) == 1  # this route's own fetch failed
    assert node.storage.blobs.stat(DIGEST) is None


def test_a_follower_of_this_nodes_failed_fetch_has_no_successor(tmp_path) -> None:
    registry = Registry("team/app")
    node = Node(tmp_path, registry)
    fetched = ensureDeferred(node.cache.fetch(ROUTE, DIGEST, whole))
    response = registry.answer()
    following = fetched.result
    assert isinstance(following, Following)
    response.send(os.urandom(len(DATA)))  # upstream's fault: the client is told, not carried on
    assert now(_awaited(following.resume(following.follower))) is None
    assert len(registry.gets) == 1


def test_a_store_that_cannot_take_files_answers_upstreams_response_to_relay(tmp_path) -> None:
    registry = Registry("team/app")
    node = Node(tmp_path, registry)
    node.downloads.capacity.failed(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), "a blob")
    fetched = ensureDeferred(node.cache.fetch(ROUTE, DIGEST, whole))
    response = registry.answer()
    bypass = fetched.result
    assert isinstance(bypass, Bypass) and bypass.response is response
    assert bypass.size == len(DATA) and bypass.read_timeout == UPSTREAM.read_timeout
    assert node.sample("metahub_store_bypassed_total", kind="blob") == 1
    bypass.received(len(DATA))  # the caller reports what it relayed: counted as upstream bytes
    assert node.sample("metahub_upstream_bytes_total", upstream="local") == len(DATA)
    assert os.listdir(node.storage.blobs.tmp_dir) == [] and node.storage.blobs.stat(DIGEST) is None


def test_a_blob_committed_since_the_miss_is_answered_from_the_store_once_confirmed(tmp_path) -> None:
    registry = Registry("team/app")
    node = Node(tmp_path, registry)
    node.store(OTHER)  # another node committed it, fetched through team/other
    committed = now(node.cache.fetch(ROUTE, DIGEST, whole))
    assert isinstance(committed, Committed) and read_all(committed) == DATA
    assert registry.heads == ["team/app"] and registry.gets == []


async def _awaited(result: Deferred[T]) -> T:
    return await result
