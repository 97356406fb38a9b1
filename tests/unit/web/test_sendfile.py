"""The zero-copy path: which responses take it, and the producer that sends them: a cached blob, and
a download as it lands (what has landed, waiting for more, the final byte only once verified).

The producer is tested on a real loopback TCP connection (tests/unit/loopback.py); the jobs run
inline, on the test's thread, unless a test holds them.
"""
from __future__ import annotations

import errno
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from twisted.internet import tcp
from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.ssl import CertificateOptions
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.test.iosim import FakeTransport
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from metahub.cache.blobs import Following, Recover, WaitForMore
from metahub.config.file import HttpConfig
from metahub.web import sendfile
from metahub.web.sendfile import (
    BlobTruncated,
    send_file,
    send_following,
    zero_copy_socket,
)
from metahub.web.site import RegistrySite
from storage import (
    BlobFollower,
    BlobReader,
    BlobStore,
    DigestMismatch,
    FollowState,
    sha256_digest,
)
from tests.unit.fakes import inline
from tests.unit.loopback import PEER, Loopback, socket_pair

MiB = 1 << 20


def _blob(store: BlobStore, data: bytes) -> str:
    with store.writer(sha256_digest(data), len(data)) as writer:
        writer.write(data)
        writer.commit()
    return writer.digest


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


class HeldJobs:
    """A ``ThreadRunner`` whose jobs run only when the test says so."""

    def __init__(self) -> None:
        self.pending: list[tuple[Deferred[Any], Callable[..., Any], tuple[Any, ...]]] = []

    def __call__(self, function: Callable[..., Any], *args: Any) -> Deferred[Any]:
        done: Deferred[Any] = Deferred()
        self.pending.append((done, function, args))
        return done

    def run_one(self) -> None:
        done, function, args = self.pending.pop(0)
        try:
            result = function(*args)
        except Exception:
            done.errback(Failure())
        else:
            done.callback(result)


class _BlobPage(Resource):
    """Serves ``reader`` (opened by the test) the way Blobs does, through send_file."""

    isLeaf = True

    def __init__(self, served: Served) -> None:
        super().__init__()
        self.served = served

    def render_GET(self, request: Request) -> object:  # noqa: N802
        served = self.served
        reader = served.reader
        assert reader is not None
        request.setResponseCode(206 if reader.start else 200)
        request.setHeader("Content-Length", str(reader.end - reader.start))
        connection = zero_copy_socket(request, reader)
        assert connection is not None
        served.request = request
        served.result = ensureDeferred(send_file(
            request, reader, connection, served.in_thread, served.reactor, served.counted.append,
        ))
        served.result.addBoth(served.closed_reader)
        return NOT_DONE_YET


class _FollowPage(Resource):
    """Serves ``following`` (a download the test writes) the way Blobs does, through send_following."""

    isLeaf = True

    def __init__(self, served: Served) -> None:
        super().__init__()
        self.served = served

    def render_GET(self, request: Request) -> object:  # noqa: N802
        served = self.served
        following = served.following
        assert following is not None and following.size is not None
        request.setResponseCode(200)
        request.setHeader("Content-Length", str(following.size))
        connection = zero_copy_socket(request, following.follower)
        assert connection is not None
        served.request = request
        served.result = ensureDeferred(send_following(
            request, following, connection, served.in_thread, served.reactor, served.counted.append,
            served.aborts.append,
        ))
        served.result.addBoth(served.closed_reader)
        return NOT_DONE_YET


class Served(Loopback):
    """One GET of a blob (or of a download, ``following``) over a real TCP connection."""

    def __init__(self, reader: BlobReader | None, in_thread: Any = inline, following: Following | None = None) -> None:
        self.reader = reader
        self.following = following
        self.in_thread = in_thread
        self.counted: list[int] = []
        self.aborts: list[str] = []
        self.request: Request | None = None
        self.result: Deferred[bool] | None = None
        self.outcome: object = None
        super().__init__(_BlobPage(self) if following is None else _FollowPage(self))

    def closed_reader(self, outcome: object) -> None:
        if self.reader is not None:
            self.reader.close()
        self.outcome = outcome  # a Failure is the test's to look at

    def turn_until_done(self, limit: int = 10_000) -> None:
        assert self.result is not None
        for _ in range(limit):
            if self.result.called:
                break
            self.turn()
        assert self.result.called


@pytest.fixture
def store(tmp_path) -> BlobStore:
    return BlobStore(str(tmp_path))


def _head_and_body(raw: bytes) -> tuple[bytes, bytes]:
    head, separator, body = raw.partition(b"\r\n\r\n")
    assert separator
    return head, body


# --- the decision --------------------------------------------------------------------------------


def _site() -> RegistrySite:
    return RegistrySite(Resource(), HttpConfig(), reactor=Clock())


def _request_on(transport: object) -> Request:
    channel = _site().buildProtocol(PEER)
    assert channel is not None
    channel.makeConnection(transport)
    return _request_of(channel)


def _request_of(channel: HTTPChannel) -> Request:
    request = Request(channel)
    request.method = b"GET"
    request.setHeader("Content-Length", "10")
    return request


@pytest.fixture
def reader(store) -> Iterator[BlobReader]:
    with store.open(_blob(store, b"0123456789")) as opened:
        yield opened


@pytest.fixture
def tcp_transport() -> Iterator[tcp.Server]:
    server, client = socket_pair()
    transport = tcp.Server(server, HTTPChannel(), ("127.0.0.1", 40000), None, 1, MemoryReactorClock())
    yield transport
    client.close()
    server.close()


def test_a_committed_blob_on_plain_tcp_is_sent_from_its_socket(reader, tcp_transport) -> None:
    request = _request_on(tcp_transport)
    assert zero_copy_socket(request, reader) is tcp_transport.getHandle()


def test_tls_keeps_the_copy_loop(reader, tcp_transport) -> None:
    wrapper = TLSMemoryBIOFactory(CertificateOptions(), False, _site()).buildProtocol(PEER)
    assert wrapper is not None
    wrapper.makeConnection(tcp_transport)  # TLS over the very TCP connection that qualifies bare
    request = _request_of(wrapper.wrappedProtocol)  # the channel, on the TLS wrapper
    assert request.transport is wrapper
    assert zero_copy_socket(request, reader) is None


def test_a_connection_that_started_tls_keeps_the_copy_loop(reader, tcp_transport) -> None:
    request = _request_on(tcp_transport)
    tcp_transport.startTLS(CertificateOptions())
    assert zero_copy_socket(request, reader) is None


def test_a_follower_of_this_nodes_download_is_sent_from_its_socket(store, tcp_transport) -> None:
    follower = store.follow(_blob(store, b"being written, as far as the follower knows"))
    assert follower is not None
    try:
        assert zero_copy_socket(_request_on(tcp_transport), follower) is tcp_transport.getHandle()
    finally:
        follower.close()


def test_a_follower_that_hashes_what_it_delivers_keeps_the_copy_loop(store, tcp_transport) -> None:
    follower = store.follow(_blob(store, b"another node's file, or a response carried on"))
    assert follower is not None
    follower.verify_bytes = True
    try:
        assert zero_copy_socket(_request_on(tcp_transport), follower) is None
    finally:
        follower.close()


def test_head_and_unsized_responses_keep_the_copy_loop(reader, tcp_transport) -> None:
    request = _request_on(tcp_transport)
    request.method = b"HEAD"
    assert zero_copy_socket(request, reader) is None
    request = _request_of(request.channel)
    request.responseHeaders.removeHeader("Content-Length")
    assert zero_copy_socket(request, reader) is None


def test_a_transport_without_a_socket_keeps_the_copy_loop(reader) -> None:
    channel = HTTPChannel()
    transport = FakeTransport(channel, isServer=True)  # what treq's StubTreq serves on
    assert zero_copy_socket(_request_on(transport), reader) is None


# --- the producer ------------------------------------------------------------------------------


def test_the_headers_leave_the_transport_before_the_first_body_byte(store) -> None:
    data = os.urandom(3 * MiB + 17)
    jobs = HeldJobs()
    served = Served(store.open(_blob(store, data)), jobs)
    served.get()
    # The headers wait in the transport (the reactor has not let it write); no body byte is asked for.
    assert jobs.pending == [] and select.select([served.client], [], [], 0)[0] == []
    served.read_in_background(len(data))
    served.turn()  # the transport sends the headers, drains and asks its producer for more
    assert len(jobs.pending) == 1
    while jobs.pending:
        jobs.run_one()
        served.turn()
    served.turn_until_done()
    head, body = _head_and_body(served.join())
    assert head.startswith(b"HTTP/1.1 200 OK") and b"Content-Length: %d" % len(data) in head
    assert body == data
    assert served.outcome is True and served.request is not None and served.request.finished
    assert served.request.sentLength == len(data) and sum(served.counted) == len(data)
    # The channel has the transport's producer slot back, as a streaming producer.
    assert served.transport.producer is served.channel and served.transport.streamingProducer
    served.close()


def test_a_range_is_sent_from_its_offset(store) -> None:
    data = os.urandom(5 * MiB)
    start, end = 1_234_567, 4 * MiB + 3
    served = Served(store.open(_blob(store, data), start, end))
    served.get()
    served.read_in_background(end - start)
    served.turn_until_done()
    head, body = _head_and_body(served.join())
    assert head.startswith(b"HTTP/1.1 206")
    assert body == data[start:end]
    assert served.outcome is True and sum(served.counted) == end - start
    served.close()


def test_the_connection_serves_the_next_request_after_a_body(store) -> None:
    data = os.urandom(MiB)
    digest = _blob(store, data)
    served = Served(store.open(digest))
    served.get()
    served.read_in_background(len(data))
    served.turn_until_done()
    first = served.join()
    served.reader = store.open(digest, 10)
    served.received.clear()
    served.get()  # keep-alive: the same channel takes the next request
    served.read_in_background(len(data) - 10)
    served.turn_until_done()
    assert _head_and_body(first)[1] == data
    assert _head_and_body(served.join())[1] == data[10:]
    served.close()


def test_a_client_that_does_not_read_gives_the_thread_back(store, monkeypatch) -> None:
    monkeypatch.setattr(sendfile, "POLL_WAIT", 0.01)
    data = os.urandom(32 * MiB)  # far more than the socket buffers hold
    served = Served(store.open(_blob(store, data)))
    served.get()
    served.turn()  # headers out; the job fills the socket, waits, and gives its thread back
    watching = [w for w in served.reactor.getWriters() if w is not served.transport]
    assert len(watching) == 1 and not served.result.called
    assert 0 < sum(served.counted) < len(data)
    served.read_in_background(len(data))  # the client reads again: the reactor resumes the jobs
    served.turn_until_done()
    assert _head_and_body(served.join())[1] == data
    assert served.reactor.getWriters() == []
    served.close()


def test_a_client_that_reads_slowly_holds_a_job_no_longer_than_its_time(tmp_path) -> None:
    """A reader that frees a little room within every POLL_WAIT must not pin the thread for the
    whole slice (32 MiB at 6 MB/s would be 5 s): past JOB_SECONDS the job hands the socket to the
    reactor."""
    path = tmp_path / "blob"
    path.write_bytes(os.urandom(32 * MiB))
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    for sock, option in ((server, socket.SO_SNDBUF), (client, socket.SO_RCVBUF)):
        sock.setsockopt(socket.SOL_SOCKET, option, 64 << 10)
    server.setblocking(False)
    reading = threading.Event()
    reading.set()

    def read_slowly() -> None:  # about 6 MB/s: steady, never quiet for POLL_WAIT
        while reading.is_set():
            client.recv(64 << 10)
            threading.Event().wait(0.01)

    reader_thread = threading.Thread(target=read_slowly, daemon=True)
    reader_thread.start()
    with open(path, "rb") as blob:
        started = time.monotonic()
        sent, end = sendfile.send_slice(server.fileno(), blob.fileno(), 0, 32 * MiB, threading.Event())
        took = time.monotonic() - started
    reading.clear()
    server.close()
    reader_thread.join(5)
    client.close()
    assert end is sendfile.Slice.BLOCKED and 0 < sent < 32 * MiB
    assert took < sendfile.JOB_SECONDS + 0.9, f"the job held its thread for {took:.1f} s"


def test_a_client_leaving_mid_body_stops_it_and_leaks_no_descriptor(store, monkeypatch) -> None:
    monkeypatch.setattr(sendfile, "POLL_WAIT", 0.01)
    data = os.urandom(32 * MiB)
    digest = _blob(store, data)
    before = _open_fds()
    served = Served(store.open(digest))
    served.get()
    served.turn()
    assert not served.result.called
    served.close()  # the client goes; Twisted's transport tells its producer, then the request
    assert served.outcome is False and served.request is not None and not served.request.finished
    assert served.reactor.getWriters() == []
    assert _open_fds() == before


def test_a_client_leaving_while_a_job_runs_ends_only_after_the_job(store, monkeypatch) -> None:
    monkeypatch.setattr(sendfile, "POLL_WAIT", 30.0)  # a slow reader thread must not end the first job early
    data = os.urandom(32 * MiB)
    jobs = HeldJobs()
    before = _open_fds()
    served = Served(store.open(_blob(store, data)), jobs)
    served.get()
    served.turn()
    served.read_in_background(len(data))
    jobs.run_one()  # one slice sent
    assert len(jobs.pending) == 1
    served.close()  # gone while the next job waits for its thread
    assert served.outcome is None  # the job still holds the file and the socket
    jobs.run_one()  # it sees the stop at once and sends nothing
    assert served.outcome is False and sum(served.counted) == sendfile.SLICE
    assert jobs.pending == [] and _open_fds() == before


def test_a_reset_seen_first_by_a_job_closes_the_connection_quietly(store, monkeypatch) -> None:
    monkeypatch.setattr(sendfile, "POLL_WAIT", 0.01)
    data = os.urandom(32 * MiB)
    served = Served(store.open(_blob(store, data)))
    served.get()
    served.turn()  # blocked: the client reads nothing
    served.client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    served.client.close()  # a reset, which the reactor (not turned) has not read
    served.turn()  # the watched socket is "writable" (it has an error): the job meets the reset
    assert served.outcome is False
    served.reactor.advance(0)  # Twisted's abortConnection loses the connection on the next turn
    assert not served.transport.connected and served.request is not None and not served.request.finished


def test_a_truncated_file_fails_the_response(store) -> None:
    data = os.urandom(2 * MiB)
    digest = _blob(store, data)
    served = Served(store.open(digest))
    os.truncate(store.path(digest), MiB)  # what no committed blob should ever see
    served.get()
    served.read_in_background(len(data))
    served.turn_until_done()
    assert isinstance(served.outcome, Failure) and served.outcome.check(BlobTruncated)
    assert served.transport.producer is served.channel  # in place for the abort that follows
    served.outcome = None  # handled
    served.close()


def test_a_hang_up_seen_by_the_reactor_watching_the_socket_ends_the_body(store, monkeypatch) -> None:
    monkeypatch.setattr(sendfile, "POLL_WAIT", 0.01)
    served = Served(store.open(_blob(store, os.urandom(32 * MiB))))
    served.get()
    served.turn()  # blocked: the reactor watches the socket
    (watching,) = [w for w in served.reactor.getWriters() if w is not served.transport]
    watching.connectionLost(Failure(ConnectionDone()))  # what the reactor does on EPOLLHUP
    assert served.outcome is False and served.reactor.getWriters() == []
    served.reactor.advance(0)  # the connection is aborted, as after a failed write
    assert not served.transport.connected


def test_a_store_that_cannot_sendfile_carries_on_through_the_copy_loop(store, monkeypatch) -> None:
    data = os.urandom(3 * MiB)
    real = os.sendfile
    calls: list[int] = []

    def refusing_after_one(out_fd: int, in_fd: int, offset: int, count: int) -> int:
        calls.append(offset)
        if len(calls) > 1:  # as a FUSE file would at once: here after a first piece, to see the hand-over
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(out_fd, in_fd, offset, min(count, 100_000))

    monkeypatch.setattr(os, "sendfile", refusing_after_one)
    served = Served(store.open(_blob(store, data)))
    served.get()
    served.read_in_background(len(data))
    served.turn_until_done()
    assert _head_and_body(served.join())[1] == data
    assert served.outcome is True and sum(served.counted) == len(data)
    assert served.request is not None and served.request.sentLength == len(data)
    served.close()


def test_a_read_error_fails_the_response_with_the_channel_in_place(store, monkeypatch) -> None:
    def failing(out_fd: int, in_fd: int, offset: int, count: int) -> int:
        raise OSError(errno.EIO, "Input/output error")  # a store that fails under us

    monkeypatch.setattr(os, "sendfile", failing)
    served = Served(store.open(_blob(store, os.urandom(MiB))))
    served.get()
    served.turn_until_done()
    assert isinstance(served.outcome, Failure) and served.outcome.value.errno == errno.EIO
    assert served.transport.producer is served.channel
    served.close()


def test_a_client_hanging_up_once_it_has_the_last_byte_gets_a_whole_logged_response(store, monkeypatch) -> None:
    # The race CI met: the last job sends the last byte, the client (curl) reads it and closes, and
    # the reactor sees the hang-up before the job's result comes back from its thread.
    data = os.urandom(1000)
    jobs = HeldJobs()
    served = Served(store.open(_blob(store, data)), jobs)
    logged: list[Request] = []
    monkeypatch.setattr(served.channel.factory, "log", logged.append)
    served.get()
    served.turn()  # the headers
    served.turn()
    served.read_in_background(len(data))
    done, function, args = jobs.pending.pop(0)
    result = function(*args)  # the whole body is in the socket
    assert served.join().endswith(data)
    served.close()  # the hang-up reaches the transport first
    assert served.outcome is None
    done.callback(result)
    assert served.outcome is True and sum(served.counted) == len(data)
    assert logged == [served.request] and served.request.sentLength == len(data)


# --- a download, as it lands -------------------------------------------------------------------


class Download:
    """A download in progress as its followers see it: the lane's writer, written by the test, and
    a ``wait_for_more`` whose waits the test ends, vouching once the bytes verified (as
    metahub.cache.blobs.wait_for_more does for this node's download)."""

    def __init__(self, store: BlobStore, data: bytes) -> None:
        self.data = data
        self.writer = store.writer(sha256_digest(data), len(data))
        self.follower = BlobFollower(store, self.writer.digest, os.open(self.writer.temp_path, os.O_RDONLY),
                                     self.writer.temp_path)
        self.waits: list[Deferred[None]] = []
        self.verified = False

    def wait_for_more(self) -> Deferred[None]:
        self.waits.append(Deferred())
        return self.waits[-1]

    def land(self, end: int) -> None:
        self.writer.write(self.data[self.writer.bytes_written:end])

    def verify(self) -> None:
        self.writer.verify()
        self.verified = True

    def wake(self) -> None:
        if self.verified:
            self.follower.vouch(self.writer.bytes_written)
        self.waits.pop(0).callback(None)

    def following(self, resume: Recover | None = None) -> Following:
        return Following(self.follower, len(self.data), self.wait_for_more, resume or (lambda old: succeed(None)))


@pytest.fixture
def by_sendfile(monkeypatch) -> list[int]:
    """The bytes each sendfile call sent."""
    real = os.sendfile
    sent: list[int] = []

    def counting(out_fd: int, in_fd: int, offset: int, count: int) -> int:
        sent.append(real(out_fd, in_fd, offset, count))
        return sent[-1]

    monkeypatch.setattr(os, "sendfile", counting)
    return sent


def test_a_follower_gets_what_has_landed_waits_and_its_final_byte_only_once_verified(store, by_sendfile) -> None:
    data = os.urandom(3 * MiB + 5)
    download = Download(store, data)
    download.land(MiB)
    served = Served(None, following=download.following())
    served.get()
    served.read_in_background(len(data))
    served.turn()  # the headers, then what has landed; then the body waits for more
    assert served.turn_until_body(MiB) == data[:MiB]
    assert len(download.waits) == 1 and sum(by_sendfile) == MiB and not served.result.called
    download.land(len(data))
    download.wake()
    # Every byte but the final one by sendfile; the copy loop holds that one until the blob verifies.
    assert served.turn_until_body(len(data) - 1) == data[:-1]
    assert sum(by_sendfile) == len(data) - 1 and len(download.waits) == 1
    for _ in range(20):
        served.turn()
    assert served.body_so_far() == data[:-1] and not served.result.called
    download.verify()
    download.wake()
    served.turn_until_done()
    served.turn_until_body(len(data))  # the copy loop's last byte leaves the transport
    assert _head_and_body(served.join())[1] == data
    assert served.outcome is True and served.request is not None and served.request.finished
    assert sum(served.counted) == len(data) and served.request.sentLength == len(data)
    assert served.transport.producer is served.channel and download.follower.fileno() == -1
    download.writer.commit()
    served.close()


def test_a_download_that_does_not_verify_never_gives_its_final_byte(store, by_sendfile) -> None:
    data = os.urandom(2 * MiB)
    download = Download(store, data)
    download.data = data[:-1] + bytes([data[-1] ^ 1])  # the last byte arrives wrong
    download.land(len(data))
    served = Served(None, following=download.following())
    served.get()
    served.read_in_background(len(data))
    served.turn()
    assert served.turn_until_body(len(data) - 1) == data[:-1]
    with pytest.raises(DigestMismatch):
        download.verify()  # the writer refuses it and removes its file: the follower sees it fail
    download.wake()
    for _ in range(20):
        served.turn()
    served.reactor.advance(0)
    assert served.outcome is False and served.aborts == ["source_removed"]
    assert served.body_so_far() == data[:-1] and not served.transport.connected


def test_a_client_leaving_while_its_follower_waits_ends_the_body_at_once(store) -> None:
    before = _open_fds()
    data = os.urandom(2 * MiB)
    download = Download(store, data)
    download.land(MiB)
    served = Served(None, following=download.following())
    served.get()
    served.read_in_background(len(data))
    served.turn()
    served.turn_until_body(MiB)
    assert len(download.waits) == 1
    served.close()  # gone while the body waits for the download
    assert served.outcome is False and served.request is not None and not served.request.finished
    assert served.reactor.getWriters() == [] and download.follower.fileno() == -1
    download.land(len(data))
    download.wake()  # the wait ends after the body: it finds nothing to do
    assert download.waits == []
    download.writer.abort()
    assert _open_fds() == before


def test_a_client_leaving_mid_follow_while_a_job_runs_stops_it(store, monkeypatch) -> None:
    monkeypatch.setattr(sendfile, "POLL_WAIT", 30.0)
    data = os.urandom(32 * MiB)
    download = Download(store, data)
    download.land(len(data))
    jobs = HeldJobs()
    served = Served(None, jobs, following=download.following())
    served.get()
    served.turn()
    served.read_in_background(len(data))
    jobs.run_one()  # one slice sent
    served.close()  # gone while the next job waits for its thread
    assert served.outcome is None and download.follower.fileno() >= 0  # the job still holds the file
    jobs.run_one()
    assert served.outcome is False and sum(served.counted) == sendfile.SLICE
    assert jobs.pending == [] and download.follower.fileno() == -1
    download.writer.abort()


def test_a_follower_whose_file_goes_away_carries_on_from_a_successor(store, by_sendfile) -> None:
    """A takeover: the followed file is removed (its download stepped aside); the response goes on
    from the download that took over, as BlobCache's resume gives it, hashing old bytes and new."""
    data = os.urandom(2 * MiB + 3)
    download = Download(store, data)
    download.land(MiB)
    taker = Download(store, data)  # the download that takes over, from the first byte
    taker.follower.close()
    resumed: list[BlobFollower] = []

    def resume(old: BlobFollower) -> Deferred[tuple[BlobFollower, WaitForMore] | None]:
        successor = BlobFollower(store, taker.writer.digest, os.open(taker.writer.temp_path, os.O_RDONLY),
                                 taker.writer.temp_path)
        successor.carry_on(old.position, old.delivered_hash())
        resumed.append(successor)
        return succeed((successor, taker.wait_for_more))

    served = Served(None, following=download.following(resume))
    served.get()
    served.read_in_background(len(data))
    served.turn()
    assert served.turn_until_body(MiB) == data[:MiB]
    download.writer.abort()  # stepped aside: its file goes, no byte was wrong
    download.wake()
    assert len(resumed) == 1 and resumed[0].position == MiB  # from the byte the client has
    assert len(taker.waits) == 1  # the successor has nothing new yet
    taker.land(len(data))
    taker.writer.commit()
    taker.wake()
    served.turn_until_done()
    served.turn_until_body(len(data))
    assert _head_and_body(served.join())[1] == data
    assert served.outcome is True and served.aborts == [] and resumed[0].state is FollowState.COMMITTED
    assert sum(by_sendfile) == MiB  # the successor hashes what it delivers: the copy loop's
    assert sum(served.counted) == len(data) and resumed[0].fileno() == -1
    served.close()


def test_a_pool_that_refuses_the_job_fails_the_response_and_frees_the_descriptor(store) -> None:
    # At shutdown the read pool is stopped, and a job asked of it raises at once (AlreadyQuit):
    # the body must end (its follower closed, its duplicate descriptor freed), not hang.
    def stopped(function: Callable[..., Any], *args: Any) -> Deferred[Any]:
        raise RuntimeError("the pool has stopped")

    before = _open_fds()
    served = Served(store.open(_blob(store, os.urandom(MiB))), stopped)
    served.get()
    served.turn_until_done()
    assert isinstance(served.outcome, Failure) and served.outcome.check(RuntimeError)
    assert served.transport.producer is served.channel
    served.close()
    assert _open_fds() == before
