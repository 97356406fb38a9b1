"""Single flight on a fake clock and a fake upstream: one fetch, verified, never stuck."""
from __future__ import annotations

import errno
import os
from collections.abc import Callable
from typing import Any

import pytest
from twisted.internet.defer import Deferred, ensureDeferred, fail, succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss

from metahub.cache.blobs import _follow, wait_for_more
from metahub.cache.capacity import StoreCapacity
from metahub.cache.downloads import QUEUED_LIMIT, AlreadyStored, Download, Downloads
from metahub.cache.routing import Route
from metahub.config.file import UpstreamConfig
from metahub.oci import errors
from metahub.runtime.metrics import Metrics
from metahub.runtime.threads import ThreadRunner
from metahub.upstream.upstreams import Upstreams
from metahub.web.streaming import send
from storage import Leases, Storage, parse_digest, sha256_digest
from storage import blobstore as storage_blobstore
from storage import files as storage_files
from storage import lease as storage_lease
from tests.unit.fakes import (
    FakeRequest,
    InlineLane,
    blob_endpoint,
    inline,
    join_now,
    store_capacity,
)

UPSTREAM = UpstreamConfig("local", "http://127.0.0.1:1", read_timeout=30.0)
ROUTE = Route(UPSTREAM, "team/app")


class FakeTransport:
    def __init__(self) -> None:
        self.stopped = False

    def stopProducing(self) -> None:
        self.stopped = True


class FakeResponse:
    def __init__(self, length: int, fail_on_deliver: bool = False) -> None:
        self.length = length
        self.protocol = None
        self.transport = FakeTransport()
        self.fail_on_deliver = fail_on_deliver

    def deliverBody(self, protocol) -> None:
        self.protocol = protocol
        protocol.makeConnection(self.transport)
        if self.fail_on_deliver:
            raise RuntimeError("boom")


class FakeClient:
    def __init__(self, response: FakeResponse) -> None:
        self.response = response
        self.calls = 0
        self.answer: Deferred = Deferred()

    def get_blob(self, repository: str, digest: str) -> Deferred:
        self.calls += 1
        if self.answer.called:  # a later fetch, which upstream has not answered (yet)
            self.answer = Deferred()
        return self.answer

    def head_blob(self, repository: str, digest: str) -> Deferred:
        self.heads = getattr(self, "heads", 0) + 1
        return succeed(self.response.length)


def upstreams(metrics: Metrics | None = None, **clients: object) -> Upstreams:
    """The fake clients as the server's Upstreams, counting into ``metrics``."""
    return Upstreams(clients=clients, metrics=metrics or Metrics())  # type: ignore[arg-type]  # fakes


def downloads_over(
    tmp_path, clock: Clock, storage: Storage, node: str | None = None, lane: InlineLane | None = None,
    metrics: Metrics | None = None, index_writes: ThreadRunner = inline, **clients: object,
) -> Downloads:
    """This node's Downloads from the fake upstream ``clients`` (by upstream name), as the root
    builds them: inline threads, ``lane`` (or an inline one) for the writes, one Metrics."""
    metrics = metrics or Metrics()
    return Downloads(storage=storage, upstreams=upstreams(metrics, **clients), clock=clock, in_thread=inline,
                     index_writes=index_writes,
                     metrics=metrics, leases=Leases(str(tmp_path / "store"), clock=clock.seconds, node=node),
                     lanes=lambda name: lane or InlineLane(), capacity=store_capacity(clock, metrics))


def make(tmp_path, response: FakeResponse, node: str = "a", clock: Clock | None = None):
    clock = clock or Clock()
    storage = Storage(str(tmp_path / "store"), str(tmp_path / f"index-{node}"), clock=clock.seconds)
    client = FakeClient(response)
    return downloads_over(tmp_path, clock, storage, node, local=client), client, clock, storage


def test_concurrent_joins_share_one_fetch_and_commit(tmp_path) -> None:
    data = os.urandom(5000)
    digest = sha256_digest(data)
    response = FakeResponse(len(data))
    downloads, client, _, storage = make(tmp_path, response)
    first = ensureDeferred(downloads.join(ROUTE, digest))
    second = ensureDeferred(downloads.join(ROUTE, digest))
    assert client.calls == 1 and not first.called
    client.answer.callback(response)
    download = first.result
    assert second.result is download
    assert ensureDeferred(downloads.join(ROUTE, digest)).result is download and client.calls == 1
    response.protocol.dataReceived(data[:100])
    response.protocol.dataReceived(data[100:])
    response.protocol.connectionLost(Failure(ResponseDone()))
    assert download.finished.result is True
    with pytest.raises(AlreadyStored):  # the download is over: a new join finds the blob stored
        join_now(downloads, ROUTE, digest)
    assert storage.blobs.stat(digest).size == 5000
    assert storage.index.is_linked(digest, ROUTE.key)


def test_a_committed_blob_is_recorded_in_the_index_through_its_writer_thread(tmp_path) -> None:
    # The index's commit waits for an fdatasync: it runs on the index's own thread, never on the reactor.
    data = os.urandom(5000)
    digest = sha256_digest(data)
    response = FakeResponse(len(data))
    held: list[tuple[Deferred, Callable[..., Any], tuple[Any, ...]]] = []

    def index_writes(function: Callable[..., Any], *args: Any) -> Deferred:
        held.append((Deferred(), function, args))
        return held[-1][0]

    clock = Clock()
    storage = Storage(str(tmp_path / "store"), str(tmp_path / "index"), clock=clock.seconds)
    client = FakeClient(response)
    downloads = downloads_over(tmp_path, clock, storage, "a", index_writes=index_writes, local=client)
    joined = ensureDeferred(downloads.join(ROUTE, digest))
    client.answer.callback(response)
    response.protocol.dataReceived(data)
    response.protocol.connectionLost(Failure(ResponseDone()))
    assert storage.blobs.stat(digest).size == 5000  # committed to the store
    assert storage.index.get_blob(digest) is None and not joined.result.finished.called
    [(done, function, args)] = held
    assert function == storage.index.put_blob
    done.callback(function(*args))
    assert joined.result.finished.result is True
    assert storage.index.get_blob(digest).size == 5000 and storage.index.is_linked(digest, ROUTE.key)


def test_wrong_bytes_are_not_committed(tmp_path) -> None:
    digest = sha256_digest(b"right")
    response = FakeResponse(5)
    downloads, client, _, storage = make(tmp_path, response)
    joined = ensureDeferred(downloads.join(ROUTE, digest))
    client.answer.callback(response)
    response.protocol.dataReceived(b"wrong")
    response.protocol.connectionLost(Failure(ResponseDone()))
    assert joined.result.finished.result is False
    assert storage.blobs.stat(digest) is None and os.listdir(storage.blobs.tmp_dir) == []
    ensureDeferred(downloads.join(ROUTE, digest))
    assert client.calls == 2  # the failed download is over: a new join fetches again


def test_a_stalled_upstream_is_cut_off_after_read_timeout(tmp_path) -> None:
    data = b"x" * 100
    response = FakeResponse(100)
    downloads, client, clock, storage = make(tmp_path, response)
    joined = ensureDeferred(downloads.join(ROUTE, sha256_digest(data)))
    client.answer.callback(response)
    response.protocol.dataReceived(data[:10])
    clock.advance(29)
    response.protocol.dataReceived(data[10:20])  # data resets the timer
    clock.advance(29)
    assert not response.transport.stopped
    clock.advance(2)
    assert response.transport.stopped
    response.protocol.connectionLost(Failure(PotentialDataLoss()))
    assert joined.result.finished.result is False
    ensureDeferred(downloads.join(ROUTE, sha256_digest(data)))
    assert client.calls == 2  # the failed download is over: a new join fetches again


def test_an_error_while_starting_the_body_does_not_leave_a_stuck_download(tmp_path) -> None:
    digest = sha256_digest(b"y")
    response = FakeResponse(1, fail_on_deliver=True)
    downloads, client, _, storage = make(tmp_path, response)
    joined = ensureDeferred(downloads.join(ROUTE, digest))
    client.answer.callback(response)
    assert joined.result.finished.result is False
    assert os.listdir(storage.blobs.tmp_dir) == []
    ensureDeferred(downloads.join(ROUTE, digest))
    assert client.calls == 2  # the failed download is over: a new join fetches again


def test_a_second_node_follows_the_lease_holder_instead_of_fetching(tmp_path) -> None:
    data = os.urandom(3000)
    digest = sha256_digest(data)
    clock = Clock()
    response = FakeResponse(len(data))
    node_a, client_a, _, storage_a = make(tmp_path, response, "a", clock)
    node_b, client_b, _, storage_b = make(tmp_path, response, "b", clock)
    joined_a = ensureDeferred(node_a.join(ROUTE, digest))
    client_a.answer.callback(response)
    response.protocol.dataReceived(data[:1000])
    following = ensureDeferred(node_b.join(ROUTE, digest)).result
    assert client_b.calls == 0 and client_b.heads == 1  # no second download, only a HEAD
    assert following.writer is None and following.size == len(data)
    clock.advance(0.1)
    assert following.temp_path == joined_a.result.temp_path  # found node A's growing file
    response.protocol.dataReceived(data[1000:])
    response.protocol.connectionLost(Failure(ResponseDone()))
    assert node_a.leases.holder(parse_digest(digest)) is None  # released after the commit
    clock.advance(0.1)
    assert following.finished.result is True
    with pytest.raises(AlreadyStored):  # node B's following is over too: a new join finds the blob
        join_now(node_b, ROUTE, digest)


def test_a_dead_holders_lease_is_taken_over(tmp_path) -> None:
    data = os.urandom(2000)
    digest = sha256_digest(data)
    clock = Clock()
    dead_response, response = FakeResponse(len(data)), FakeResponse(len(data))
    node_a, client_a, _, _ = make(tmp_path, dead_response, "a", clock)
    node_b, client_b, _, storage_b = make(tmp_path, response, "b", clock)
    dying = ensureDeferred(node_a.join(ROUTE, digest))
    client_a.answer.callback(dead_response)
    dead_response.protocol.dataReceived(data[:500])
    dying.result.heartbeat.stop()  # node A dies: no more heartbeats
    following = ensureDeferred(node_b.join(ROUTE, digest)).result
    assert following.writer is None
    clock.advance(31)  # silent past lease_timeout: node B's watcher gives up on it
    assert following.finished.result is False
    retried = ensureDeferred(node_b.join(ROUTE, digest))
    assert client_b.calls == 1  # node B took the stale lease and fetches itself
    client_b.answer.callback(response)
    response.protocol.dataReceived(data)
    response.protocol.connectionLost(Failure(ResponseDone()))
    assert retried.result.finished.result is True
    assert storage_b.blobs.stat(digest).size == len(data)


def test_followers_are_woken_per_megabyte_not_per_network_read(tmp_path) -> None:
    data = os.urandom((3 << 20) - 100)
    digest = sha256_digest(data)
    response = FakeResponse(len(data))
    downloads, client, _, _ = make(tmp_path, response)
    joined = ensureDeferred(downloads.join(ROUTE, digest))
    client.answer.callback(response)
    download = joined.result
    first = download.changed(0)
    response.protocol.dataReceived(data[:65536])
    assert first.called and download.written_bytes == 65536  # the first bytes go at once: a client waits
    woken = download.changed(65536)
    for offset in range(65536, 1 << 20, 65536):
        response.protocol.dataReceived(data[offset:offset + 65536])
    assert not woken.called  # under a megabyte past the reader: let it sleep
    response.protocol.dataReceived(data[1 << 20:(2 << 20)])
    assert woken.called
    assert download.changed(65536).called  # already a megabyte ahead of this reader
    last = download.changed(2 << 20)
    response.protocol.dataReceived(data[2 << 20:])
    assert not last.called  # the rest is under a megabyte: the end wakes it
    response.protocol.connectionLost(Failure(ResponseDone()))
    assert last.called and download.finished.result is True


class ManualLane:
    """Holds the jobs until the test lets them run: a disk slower than the network."""

    def __init__(self) -> None:
        self.jobs: list[tuple[Callable, tuple, Deferred]] = []
        self.closed = False

    def run(self, job: Callable, *args: object) -> Deferred:
        done: Deferred = Deferred()
        self.jobs.append((job, args, done))
        return done

    def step(self) -> None:
        """Run the oldest job."""
        job, args, done = self.jobs.pop(0)
        try:
            result = job(*args)
        except Exception:
            done.errback(Failure())
        else:
            done.callback(result)

    def run_all(self) -> None:
        while self.jobs:
            self.step()

    def close(self) -> None:
        self.closed = True


class PausableTransport(FakeTransport):
    def __init__(self) -> None:
        super().__init__()
        self.paused = False

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False


def make_with_lane(tmp_path, data: bytes, clock: Clock | None = None):
    """Downloads whose lane the test drives, and an upstream about to answer with ``data``."""
    clock = clock or Clock()
    lane = ManualLane()
    response = FakeResponse(len(data))
    response.transport = PausableTransport()
    storage = Storage(str(tmp_path / "store"), str(tmp_path / "index"), clock=clock.seconds)
    client = FakeClient(response)
    return downloads_over(tmp_path, clock, storage, lane=lane, local=client), client, response, lane, storage


def start(downloads: Downloads, client: FakeClient, response: FakeResponse, data: bytes) -> Download:
    """The download of ``data``'s digest, once upstream has answered with ``response``."""
    joined = ensureDeferred(downloads.join(ROUTE, sha256_digest(data)))
    client.answer.callback(response)
    return joined.result


def feed_until_paused(response: FakeResponse, data: bytes) -> int:
    """Deliver ``data`` a megabyte at a time until upstream is paused; the bytes delivered."""
    fed = 0
    while not response.transport.paused and fed < len(data):
        response.protocol.dataReceived(data[fed:fed + (1 << 20)])
        fed += 1 << 20
    assert response.transport.paused
    return fed


def test_upstream_is_paused_while_the_lane_is_behind_and_resumed_when_it_catches_up(tmp_path) -> None:
    data = os.urandom(12 << 20)
    downloads, client, response, lane, storage = make_with_lane(tmp_path, data)
    download = start(downloads, client, response, data)
    queued = feed_until_paused(response, data)
    assert queued == QUEUED_LIMIT + (1 << 20)  # none written: stop reading upstream past the limit
    assert download.written_bytes == 0 and not download.changed(0).called
    lane.run_all()
    assert not response.transport.paused and download.written_bytes == queued
    response.protocol.dataReceived(data[queued:])
    response.protocol.connectionLost(Failure(ResponseDone()))
    lane.run_all()
    assert download.finished.result is True and storage.blobs.stat(download.digest).size == len(data)
    assert lane.closed


def test_followers_may_finish_once_verified_before_the_commit_lands(tmp_path) -> None:
    data = os.urandom(3000)
    downloads, client, response, lane, storage = make_with_lane(tmp_path, data)
    download = start(downloads, client, response, data)
    response.protocol.dataReceived(data)
    response.protocol.connectionLost(Failure(ResponseDone()))
    woken = download.changed(len(data))
    while not download.verified:  # the writes, then the verify; the commit stays queued
        lane.step()
    assert woken.called and lane.jobs
    assert not download.finished.called and storage.blobs.stat(download.digest) is None
    lane.run_all()
    assert download.finished.result is True and storage.blobs.stat(download.digest) is not None


def test_a_failed_write_stops_the_upstream_and_commits_nothing(tmp_path) -> None:
    data = os.urandom(2 << 20)
    downloads, client, response, lane, storage = make_with_lane(tmp_path, data)
    download = start(downloads, client, response, data)
    download.writer.abort()  # what a failing disk write leaves: a closed writer
    response.protocol.dataReceived(data[:1 << 20])
    lane.run_all()
    assert response.transport.stopped and isinstance(download.write_error, Exception)
    response.protocol.connectionLost(Failure(ResponseDone()))
    lane.run_all()
    assert download.finished.result is False and storage.blobs.stat(download.digest) is None
    ensureDeferred(downloads.join(ROUTE, download.digest))
    assert client.calls == 2  # the failed download is over: a new join fetches again


def test_a_store_that_takes_nothing_fails_the_download_with_its_own_message(tmp_path) -> None:
    data = os.urandom(8 << 20)
    clock = Clock()
    downloads, client, response, lane, storage = make_with_lane(tmp_path, data, clock)
    download = start(downloads, client, response, data)
    feed_until_paused(response, data)
    clock.advance(UPSTREAM.read_timeout + 1)  # the store (a stalled NFS mount) never takes the bytes
    assert response.transport.stopped and "store fell behind" in str(download.write_error)
    response.protocol.connectionLost(Failure(PotentialDataLoss()))
    lane.run_all()
    assert download.finished.result is False and storage.blobs.stat(download.digest) is None


def test_every_caller_learns_the_outcome(tmp_path) -> None:
    data = os.urandom(1000)
    downloads, client, response, lane, _ = make_with_lane(tmp_path, data)
    download = start(downloads, client, response, data)

    async def wait() -> bool:
        return await download.outcome()

    waiting = [ensureDeferred(wait()) for _ in range(3)]  # e.g. three range requests
    response.protocol.dataReceived(data)
    response.protocol.connectionLost(Failure(ResponseDone()))
    lane.run_all()
    assert [w.result for w in waiting] == [True, True, True]
    assert ensureDeferred(wait()).result is True  # and a caller arriving after the end


def test_a_clean_stop_can_wait_for_verified_downloads_to_commit(tmp_path) -> None:
    data = os.urandom(3000)
    downloads, client, response, lane, storage = make_with_lane(tmp_path, data)
    download = start(downloads, client, response, data)
    assert downloads.committing().called  # nothing verified yet: nothing to wait for
    response.protocol.dataReceived(data)
    response.protocol.connectionLost(Failure(ResponseDone()))
    while not download.verified:
        lane.step()
    settled = downloads.committing()
    assert not settled.called
    lane.run_all()  # the commit
    assert settled.result == [True] and storage.blobs.stat(download.digest) is not None


def test_a_follower_of_this_node_ends_with_every_byte_before_the_commit(tmp_path) -> None:
    data = os.urandom((1 << 20) + 5000)
    downloads, client, response, lane, storage = make_with_lane(tmp_path, data)
    download = start(downloads, client, response, data)
    follower = _follow(storage.blobs, download)
    request = FakeRequest()
    sent = ensureDeferred(send(request, follower, inline, lambda n: None,
                               wait_for_more(follower, download), download.size))
    response.protocol.dataReceived(data)
    response.protocol.connectionLost(Failure(ResponseDone()))
    lane.step()  # every byte is written (upstream delivered them in one read)
    assert b"".join(request.written) == data[:-1] and not request.finished  # the verdict's byte waits
    while not download.verified:  # the rest of the writes, then the verify
        lane.step()
    assert b"".join(request.written) == data and request.finished and sent.result is True
    assert storage.blobs.stat(download.digest) is None  # the fsync and rename are still queued
    lane.run_all()
    assert download.finished.result is True and storage.blobs.stat(download.digest) is not None


class GuardedClient(FakeClient):
    """An upstream where only ``team/app`` holds the blob."""

    def head_blob(self, repository: str, digest: str) -> Deferred:
        self.heads = getattr(self, "heads", 0) + 1
        if repository != ROUTE.repository:
            return fail(errors.blob_unknown(digest))
        return succeed(self.response.length)


def test_a_repository_joining_another_ones_download_must_be_confirmed_first(tmp_path) -> None:
    data = os.urandom(3000)
    digest = sha256_digest(data)
    response = FakeResponse(len(data))
    clock = Clock()
    storage = Storage(str(tmp_path / "store"), str(tmp_path / "index"), clock=clock.seconds)
    client = GuardedClient(response)
    downloads = downloads_over(tmp_path, clock, storage, local=client)
    blobs = blob_endpoint(storage=storage, upstreams=upstreams(local=client), downloads=downloads, clock=clock,
                          metrics=Metrics())
    other = Route(UPSTREAM, "team/other")
    ensureDeferred(downloads.join(ROUTE, digest))  # team/app asked first: its fetch is starting
    asked = [ensureDeferred(blobs.serve(FakeRequest(), other, digest, head=False))]
    client.answer.callback(response)  # started: now under way
    asked.append(ensureDeferred(blobs.serve(FakeRequest(), other, digest, head=False)))
    for stage, request in zip(("while starting", "while under way"), asked):
        failure = request.result
        request.addErrback(lambda _: None)
        assert isinstance(failure.value, errors.RegistryError) and failure.value.status == 404, stage
    assert client.calls == 1 and client.heads == 2 and not storage.index.is_linked(digest, other.key)


SLOW = UpstreamConfig("slow", "http://127.0.0.1:2", read_timeout=30.0)


class Answers(FakeClient):
    """An upstream whose every GET is answered by the test, in order (``answers[n]`` for call n)."""

    def __init__(self, response: FakeResponse) -> None:
        super().__init__(response)
        self.answers: list[Deferred] = []

    def get_blob(self, repository: str, digest: str) -> Deferred:
        self.calls += 1
        self.answers.append(Deferred())
        return self.answers[-1]


def two_upstreams(tmp_path, data: bytes):
    """Downloads over a hanging upstream ``slow`` and a healthy ``local`` that holds ``data``."""
    clock = Clock()
    storage = Storage(str(tmp_path / "store"), str(tmp_path / "index"), clock=clock.seconds)
    response = FakeResponse(len(data))
    healthy, hanging = FakeClient(response), FakeClient(FakeResponse(len(data)))
    downloads = downloads_over(tmp_path, clock, storage, local=healthy, slow=hanging)
    return downloads, healthy, hanging, response, storage


def test_a_hanging_upstream_does_not_hold_up_another_upstreams_clients(tmp_path) -> None:
    data = os.urandom(4000)
    digest = sha256_digest(data)
    downloads, healthy, hanging, response, storage = two_upstreams(tmp_path, data)
    stuck = ensureDeferred(downloads.join(Route(SLOW, "team/app"), digest))  # never answers
    joined = ensureDeferred(downloads.join(ROUTE, digest))
    assert hanging.calls == 1 and healthy.calls == 1  # the healthy route fetches for itself at once
    healthy.answer.callback(response)
    download = joined.result
    assert download.lease is None  # the hanging fetch holds the digest's lease: fetched beside it
    response.protocol.dataReceived(data)
    response.protocol.connectionLost(Failure(ResponseDone()))
    assert download.finished.result is True and storage.blobs.stat(digest).size == len(data)
    hanging.answer.errback(errors.gateway_timeout("upstream slow did not answer"))
    assert isinstance(stuck.result.value, errors.RegistryError) and stuck.result.value.status == 504
    stuck.addErrback(lambda _: None)
    assert downloads.leases.holder(parse_digest(digest)) is None  # the hanging fetch's lease is released


def test_twenty_clients_through_one_route_share_one_fetch(tmp_path) -> None:
    data = os.urandom(3000)
    digest = sha256_digest(data)
    response = FakeResponse(len(data))
    downloads, client, _, storage = make(tmp_path, response)
    joined = [ensureDeferred(downloads.join(ROUTE, digest)) for _ in range(20)]
    client.answer.callback(response)
    joined += [ensureDeferred(downloads.join(ROUTE, digest)) for _ in range(20)]
    assert client.calls == 1 and len({id(j.result) for j in joined}) == 1
    response.protocol.dataReceived(data)
    response.protocol.connectionLost(Failure(ResponseDone()))
    assert joined[0].result.finished.result is True


def test_another_repositorys_failed_start_is_not_handed_to_this_one(tmp_path) -> None:
    data = os.urandom(3000)
    digest = sha256_digest(data)
    response = FakeResponse(len(data))
    clock = Clock()
    storage = Storage(str(tmp_path / "store"), str(tmp_path / "index"), clock=clock.seconds)
    client = Answers(response)
    downloads = downloads_over(tmp_path, clock, storage, local=client)
    other = Route(UPSTREAM, "team/other")
    refused = ensureDeferred(downloads.join(other, digest))  # team/other lacks the blob
    same_repo = ensureDeferred(downloads.join(other, digest))
    joined = ensureDeferred(downloads.join(ROUTE, digest))  # team/app has it
    client.answers[0].errback(errors.blob_unknown(digest))
    for waiter in (refused, same_repo):  # the starter's own repository gets its own answer
        assert waiter.result.value.status == 404
        waiter.addErrback(lambda _: None)
    assert client.calls == 2 and not joined.called  # team/app asks upstream itself
    client.answers[1].callback(response)
    response.protocol.dataReceived(data)
    response.protocol.connectionLost(Failure(ResponseDone()))
    assert joined.result.finished.result is True and storage.index.is_linked(digest, ROUTE.key)


def no_space(monkeypatch, after: int = 0) -> None:
    """The store's filesystem fills up once ``after`` more bytes are written (files can still be made)."""
    budget = [after]

    def write_all(fd: int, data) -> None:
        if len(data) > budget[0]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        budget[0] -= len(data)
        os.write(fd, data)

    def writev_all(fd: int, pieces) -> int:
        for piece in pieces:
            write_all(fd, piece)
        return sum(len(piece) for piece in pieces)

    for module in (storage_files, storage_blobstore, storage_lease):
        monkeypatch.setattr(module, "write_all", write_all)
    monkeypatch.setattr(storage_blobstore, "writev_all", writev_all)


def blobs_over(tmp_path, client: FakeClient):
    clock = Clock()
    storage = Storage(str(tmp_path / "store"), str(tmp_path / "index"), clock=clock.seconds)
    metrics = Metrics()
    downloads = downloads_over(tmp_path, clock, storage, metrics=metrics, local=client)
    blobs = blob_endpoint(storage=storage, upstreams=downloads.upstreams, downloads=downloads, clock=clock,
                          metrics=metrics)
    return blobs, storage, clock, metrics


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_a_full_store_serves_a_cold_blob_from_upstream_verified_and_not_kept(tmp_path, monkeypatch) -> None:
    data = os.urandom(3000)
    digest = sha256_digest(data)
    client = Answers(FakeResponse(len(data)))
    blobs, storage, clock, metrics = blobs_over(tmp_path, client)
    no_space(monkeypatch)
    for attempt in range(2):  # the first finds the store full; the second does not try it again
        request = FakeRequest()
        served = ensureDeferred(blobs.serve(request, ROUTE, digest, head=False))
        response = FakeResponse(len(data))
        client.answers[-1].callback(response)
        response.protocol.dataReceived(data[:1000])
        response.protocol.dataReceived(data[1000:])
        assert b"".join(request.written) == data[:-1] and not request.finished  # the verdict's byte waits
        response.protocol.connectionLost(Failure(ResponseDone()))
        assert served.called and request.finished and b"".join(request.written) == data
        assert request.code == 200 and request.responseHeaders.getRawHeaders(b"content-length") == [b"3000"]
    assert client.calls == 2 and storage.blobs.stat(digest) is None
    assert os.listdir(storage.blobs.tmp_dir) == [] and os.listdir(blobs.cache.downloads.leases.dir) == []
    assert sample(metrics, "metahub_store_full") == 1
    assert sample(metrics, "metahub_store_write_failures_total", reason="no_space") == 1  # only the first tried
    assert sample(metrics, "metahub_store_bypassed_total", kind="blob") == 2
    clock.advance(31)  # the store is tried again
    monkeypatch.undo()
    request = FakeRequest()
    ensureDeferred(blobs.serve(request, ROUTE, digest, head=False))
    response = FakeResponse(len(data))
    client.answers[-1].callback(response)
    response.protocol.dataReceived(data)
    response.protocol.connectionLost(Failure(ResponseDone()))
    assert storage.blobs.stat(digest).size == len(data) and sample(metrics, "metahub_store_full") == 0


def test_wrong_bytes_from_upstream_abort_a_response_that_bypasses_the_store(tmp_path, monkeypatch) -> None:
    digest = sha256_digest(b"right")
    client = Answers(FakeResponse(5))
    blobs, storage, _, _ = blobs_over(tmp_path, client)
    no_space(monkeypatch)
    request = FakeRequest()
    ensureDeferred(blobs.serve(request, ROUTE, digest, head=False))
    response = FakeResponse(5)
    client.answers[-1].callback(response)
    response.protocol.dataReceived(b"wrong")
    response.protocol.connectionLost(Failure(ResponseDone()))
    assert request.transport.aborted and not request.finished and b"".join(request.written) == b"wron"


def test_a_range_bypassing_the_store_is_cut_from_the_verified_body(tmp_path, monkeypatch) -> None:
    data = os.urandom(3000)
    client = Answers(FakeResponse(len(data)))
    blobs, _, _, _ = blobs_over(tmp_path, client)
    no_space(monkeypatch)
    request = FakeRequest(headers={b"range": b"bytes=1000-1999"})
    ensureDeferred(blobs.serve(request, ROUTE, sha256_digest(data), head=False))
    response = FakeResponse(len(data))
    client.answers[-1].callback(response)
    response.protocol.dataReceived(data[:2500])
    assert b"".join(request.written) == data[1000:1999]  # the range's last byte waits for the rest
    response.protocol.dataReceived(data[2500:])
    response.protocol.connectionLost(Failure(ResponseDone()))
    assert request.code == 206 and b"".join(request.written) == data[1000:2000] and request.finished
    assert request.responseHeaders.getRawHeaders(b"content-range") == [b"bytes 1000-1999/3000"]


def test_a_download_out_of_space_midway_aborts_its_clients_and_their_retry_is_served(tmp_path, monkeypatch) -> None:
    data = os.urandom(3 << 20)
    digest = sha256_digest(data)
    client = Answers(FakeResponse(len(data)))
    blobs, storage, _, metrics = blobs_over(tmp_path, client)
    no_space(monkeypatch, after=(1 << 20) + 4096)  # the lease, then a megabyte, fit
    first = FakeRequest()
    ensureDeferred(blobs.serve(first, ROUTE, digest, head=False))
    response = FakeResponse(len(data))
    response.transport = PausableTransport()
    client.answers[-1].callback(response)
    for offset in range(0, len(data), 1 << 20):
        if response.transport.stopped:
            break
        response.protocol.dataReceived(data[offset:offset + (1 << 20)])
    assert response.transport.stopped  # the second megabyte did not fit: upstream is let go
    response.protocol.connectionLost(Failure(PotentialDataLoss()))
    assert first.transport.aborted and not first.finished
    assert os.listdir(storage.blobs.tmp_dir) == [] and storage.blobs.stat(digest) is None
    assert sample(metrics, "metahub_store_full") == 1
    retry = FakeRequest()
    ensureDeferred(blobs.serve(retry, ROUTE, digest, head=False))
    assert client.calls == 2  # straight to upstream: the store is not tried again at once
    response = FakeResponse(len(data))
    client.answers[-1].callback(response)
    response.protocol.dataReceived(data)
    response.protocol.connectionLost(Failure(ResponseDone()))
    assert retry.finished and b"".join(retry.written) == data


def test_a_store_that_starts_refusing_asks_once_for_room(tmp_path) -> None:
    clock = Clock()
    asked = []
    capacity = StoreCapacity(clock=clock, metrics=Metrics(), make_room=lambda: asked.append(clock.seconds()))
    for _ in range(3):
        capacity.failed(OSError(errno.EROFS, "read-only"), "a blob")
    assert asked == [0] and not capacity.can_store()
    capacity.retry()  # a collection made room
    assert capacity.can_store()
    capacity.stored()
    capacity.failed(OSError(errno.ENOSPC, "full"), "a blob")
    assert asked == [0, 0]
    clock.advance(31)  # still refusing when tried again: ask again
    capacity.failed(OSError(errno.ENOSPC, "full"), "a blob")
    assert asked == [0, 0, 31]


def test_a_client_that_cannot_keep_up_pauses_the_upstream_of_a_pass_through(tmp_path, monkeypatch) -> None:
    data = os.urandom(3000)
    client = Answers(FakeResponse(len(data)))
    blobs, _, _, _ = blobs_over(tmp_path, client)
    no_space(monkeypatch)
    request = FakeRequest()
    served = ensureDeferred(blobs.serve(request, ROUTE, sha256_digest(data), head=False))
    response = FakeResponse(len(data))
    response.transport = PausableTransport()
    client.answers[-1].callback(response)
    request.producer.pauseProducing()  # the client's socket buffer is full
    assert response.transport.paused
    request.producer.resumeProducing()
    assert not response.transport.paused
    request.hang_up()
    assert response.transport.stopped
    response.protocol.connectionLost(Failure(PotentialDataLoss()))
    assert served.called and not request.finished and not request.transport.aborted


def test_a_follower_of_another_nodes_fetch_that_failed_before_a_byte_fetches_for_itself(tmp_path) -> None:
    data = os.urandom(3000)
    digest = sha256_digest(data)
    clock = Clock()
    response = FakeResponse(len(data))
    node_a, client_a, _, _ = make(tmp_path, FakeResponse(len(data)), "a", clock)
    node_b, client_b, _, storage_b = make(tmp_path, response, "b", clock)
    blobs_b = blob_endpoint(storage=storage_b, upstreams=upstreams(local=client_b), downloads=node_b, clock=clock,
                            metrics=Metrics())
    stuck = ensureDeferred(node_a.join(ROUTE, digest))  # node A holds the lease; its upstream hangs
    request = FakeRequest()
    served = ensureDeferred(blobs_b.serve(request, ROUTE, digest, head=False))
    clock.advance(0.1)
    assert client_b.calls == 0 and client_b.heads == 1  # node B follows node A
    client_a.answer.errback(errors.gateway_timeout("upstream local did not answer"))
    stuck.addErrback(lambda _: None)
    clock.advance(0.1)  # node B sees the lease released with nothing written
    assert client_b.calls == 1  # and fetches for itself rather than answering node A's failure
    client_b.answer.callback(response)
    response.protocol.dataReceived(data)
    response.protocol.connectionLost(Failure(ResponseDone()))
    clock.advance(0.1)
    assert served.called and request.finished and b"".join(request.written) == data


def test_a_follower_never_picks_the_dead_holders_file_once_the_lease_was_taken_over(tmp_path) -> None:
    data = os.urandom(2000)
    digest = sha256_digest(data)
    clock = Clock()
    clock.advance(1000)
    dead_response = FakeResponse(len(data))
    node_a, client_a, _, _ = make(tmp_path, dead_response, "a", clock)
    node_b, _, _, _ = make(tmp_path, FakeResponse(len(data)), "b", clock)
    node_c, _, _, _ = make(tmp_path, FakeResponse(len(data)), "c", clock)
    joined = ensureDeferred(node_a.join(ROUTE, digest))
    client_a.answer.callback(dead_response)
    dead_response.protocol.dataReceived(data[:500])
    dead = joined.result
    dead.heartbeat.stop()  # node A dies mid-download: its lease and file stay
    os.utime(dead.temp_path, (1000, 1000))  # the file's last write, on the leases' clock
    clock.advance(31)
    assert node_b.leases.try_take(parse_digest(digest), 30.0) is not None  # node B takes over...
    # ...and has not created its own file yet: node C must wait for it, not follow node A's.
    assert node_c._remote_state(digest) == ("writing", None)
