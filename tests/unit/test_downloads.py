"""Single flight on a fake clock and a fake upstream: one fetch, verified, never stuck."""
from __future__ import annotations

import os
from collections.abc import Callable

from twisted.internet.defer import Deferred, ensureDeferred, fail, succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.test.requesthelper import DummyRequest

from metahub import errors
from metahub.blobs import Blobs, _follow, wait_for_more
from metahub.config import UpstreamConfig
from metahub.downloads import QUEUED_LIMIT, Download, Downloads
from metahub.metrics import Metrics
from metahub.names import Route
from metahub.streaming import send
from storage import Leases, Storage, sha256_digest

from .test_streaming import FakeRequest

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
        return self.answer

    def head_blob(self, repository: str, digest: str) -> Deferred:
        self.heads = getattr(self, "heads", 0) + 1
        return succeed(self.response.length)


class InlineLane:
    """Runs each job at once, like the in_thread stand-in: a disk as fast as the network."""

    def run(self, job, *args) -> Deferred:
        try:
            return succeed(job(*args))
        except Exception:
            return fail()

    def close(self) -> None:
        pass


def make(tmp_path, response: FakeResponse, node: str = "a", clock: Clock | None = None):
    clock = clock or Clock()
    storage = Storage(str(tmp_path / "store"), str(tmp_path / f"index-{node}"), clock=clock.seconds)
    client = FakeClient(response)
    leases = Leases(str(tmp_path / "store"), clock=clock.seconds, node=node)
    downloads = Downloads(storage, {"local": client}, clock, lambda f, *a: succeed(f(*a)), Metrics(), leases,
                          lambda name: InlineLane())
    return downloads, client, clock, storage


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
    assert second.result is download and downloads.active(digest) is download
    assert ensureDeferred(downloads.join(ROUTE, digest)).result is download and client.calls == 1
    response.protocol.dataReceived(data[:100])
    response.protocol.dataReceived(data[100:])
    response.protocol.connectionLost(Failure(ResponseDone()))
    assert download.finished.result is True
    assert downloads.active(digest) is None
    assert storage.lookup(digest).size == 5000
    assert storage.index.is_linked(digest, ROUTE.key)


def test_wrong_bytes_are_not_committed(tmp_path) -> None:
    digest = sha256_digest(b"right")
    response = FakeResponse(5)
    downloads, client, _, storage = make(tmp_path, response)
    joined = ensureDeferred(downloads.join(ROUTE, digest))
    client.answer.callback(response)
    response.protocol.dataReceived(b"wrong")
    response.protocol.connectionLost(Failure(ResponseDone()))
    assert joined.result.finished.result is False
    assert storage.lookup(digest) is None and os.listdir(storage.blobs.tmp_dir) == []
    assert downloads.active(digest) is None


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
    assert joined.result.finished.result is False and downloads.active(sha256_digest(data)) is None


def test_an_error_while_starting_the_body_does_not_leave_a_stuck_download(tmp_path) -> None:
    digest = sha256_digest(b"y")
    response = FakeResponse(1, fail_on_deliver=True)
    downloads, client, _, storage = make(tmp_path, response)
    joined = ensureDeferred(downloads.join(ROUTE, digest))
    client.answer.callback(response)
    assert joined.result.finished.result is False
    assert downloads.active(digest) is None and os.listdir(storage.blobs.tmp_dir) == []


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
    assert node_a.leases.holder(digest[7:]) is None  # released after the commit
    clock.advance(0.1)
    assert following.finished.result is True and node_b.active(digest) is None


def test_a_dead_holders_lease_is_taken_over(tmp_path) -> None:
    data = os.urandom(2000)
    digest = sha256_digest(data)
    clock = Clock()
    dead_response, response = FakeResponse(len(data)), FakeResponse(len(data))
    node_a, client_a, _, _ = make(tmp_path, dead_response, "a", clock)
    node_b, client_b, _, storage_b = make(tmp_path, response, "b", clock)
    ensureDeferred(node_a.join(ROUTE, digest))
    client_a.answer.callback(dead_response)
    dead_response.protocol.dataReceived(data[:500])
    node_a.active(digest).heartbeat.stop()  # node A dies: no more heartbeats
    following = ensureDeferred(node_b.join(ROUTE, digest)).result
    assert following.writer is None
    clock.advance(31)  # silent past lease_timeout: node B's watcher gives up on it
    assert following.finished.result is False and node_b.active(digest) is None
    retried = ensureDeferred(node_b.join(ROUTE, digest))
    assert client_b.calls == 1  # node B took the stale lease and fetches itself
    client_b.answer.callback(response)
    response.protocol.dataReceived(data)
    response.protocol.connectionLost(Failure(ResponseDone()))
    assert retried.result.finished.result is True
    assert storage_b.lookup(digest).size == len(data)


def test_followers_are_woken_per_megabyte_not_per_network_read(tmp_path) -> None:
    data = os.urandom((3 << 20) - 100)
    digest = sha256_digest(data)
    response = FakeResponse(len(data))
    downloads, client, _, _ = make(tmp_path, response)
    joined = ensureDeferred(downloads.join(ROUTE, digest))
    client.answer.callback(response)
    download = joined.result
    woken = download.changed(0)
    for offset in range(0, (1 << 20) - 65536, 65536):
        response.protocol.dataReceived(data[offset:offset + 65536])
    assert not woken.called  # under a megabyte past the reader: let it sleep
    response.protocol.dataReceived(data[(1 << 20) - 65536:(2 << 20)])
    assert woken.called
    assert download.changed(0).called  # already a megabyte ahead of this reader
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
    downloads = Downloads(storage, {"local": client}, clock, lambda f, *a: succeed(f(*a)), Metrics(),
                          Leases(str(tmp_path / "store"), clock=clock.seconds), lambda name: lane)
    return downloads, client, response, lane, storage


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
    assert download.finished.result is True and storage.lookup(download.digest).size == len(data)
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
    assert download.finished.result is False and storage.lookup(download.digest) is None
    assert downloads.active(download.digest) is None


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
    assert download.finished.result is False and storage.lookup(download.digest) is None


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
    sent = ensureDeferred(send(request, follower, lambda f, *a: succeed(f(*a)), lambda n: None,
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
    inline = lambda f, *a: succeed(f(*a))  # noqa: E731
    downloads = Downloads(storage, {"local": client}, clock, inline, Metrics(),
                          Leases(str(tmp_path / "store"), clock=clock.seconds), lambda name: InlineLane())
    blobs = Blobs(storage, {"local": client}, downloads, clock, inline, Metrics())
    other = Route(UPSTREAM, "team/other")
    ensureDeferred(downloads.join(ROUTE, digest))  # team/app asked first: its fetch is starting
    asked = [ensureDeferred(blobs.serve(DummyRequest([b""]), other, digest, head=False))]
    client.answer.callback(response)  # started: now under way
    asked.append(ensureDeferred(blobs.serve(DummyRequest([b""]), other, digest, head=False)))
    for stage, request in zip(("while starting", "while under way"), asked):
        failure = request.result
        request.addErrback(lambda _: None)
        assert isinstance(failure.value, errors.RegistryError) and failure.value.status == 404, stage
    assert client.calls == 1 and client.heads == 2 and not storage.index.is_linked(digest, other.key)
