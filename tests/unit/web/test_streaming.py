"""Sending blob bytes: a paused client stops the reading; unverified bytes never complete a response."""
from __future__ import annotations

import pytest
from twisted.internet.defer import Deferred, ensureDeferred, succeed

from metahub.web.streaming import CHUNK, FOLLOW_CHUNK, send
from storage import BlobStore, DigestMismatch, sha256_digest
from tests.unit.fakes import FakeRequest, inline


class Wakeups:
    """A ``wait_for_more`` whose waits the test ends by hand."""

    def __init__(self) -> None:
        self.pending: list[Deferred] = []

    def __call__(self) -> Deferred:
        self.pending.append(Deferred())
        return self.pending[-1]

    def wake(self) -> None:
        self.pending[-1].callback(None)


class CountingSource:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.reads = 0
        self.closed = False

    def read(self, n: int) -> bytes:
        self.reads += 1
        chunk, self.data = self.data[:n], self.data[n:]
        return chunk

    def close(self) -> None:
        self.closed = True


def test_a_paused_client_stops_the_reading_after_one_chunk_read_ahead() -> None:
    source = CountingSource(b"x" * (10 * CHUNK))
    request = FakeRequest(limit=CHUNK)
    counted: list[int] = []
    done = ensureDeferred(send(request, source, inline, counted.append))
    # Paused after one chunk; the next was read while it drains, and nothing beyond.
    assert len(request.written) == 1 and source.reads == 2
    assert not done.called
    for expected in range(2, 11):
        request.drain()
        assert len(request.written) == expected and source.reads == expected + 1
    request.drain()
    assert done.result is True and request.finished and source.closed
    assert sum(counted) == 10 * CHUNK


def test_a_follower_reads_nothing_ahead_while_paused(tmp_path) -> None:
    store = BlobStore(str(tmp_path))
    data = b"f" * (3 * FOLLOW_CHUNK)
    with store.writer(sha256_digest(data), len(data)) as writer:
        writer.write(data)
        writer.commit()
    follower = store.follow(writer.digest)
    reads: list[int] = []

    def counting(function, *args):
        reads.append(args[0])
        return inline(function, *args)

    request = FakeRequest(limit=FOLLOW_CHUNK)
    done = ensureDeferred(send(request, follower, counting, lambda n: None, lambda: succeed(None), len(data)))
    assert len(request.written) == 1 and reads == [FOLLOW_CHUNK]  # one small piece in memory per follower
    request.drain()
    assert len(request.written) == 2 and len(reads) == 2
    request.drain()  # the last piece fits under the limit with its final byte held: no pause
    assert b"".join(request.written) == data and done.result is True


def test_a_client_that_goes_away_stops_the_send() -> None:
    source = CountingSource(b"x" * (4 * CHUNK))
    request = FakeRequest(limit=CHUNK)
    done = ensureDeferred(send(request, source, inline, lambda n: None))
    request.producer.stopProducing()
    assert done.result is False and not request.finished and source.closed and source.reads == 2


def test_follower_holds_the_last_chunk_until_the_write_commits(tmp_path) -> None:
    store = BlobStore(str(tmp_path))
    data = b"a" * 1000
    writer = store.writer(sha256_digest(data), len(data))
    follower = store.follow(writer.digest)
    request = FakeRequest()
    wait_for_more = Wakeups()
    done = ensureDeferred(send(request, follower, inline, lambda n: None, wait_for_more))
    writer.write(data)
    wait_for_more.wake()
    assert b"".join(request.written) == b""  # all bytes landed, none verified yet: held back
    writer.commit()
    wait_for_more.wake()
    assert b"".join(request.written) == data and request.finished and done.result is True


def test_follower_of_a_corrupt_download_aborts_the_response(tmp_path) -> None:
    store = BlobStore(str(tmp_path))
    writer = store.writer(sha256_digest(b"good" * 100))
    follower = store.follow(writer.digest)
    request = FakeRequest()
    wait_for_more = Wakeups()
    done = ensureDeferred(send(request, follower, inline, lambda n: None, wait_for_more))
    writer.write(b"evil" * 100)
    wait_for_more.wake()
    with pytest.raises(DigestMismatch):
        writer.commit()
    wait_for_more.wake()
    assert done.result is False
    assert request.transport.aborted and not request.finished


def test_follower_of_a_known_size_holds_back_only_the_final_byte(tmp_path) -> None:
    store = BlobStore(str(tmp_path))
    data = bytes(range(256)) * (CHUNK // 256 + 10)  # a chunk and a bit
    writer = store.writer(sha256_digest(data), len(data))
    follower = store.follow(writer.digest)
    request = FakeRequest()
    wait_for_more = Wakeups()
    done = ensureDeferred(send(request, follower, inline, lambda n: None, wait_for_more, len(data)))
    writer.write(data)
    wait_for_more.wake()
    assert b"".join(request.written) == data[:-1]  # everything but the verdict's byte
    assert not request.finished
    writer.commit()
    wait_for_more.wake()
    assert b"".join(request.written) == data and request.finished and done.result is True


def test_follower_of_a_known_size_that_fails_never_gets_its_final_byte(tmp_path) -> None:
    store = BlobStore(str(tmp_path))
    good, evil = b"good" * 100, b"evil" * 100
    writer = store.writer(sha256_digest(good), len(good))
    follower = store.follow(writer.digest)
    request = FakeRequest()
    wait_for_more = Wakeups()
    done = ensureDeferred(send(request, follower, inline, lambda n: None, wait_for_more, len(good)))
    writer.write(evil)
    wait_for_more.wake()
    assert len(b"".join(request.written)) == len(evil) - 1
    with pytest.raises(DigestMismatch):
        writer.commit()
    wait_for_more.wake()
    assert done.result is False and request.transport.aborted and not request.finished
