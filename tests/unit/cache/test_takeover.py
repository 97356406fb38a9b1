"""Takeover and stepping aside on a fake clock (issue 16): nodes share one store directory, their
leases run on the fake clock, and a response following a download whose source went away is
carried on from another source rather than cut.

Self-contained (its own small fakes) so that it does not depend on where other unit test files live.
"""
from __future__ import annotations

import json
import os
import time

import pytest
from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from metahub.cache.downloads import WRITE_BYTES, AlreadyStored, Downloads
from metahub.cache.manifests import Manifests
from metahub.cache.routing import Route
from metahub.config.file import UpstreamConfig
from metahub.oci import media
from metahub.oci.media import Manifest
from metahub.runtime.metrics import Metrics
from metahub.runtime.pools import ThreadPoolRunner
from metahub.upstream.client import ManifestHead
from metahub.upstream.upstreams import Upstreams
from metahub.web.blobs import Blobs
from metahub.web.site import _access_line
from metahub.web.streaming import send
from storage import (
    BlobFollower,
    FollowFailure,
    Leases,
    SharedTags,
    Storage,
    TempFileRemoved,
    parse_digest,
    sha256_digest,
)
from tests.unit.fakes import (
    FakeRequest,
    InlineLane,
    blob_endpoint,
    inline,
    join_now,
    store_capacity,
)
from tests.unit.loopback import Loopback

UPSTREAM = UpstreamConfig("local", "http://127.0.0.1:1", read_timeout=30.0)
ROUTE = Route(UPSTREAM, "team/app")
DATA = os.urandom(3 * WRITE_BYTES)
DIGEST = sha256_digest(DATA)
HALF = WRITE_BYTES + WRITE_BYTES // 2  # what lands before a holder dies: one piece, flushed at once


class Transport:
    def __init__(self) -> None:
        self.stopped = self.aborted = False

    def stopProducing(self) -> None:
        self.stopped = True

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def abortConnection(self) -> None:
        self.aborted = True


class Body:
    """An upstream response whose body the test feeds by hand."""

    def __init__(self) -> None:
        self.length = len(DATA)
        self.protocol = None
        self.transport = Transport()

    def deliverBody(self, protocol) -> None:
        self.protocol = protocol
        protocol.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def end(self) -> None:
        self.protocol.connectionLost(Failure(ResponseDone()))


class Upstream:
    def __init__(self) -> None:
        self.gets = self.heads = 0
        self.bodies: list[Deferred] = []

    def get_blob(self, repository: str, digest: str) -> Deferred:
        self.gets += 1
        self.bodies.append(Deferred())
        return self.bodies[-1]

    def head_blob(self, repository: str, digest: str) -> Deferred:
        self.heads += 1
        return succeed(len(DATA))

    def answer(self) -> Body:
        body = Body()
        self.bodies[-1].callback(body)
        return body


class HeldLane(InlineLane):
    """A lane whose jobs wait until :meth:`release`: a store that stalls, then answers again."""

    def __init__(self) -> None:
        self.held: list[tuple[tuple, Deferred]] = []
        self.holding = True

    def run(self, job, *args) -> Deferred:
        if not self.holding:
            return super().run(job, *args)
        done: Deferred = Deferred()
        self.held.append(((job, *args), done))
        return done

    def release(self) -> None:
        self.holding = False
        while self.held:
            (job, *args), done = self.held.pop(0)
            super().run(job, *args).chainDeferred(done)


class Node:
    def __init__(self, tmp_path, name: str, clock: Clock, lane: InlineLane | None = None) -> None:
        self.storage = Storage(str(tmp_path / "store"), str(tmp_path / f"index-{name}"), clock=clock.seconds)
        self.upstream = Upstream()
        self.metrics = Metrics()
        self.leases = Leases(str(tmp_path / "store"), clock=clock.seconds, node=name)
        upstreams = Upstreams(clients={"local": self.upstream}, metrics=self.metrics)  # type: ignore[dict-item]
        self.downloads = Downloads(storage=self.storage, upstreams=upstreams, clock=clock, in_thread=inline,
                                   index_writes=inline,
                                   metrics=self.metrics, leases=self.leases, lanes=lambda _: lane or InlineLane(),
                                   capacity=store_capacity(clock, self.metrics))
        self.blobs = blob_endpoint(storage=self.storage, upstreams=upstreams, downloads=self.downloads, clock=clock,
                                   metrics=self.metrics)

    def serve(self) -> tuple[FakeRequest, Deferred]:
        client = FakeRequest()
        return client, ensureDeferred(self.blobs.serve(client, ROUTE, DIGEST, head=False))

    def aborted(self) -> float:
        return sum(self.metrics.registry.get_sample_value("metahub_responses_aborted_total", {"reason": r.value})
                   for r in FollowFailure) or 0.0


def cluster(tmp_path, *names: str) -> tuple[Clock, list[Node]]:
    clock = Clock()
    clock.advance(time.time())  # temp files' mtimes are real time; the leases' clock must agree
    return clock, [Node(tmp_path, name, clock) for name in names]


def advance(clock: Clock, seconds: float, step: float = 0.5) -> None:
    for _ in range(int(seconds / step)):
        clock.advance(step)


def test_a_client_following_a_dead_holder_gets_the_whole_blob_from_the_node_that_takes_over(tmp_path) -> None:
    clock, (a, b) = cluster(tmp_path, "a", "b")
    _, holding = a.serve()
    a_body = a.upstream.answer()
    a_body.send(DATA[:HALF])
    client, served = b.serve()
    advance(clock, 1)
    assert b.upstream.gets == 0 and len(client.body()) > WRITE_BYTES  # B follows A's file
    dead = join_now(a.downloads, ROUTE, DIGEST)
    dead.heartbeat.stop()  # node A is killed: no heartbeat, its lease and file stay
    advance(clock, 29)
    assert b.upstream.gets == 0  # the lease is not stale yet
    advance(clock, 2)
    # Past lease_timeout B's watcher noticed by itself (no new request), took the lease and fetches.
    assert b.upstream.gets == 1 and b.leases.holder(parse_digest(DIGEST)).holder.startswith("b-")
    assert not os.path.exists(dead.temp_path)  # the dead holder's file is removed
    b_body = b.upstream.answer()
    b_body.send(DATA)
    b_body.end()
    advance(clock, 1)
    assert served.called and client.finished and not client.transport.aborted
    assert client.body() == DATA and b.aborted() == 0
    assert b.storage.blobs.stat(DIGEST).size == len(DATA)


def test_a_holder_that_lost_its_lease_steps_aside_and_its_clients_finish_from_the_taker(tmp_path) -> None:
    clock, (a, b) = cluster(tmp_path, "a", "b")
    client, served = a.serve()
    a_body = a.upstream.answer()
    a_body.send(DATA[:HALF])
    assert len(client.body()) > WRITE_BYTES
    stalled = join_now(a.downloads, ROUTE, DIGEST)
    stalled.heartbeat.stop()  # node A's store stalls: its heartbeats hang
    advance(clock, 31)
    _, taking = b.serve()  # a request on node B finds the lease stale and takes it over
    assert b.upstream.gets == 1 and not os.path.exists(stalled.temp_path)
    b_body = b.upstream.answer()
    b_body.send(DATA[:HALF])
    # The store answers again: node A's next heartbeat finds the lease is B's.
    ensureDeferred(a.downloads._heartbeat(stalled))
    assert a_body.transport.stopped  # A stops fetching...
    a_body.protocol.connectionLost(Failure(PotentialDataLoss()))
    advance(clock, 1)
    assert a.upstream.gets == 1 and a.upstream.heads == 1  # ...and follows B (a HEAD, no second GET)
    assert not served.called
    b_body.send(DATA[HALF:])
    b_body.end()
    advance(clock, 1)
    assert served.called and client.finished and not client.transport.aborted and client.body() == DATA
    assert a.aborted() == 0 and a.downloads.capacity.can_store()
    assert a.storage.blobs.stat(DIGEST) is not None and os.listdir(a.storage.blobs.tmp_dir) == []


class _BlobPage(Resource):
    """The blob, served by ``blobs`` (set once the connection, whose reactor it needs, exists)."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.blobs: Blobs | None = None
        self.served: Deferred | None = None

    def render_GET(self, request: Request) -> object:  # noqa: N802
        assert self.blobs is not None
        self.served = ensureDeferred(self.blobs.serve(request, ROUTE, DIGEST, head=False))
        return NOT_DONE_YET


def test_a_client_on_plain_tcp_gets_what_landed_by_sendfile_and_the_rest_from_the_taker(tmp_path, monkeypatch) -> None:
    """The holder that steps aside, its client on a real TCP connection: what landed in its own file
    goes by sendfile, the rest (from the node that took over, old bytes and new hashed) through the
    copy loop, and the client gets every byte in one response."""
    real_sendfile = os.sendfile
    by_sendfile: list[int] = []

    def counting(out_fd: int, in_fd: int, offset: int, count: int) -> int:
        by_sendfile.append(real_sendfile(out_fd, in_fd, offset, count))
        return by_sendfile[-1]

    monkeypatch.setattr(os, "sendfile", counting)
    clock, (a, b) = cluster(tmp_path, "a", "b")
    page = _BlobPage()
    client = Loopback(page)
    page.blobs = Blobs(cache=a.blobs.cache, clock=clock, metrics=a.metrics, read_in_thread=inline, fds=client.reactor)
    client.get()
    client.read_in_background(len(DATA))
    a_body = a.upstream.answer()
    a_body.send(DATA[:HALF])
    assert client.turn_until_body(HALF) == DATA[:HALF] and sum(by_sendfile) == HALF
    stalled = join_now(a.downloads, ROUTE, DIGEST)
    stalled.heartbeat.stop()  # node A's store stalls: its heartbeats hang
    advance(clock, 31)
    _, taking = b.serve()  # node B finds the lease stale and takes it over
    b_body = b.upstream.answer()
    b_body.send(DATA[:HALF])
    ensureDeferred(a.downloads._heartbeat(stalled))  # A's store answers again: it steps aside
    a_body.protocol.connectionLost(Failure(PotentialDataLoss()))
    advance(clock, 1)
    b_body.send(DATA[HALF:])
    b_body.end()
    advance(clock, 1)
    assert client.turn_until_body(len(DATA)) == DATA
    assert page.served is not None and page.served.called and client.transport.connected
    assert sum(by_sendfile) == HALF  # the successor hashes what it delivers: the copy loop's
    assert a.aborted() == 0 and os.listdir(a.storage.blobs.tmp_dir) == []
    client.close()


def test_a_holder_whose_commit_comes_after_the_takers_ends_cleanly(tmp_path) -> None:
    """The commit of a node whose store stalled finds the blob stored and its own file removed."""
    clock, (b,) = cluster(tmp_path, "b")
    lane = HeldLane()
    a = Node(tmp_path, "a", clock, lane)
    client, served = a.serve()
    a_body = a.upstream.answer()
    a_body.send(DATA)
    a_body.end()  # every byte arrived; writing, verifying and committing them wait for the store
    stalled = join_now(a.downloads, ROUTE, DIGEST)
    stalled.heartbeat.stop()  # and so do its heartbeats
    advance(clock, 31)
    _, taking = b.serve()
    b_body = b.upstream.answer()
    b_body.send(DATA)
    b_body.end()
    assert b.storage.blobs.stat(DIGEST) is not None and not os.path.exists(stalled.temp_path)
    errors: list[dict] = []
    observer = lambda event: errors.append(event) if event.get("log_failure") else None  # noqa: E731
    globalLogPublisher.addObserver(observer)
    try:
        lane.release()  # the store answers again: A's writes, verify and commit run
        advance(clock, 1)
    finally:
        globalLogPublisher.removeObserver(observer)
    assert errors == [] and stalled.finished.called
    # The store is not taken for failing (that would send the next requests around it).
    assert a.downloads.capacity.can_store()
    with pytest.raises(AlreadyStored):  # A's download is over: a new join finds the blob stored
        join_now(a.downloads, ROUTE, DIGEST)
    assert served.called and client.finished and client.body() == DATA


def test_a_commit_whose_file_was_removed_says_so(tmp_path) -> None:
    storage = Storage(str(tmp_path / "store"), str(tmp_path / "index"))
    writer = storage.blobs.writer(DIGEST, len(DATA))
    writer.write(DATA)
    os.unlink(writer.temp_path)  # a node that took the download over removed it
    try:
        writer.commit()
    except TempFileRemoved:
        pass
    else:
        raise AssertionError("a commit of a removed file must not pass")


def test_an_aborted_response_says_what_happened_and_is_counted(tmp_path) -> None:
    storage = Storage(str(tmp_path / "store"), str(tmp_path / "index"))
    writer = storage.blobs.writer(DIGEST, len(DATA))
    writer.write(DATA[:5000])
    follower = BlobFollower(storage.blobs, DIGEST, os.open(writer.temp_path, os.O_RDONLY), writer.temp_path)
    client = FakeRequest()
    reasons: list[str] = []
    lines: list[str] = []
    observer = lambda event: lines.append(str(event.get("why", ""))) if event.get("log_namespace", "").endswith("streaming") else None  # noqa: E731
    globalLogPublisher.addObserver(observer)
    try:
        def gone() -> Deferred:
            writer.abort()  # the followed file is deleted: no byte was wrong
            return succeed(None)

        done = ensureDeferred(send(client, follower, inline, lambda n: None, gone, len(DATA),
                                   on_abort=reasons.append))
    finally:
        globalLogPublisher.removeObserver(observer)
    assert done.result is False and client.transport.aborted
    assert reasons == ["source_removed"]
    assert any("removed" in line for line in lines) and not any("verify" in line for line in lines)
    assert client.metahub_aborted == "source_removed"


def test_the_access_log_marks_an_aborted_response() -> None:
    request = FakeRequest(uri=b"/v2/x")
    request.write(b"0123456789")
    assert "aborted" not in _access_line("[now]", request)
    request.metahub_aborted = "source_idle"
    assert _access_line("[now]", request).endswith(" aborted:source_idle")


def test_revalidating_a_tag_answers_before_the_shared_store_is_written(tmp_path) -> None:
    body = json.dumps({"schemaVersion": 2, "mediaType": media.OCI_MANIFEST, "layers": []}).encode()
    digest = sha256_digest(body)

    class Registry:
        def get_manifest(self, repository, reference, accept):
            return succeed(Manifest(body, media.OCI_MANIFEST, digest))

        def head_manifest(self, repository, reference, accept):
            return succeed(ManifestHead(digest, media.OCI_MANIFEST, len(body)))

    clock = Clock()
    storage = Storage(str(tmp_path / "store"), str(tmp_path / "index"), clock=clock.seconds)
    shared = SharedTags(str(tmp_path / "store"))
    stalled: list[Deferred] = []

    def in_thread(function, *args):
        if function == shared.write:  # the shared directory stalls
            stalled.append(Deferred())
            return stalled[-1]
        return succeed(function(*args))

    metrics = Metrics()
    upstreams = Upstreams(clients={"local": Registry()}, metrics=metrics)  # type: ignore[dict-item]
    manifests = Manifests(storage=storage, upstreams=upstreams, clock=clock, in_thread=in_thread,
                          index_writes=inline, metrics=metrics,
                          tag_ttl=300.0, shared_tags=shared, capacity=store_capacity(clock, metrics))
    assert ensureDeferred(manifests.by_tag(ROUTE, "1.0")).result.digest == digest  # resolved, not waiting
    clock.advance(301)
    assert ensureDeferred(manifests.by_tag(ROUTE, "1.0")).result.digest == digest  # revalidated, not waiting
    assert len(stalled) == 1  # the second write waits for the first, not beside it in another thread
    stalled[0].callback(None)
    assert len(stalled) == 2  # the newer confirmation is written after
    stalled[1].callback(None)
    assert manifests._sharing == {}


def test_store_io_runs_on_threads_of_its_own() -> None:
    from twisted.internet import reactor

    pool = ThreadPoolRunner(reactor, 2, "test-store")
    assert pool.pool is not reactor.getThreadPool() and pool.limit == 2


def test_io_threads_is_a_whole_number_of_at_least_one(tmp_path) -> None:
    from metahub.config.file import ConfigError, parse_config

    def config(**storage) -> dict:
        return {"storage": {"path": str(tmp_path / "store"), "index": str(tmp_path / "index"), **storage},
                "upstreams": {"docker.io": {"url": "https://registry-1.docker.io"}}}

    assert parse_config(config(), str(tmp_path)).storage.io_threads is None  # sized from the cores
    assert parse_config(config(io_threads=3), str(tmp_path)).storage.io_threads == 3
    for bad in (0, 2.5, "many", True):
        try:
            parse_config(config(io_threads=bad), str(tmp_path))
        except ConfigError as error:
            assert "storage.io_threads" in str(error)
        else:
            raise AssertionError(f"io_threads={bad!r} was accepted")


def test_a_dead_holders_file_written_after_its_last_heartbeat_is_removed_later(tmp_path) -> None:
    clock, (a, b) = cluster(tmp_path, "a", "b")
    a.serve()
    a_body = a.upstream.answer()
    a_body.send(DATA[:HALF])
    dead = join_now(a.downloads, ROUTE, DIGEST)
    dead.heartbeat.stop()  # killed...
    advance(clock, 31)
    last_write = clock.seconds() - 10  # ...after writing once more, past its last heartbeat
    os.utime(dead.temp_path, (last_write, last_write))
    b.serve()
    assert b.upstream.gets == 1 and os.path.exists(dead.temp_path)  # too fresh to be sure at takeover
    b_body = b.upstream.answer()
    ours = join_now(b.downloads, ROUTE, DIGEST).temp_path
    advance(clock, 20)
    b_body.send(DATA[:1000])  # a live download (ours) is never removed
    advance(clock, 10.5)
    assert not os.path.exists(dead.temp_path) and os.path.exists(ours)  # gone once it cannot be live
