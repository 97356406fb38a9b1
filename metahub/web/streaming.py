"""Send blob bytes to a client with backpressure, never holding more than a chunk or two in memory.

This is the copy loop: for TLS connections, followers that hash what they deliver (another node's
download, a response carried on from another source), and any transport without a socket. On plain
TCP a committed blob, and this node's download up to its final byte, go out with ``sendfile``
instead (:mod:`metahub.web.sendfile`), which hands the rest of a download to this loop.

Reads happen in a thread (the store may be on a shared filesystem that stalls), in large chunks so
the thread hop is paid rarely. The transport pauses us as soon as a chunk is buffered (past
Twisted's 64 KiB ``bufferSize``) and resumes us when it has drained. For a committed blob the next
chunk is read while the last one drains, so reading and sending overlap with two chunks in memory;
a follower of a download reads only after the drain, so the twenty clients of a fan-in hold one
small chunk each. For a blob still being downloaded the final byte (the latest chunk, when the
size is unknown) is held back until the write has verified: a client must never receive a complete
response whose bytes did not. If they did not, the connection is aborted instead.

When the followed file goes away without a byte being wrong (its writer died, stalled past its
lease, or stepped aside), ``recover`` is asked for a successor that carries on from the same byte
(another node's download, one this node takes over, or the committed blob), which verifies the
whole blob, old bytes and new, before the response completes. The client sees one slow response.
A response that cannot go on is aborted, and says why: in the log, in the access log line
(``aborted:<reason>``) and in ``metahub_responses_aborted{reason}``.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Protocol as TypingProtocol

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.web.server import Request
from zope.interface import implementer

from metahub.cache.blobs import Recover, WaitForMore
from metahub.runtime.threads import ThreadRunner
from metahub.web.connection import abort
from storage import BlobFollower, FollowFailure, FollowState

log = Logger()

#: Bytes per read of a committed blob: two chunks (one draining, one read ahead) per response.
CHUNK = 1 << 20
#: Bytes per read of a download in progress: the twenty clients of a fan-in each hold one, and a
#: smaller piece costs only more thread hops, which are cheap beside the upstream transfer.
FOLLOW_CHUNK = 256 << 10


#: How many times one response may move to a new source: a node dying, then its successor too.
MAX_RECOVERIES = 3

#: What the log says when a response is aborted, by reason (the metric's label).
ABORTED = {
    FollowFailure.MISMATCH.value: "the bytes of the blob being downloaded did not verify",
    FollowFailure.REMOVED.value: "the file being followed was removed and the blob was not committed",
    FollowFailure.IDLE.value: "the file being followed stopped growing (its writer is dead or stalled)",
    FollowFailure.ABANDONED.value: "the download being followed ended without a commit",
    "too_long": "the blob being downloaded is longer than its size",
}



def aborted(request: Request, reason: str, on_abort: Callable[[str], None] | None) -> None:
    """Cut the client's connection (it must not take a short body as the blob) and say why."""
    log.warn("aborting a response: {why}", why=ABORTED.get(reason, reason))
    if on_abort is not None:
        on_abort(reason)
    request.unregisterProducer()
    # An aborted response is never finished, so Twisted writes no access log line for it: write one,
    # marked (see metahub.web.site), with the bytes that were sent.
    request.metahub_aborted = reason  # type: ignore[attr-defined]
    site = getattr(request, "site", None)
    if site is not None:
        site.log(request)
    abort(request)


class Readable(TypingProtocol):
    def read(self, n: int) -> bytes: ...
    def close(self) -> None: ...


@implementer(IPushProducer)
class _Gate:
    """Tracks the transport's pause/resume/stop calls as something an async loop can await."""

    def __init__(self) -> None:
        self.stopped = False
        self._paused: Deferred[None] | None = None

    def pauseProducing(self) -> None:
        if self._paused is None:
            self._paused = Deferred()

    def resumeProducing(self) -> None:
        paused, self._paused = self._paused, None
        if paused is not None:
            paused.callback(None)

    def stopProducing(self) -> None:
        self.stopped = True
        self.resumeProducing()

    def ready(self) -> Deferred[None]:
        return self._paused if self._paused is not None else succeed(None)


async def send(
    request: Request,
    source: Readable,
    in_thread: ThreadRunner,
    on_bytes: Callable[[int], None],
    wait_for_more: WaitForMore | None = None,
    length: int | None = None,
    recover: Recover | None = None,
    on_abort: Callable[[str], None] | None = None,
) -> bool:
    """Write everything ``source`` yields to ``request`` and finish it; True if the client got it all.

    ``source`` is a :class:`storage.BlobReader` (committed bytes: sent as read) or a
    :class:`storage.BlobFollower` (a growing file: ``wait_for_more`` is awaited when no new bytes have
    landed, and the response completes only if the write committed). For a follower, ``length`` is
    the blob's size when known: then only its final byte waits for the verdict, else (a chunked
    upstream body, whose end is known only at the end) the latest chunk does. ``recover`` (see the
    module docstring) lets a follower whose source went away be replaced; ``on_abort`` counts aborts.
    """
    gate = _Gate()
    request.registerProducer(gate, True)
    request.notifyFinish().addErrback(lambda _: gate.stopProducing())
    following = isinstance(source, BlobFollower)
    held = b""
    recoveries = 0
    ahead: Deferred[bytes] | None = None  # the next chunk of a committed blob, being read
    try:
        while not gate.stopped:
            await gate.ready()
            if gate.stopped:
                break
            reading, ahead = ahead or in_thread(source.read, FOLLOW_CHUNK if following else CHUNK), None
            data = await reading
            if data and not following:
                ahead = in_thread(source.read, CHUNK)
            if data:
                if following:
                    assert isinstance(source, BlobFollower)
                    if length is None:
                        data, held = held, data
                    elif source.position > length:  # another node's file outgrew the size HEAD gave
                        aborted(request, "too_long", on_abort)
                        return False
                    elif source.position == length:
                        data, held = data[:-1], data[-1:]
                if data:
                    request.write(data)
                    on_bytes(len(data))
                continue
            if following:
                assert isinstance(source, BlobFollower)
                if source.state is FollowState.WRITING:
                    if wait_for_more is None:
                        raise RuntimeError("a blob being written needs a wait_for_more")
                    await wait_for_more()
                    continue
                if source.state is FollowState.FAILED:
                    failure = source.failure or FollowFailure.MISMATCH
                    if recover is not None and failure.recoverable and recoveries < MAX_RECOVERIES:
                        recoveries += 1
                        log.info(
                            "a response at byte {position} goes on from another source: {why}",
                            position=source.position, why=ABORTED[failure.value],
                        )
                        try:
                            successor = await recover(source)
                        except Exception:  # e.g. upstream now refuses this repository: abort below
                            log.failure("no other source could carry a response on")
                            successor = None
                        if successor is not None and not gate.stopped:
                            source.close()
                            source, wait_for_more = successor
                            continue
                        if successor is not None:
                            successor[0].close()
                    if gate.stopped:
                        break
                    aborted(request, failure.value, on_abort)
                    return False
                if held:
                    request.write(held)
                    on_bytes(len(held))
            break
    finally:
        if ahead is not None:  # let the read in its thread end before its file is closed
            try:
                await ahead
            except Exception:  # whatever ended the loop is the error worth raising
                pass
        source.close()
    if gate.stopped:
        return False
    request.unregisterProducer()
    request.finish()
    return True
