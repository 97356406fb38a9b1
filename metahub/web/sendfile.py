"""Sending a blob with ``os.sendfile``: file to socket in the kernel, no copy through Python.

A response on a plain TCP connection takes this path (:func:`zero_copy_socket`) when its body is a
cached blob's (a :class:`storage.BlobReader`: every byte committed and verified), or a download
followed as it lands (a :class:`storage.BlobFollower` of this node's own file, which need not see
its bytes). TLS must encrypt in user space, and a follower that hashes what it delivers (another
node's file, or a response carried on from another source) must read every byte anyway: both keep
the copy loop (:mod:`metahub.web.streaming`).

What a body may send is its source's to say (:class:`Source`): a cached blob, all of its range at
once (:class:`Stored`); a download, what has landed in its file (:class:`Landing`), waiting for more
when it has caught up, and never its final byte, which must wait until the blob has verified (a
client must never get every byte of a blob whose digest turns out wrong: it would keep it). That
byte, and whatever follows a failed source (an abort, or a response carried on from another
source), are the copy loop's, from the byte reached: it holds them to every rule of a follower.

The headers are written by twisted.web and queue in the transport; the body must start only once
they have left it, and must never mix with anything the transport sends. Twisted has no "flushed"
notification, but its transports are :class:`~twisted.internet.interfaces.IConsumer` providers, and
``IConsumer.registerProducer(producer, streaming=False)`` promises an
:class:`~twisted.internet.interfaces.IPullProducer` a ``resumeProducing`` call each time the
consumer wants data, which a TCP transport (``FileDescriptor.doWrite``) makes only when its buffer
has emptied into the kernel. So, for the length of the body, :class:`SendfileBody` takes the
transport's producer slot from the HTTP channel (as Twisted's own switch to HTTP/2 does), answers
the first ``resumeProducing`` (made by ``registerProducer`` itself) by writing the headers, and
starts the body at the second: the transport is drained and nothing else writes to it while this
response is being served. At the end it gives the slot back to the channel.

``sendfile`` reads the store, which may be NFS that stalls, so it never runs on the reactor: each
job, on the store-read pool, sends at most :data:`SLICE` bytes, waiting in ``poll`` for the socket
when its kernel buffer is full, and comes back to the reactor (which counts the bytes and starts the
next job). A client that does not read for :data:`POLL_WAIT`, or that has kept a job waiting on a full
buffer past :data:`JOB_SECONDS`, hands its thread back: the reactor then
watches the socket (``IReactorFDSet.addWriter``) and starts a job once it can take bytes again.

A store whose filesystem cannot ``sendfile`` (EINVAL, ENOSYS, EOPNOTSUPP) has the body carried on
by the copy loop from the byte reached; a file that ends before what its source said it holds, or a
read that fails, breaks the response (the caller aborts the connection: its Content-Length can no
longer be met).

The jobs write to a duplicate of the socket's descriptor, closed only on the reactor once no job is
running: Twisted closes its own descriptor when the connection is lost, and a job still holding that
number could otherwise send blob bytes to whatever file or connection is given the number next.
"""
from __future__ import annotations

import errno
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from enum import Enum
from typing import Protocol, cast

from twisted.internet.abstract import FileDescriptor
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IConsumer,
    IPullProducer,
    IReactorFDSet,
    ISSLTransport,
    ISystemHandle,
    ITCPTransport,
    IWriteDescriptor,
)
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel, HTTPFactory
from twisted.web.server import Request
from zope.interface import implementer

from metahub.cache.blobs import Following, WaitForMore
from metahub.runtime.threads import ThreadRunner
from metahub.web.connection import abort
from metahub.web.streaming import send
from storage import BlobFollower, BlobReader, FollowState

#: Bytes one job sends before it comes back to the reactor: a few milliseconds at loopback speed,
#: so the thread hop costs a few percent.
SLICE = 8 << 20
#: Seconds a job waits for a full socket buffer to take bytes before it gives its thread back.
POLL_WAIT = 0.05
#: Seconds a job may go on once the socket buffer is full: a client that reads, but slowly, frees
#: a little room within every POLL_WAIT, and would otherwise hold a store-read thread for the
#: whole slice (8 MiB at 200 kB/s is 40 s). Past this the reactor waits for the socket instead.
JOB_SECONDS = 0.1


class BlobTruncated(OSError):
    """The blob's file ended before the bytes its source said it holds: something truncated it."""


#: What sendfile(2) fails with when the file cannot be spliced to a socket.
_UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP})
#: Errors of a socket whose client went away without a reset (no ConnectionError subclass).
_GONE = frozenset({errno.ETIMEDOUT, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENOTCONN})


def zero_copy_socket(request: Request, source: object) -> socket.socket | None:
    """The socket to ``sendfile`` ``source`` into, or None when the copy loop must serve it.

    Yes only for a ``GET`` of a committed blob (``source`` is a :class:`storage.BlobReader`) or of a
    download whose follower need not see its bytes (a :class:`storage.BlobFollower` without
    ``verify_bytes``), with a ``Content-Length`` (no chunked coding around the body: a download's
    size is known), on an HTTP/1.x channel over a plain TCP connection: Twisted's TCP transport, a
    :class:`FileDescriptor` with a socket as its system handle, not TLS (neither Twisted's TLS
    wrapper, which is no FileDescriptor, nor a connection that started TLS, which provides
    ``ISSLTransport``).
    """
    transport = request.transport
    if isinstance(source, BlobFollower):
        if source.verify_bytes:
            return None  # it hashes every byte it delivers, so it reads them all anyway
    elif not isinstance(source, BlobReader):
        return None
    if request.method != b"GET":
        return None
    if not request.responseHeaders.hasHeader(b"content-length"):
        return None
    if not isinstance(request.channel, HTTPChannel):  # HTTP/2 streams are no HTTPChannel
        return None
    if not isinstance(transport, FileDescriptor) or not ITCPTransport.providedBy(transport):
        return None
    if ISSLTransport.providedBy(transport) or not ISystemHandle.providedBy(transport):
        return None
    handle = ISystemHandle(transport).getHandle()
    return handle if isinstance(handle, socket.socket) else None


class Slice(Enum):
    """How a job ended (with the bytes it sent, whatever the end)."""

    SENT = "sent"  # all it was asked to send
    CAUGHT_UP = "caught_up"  # its source had nothing to send yet: the body waits for more
    BLOCKED = "blocked"  # the socket took nothing for POLL_WAIT: the reactor waits for it
    GONE = "gone"  # the connection broke: the client left
    TRUNCATED = "truncated"  # the file ended early
    UNSUPPORTED = "unsupported"  # the filesystem cannot sendfile


def send_slice(out_fd: int, in_fd: int, offset: int, count: int, stop: threading.Event) -> tuple[int, Slice]:
    """Send up to ``count`` bytes of ``in_fd`` from ``offset`` to the non-blocking socket ``out_fd``.

    Runs in a thread; stops early once ``stop`` is set. Any other error (EIO from the store) raises.
    """
    poller = select.poll()
    poller.register(out_fd, select.POLLOUT)
    deadline = time.monotonic() + JOB_SECONDS
    sent = 0
    while sent < count and not stop.is_set():
        try:
            done = os.sendfile(out_fd, in_fd, offset + sent, count - sent)
        except BlockingIOError:
            # POLLERR and POLLHUP wake it too; the next sendfile then raises what happened.
            if time.monotonic() >= deadline or not poller.poll(POLL_WAIT * 1000):
                return sent, Slice.BLOCKED
            continue
        except ConnectionError:
            return sent, Slice.GONE
        except OSError as error:
            if error.errno in _GONE:
                return sent, Slice.GONE
            if error.errno in _UNSUPPORTED:
                return sent, Slice.UNSUPPORTED
            raise
        if done == 0:
            return sent, Slice.TRUNCATED
        sent += done
    return sent, Slice.SENT


class Step(Enum):
    """What a body's source says before each job."""

    SEND = "send"  # a job may send its next bytes
    WHOLE = "whole"  # every byte of the body is sent
    REST = "rest"  # the copy loop sends the rest, from the source's position


class Ended(Enum):
    """How a body ended, when nothing broke it."""

    WHOLE = "whole"  # every byte sent, the request finished (or logged)
    LEFT = "left"  # the client went away first: nothing is finished
    REST = "rest"  # the copy loop carries on from the source's position (the channel has the slot)


class Source(Protocol):
    """What a :class:`SendfileBody` sends, and how far it may send now."""

    @property
    def position(self) -> int:
        """The next byte to send."""

    def step(self) -> Step:
        """On the reactor, before each job."""

    def send(self, out_fd: int, stop: threading.Event) -> tuple[int, Slice]:
        """In a job's thread: send the next bytes it may (at most :data:`SLICE`) to ``out_fd``, and
        move ``position`` past them. :attr:`Slice.CAUGHT_UP` when none may go yet."""

    def wait(self) -> Deferred[None]:
        """On the reactor, after a job found it caught up: fires once there may be more."""


class Stored:
    """A committed blob's range: every byte may go at once."""

    def __init__(self, reader: BlobReader) -> None:
        self.reader = reader

    @property
    def position(self) -> int:
        return self.reader.position

    def step(self) -> Step:
        return Step.WHOLE if self.reader.remaining == 0 else Step.SEND

    def send(self, out_fd: int, stop: threading.Event) -> tuple[int, Slice]:
        reader = self.reader
        sent, end = send_slice(out_fd, reader.fileno(), reader.position, min(SLICE, reader.remaining), stop)
        reader.position += sent
        return sent, end

    def wait(self) -> Deferred[None]:
        raise AssertionError("a committed blob has every byte: it never waits")


class Landing:
    """A download's file as it lands, followed by ``follower`` (one that need not see its bytes) for
    a body of ``length`` bytes: what has landed, but never the final byte (the copy loop's, held
    until the blob verified), nor anything once the follower is done (committed early, or failed:
    the copy loop ends the response, or carries it on from another source)."""

    def __init__(self, follower: BlobFollower, length: int, wait_for_more: WaitForMore) -> None:
        self.follower = follower
        self.length = length
        self.wait_for_more = wait_for_more

    @property
    def position(self) -> int:
        return self.follower.position

    def step(self) -> Step:
        follower = self.follower
        writing = follower.state is FollowState.WRITING
        return Step.SEND if writing and follower.position < self.length - 1 else Step.REST

    def send(self, out_fd: int, stop: threading.Event) -> tuple[int, Slice]:
        follower = self.follower
        count = follower.landed(min(SLICE, self.length - 1 - follower.position))
        if count == 0:
            return 0, Slice.CAUGHT_UP
        # fileno() asked after landed(), which may have moved the follower to the committed blob.
        sent, end = send_slice(out_fd, follower.fileno(), follower.position, count, stop)
        follower.advance(sent)
        return sent, end

    def wait(self) -> Deferred[None]:
        return self.wait_for_more()


@implementer(IWriteDescriptor)
class _Writable:
    """The socket, watched by the reactor until it can take bytes (see the module docstring)."""

    def __init__(self, fd: int, ready: Callable[[], None], lost: Callable[[Failure], None]) -> None:
        self._fd = fd
        self._ready = ready
        self._lost = lost

    def fileno(self) -> int:
        return self._fd

    def doWrite(self) -> None:  # noqa: N802
        self._ready()

    def connectionLost(self, reason: Failure) -> None:  # noqa: N802
        self._lost(reason)

    def logPrefix(self) -> str:  # noqa: N802
        return "sendfile"


@implementer(IPullProducer)
class SendfileBody:
    """The body of one response, sent with ``sendfile`` as far as ``source`` lets it; ``done`` fires
    with how it ended (:class:`Ended`: once the request finished, or was logged when the client hung
    up the moment it had the last byte), or fails with the error that broke it (the caller aborts
    the connection)."""

    def __init__(
        self,
        *,
        request: Request,
        source: Source,
        connection: socket.socket,
        in_thread: ThreadRunner,
        fds: IReactorFDSet,
        on_bytes: Callable[[int], None],
    ) -> None:
        self.request = request
        self.source = source
        self.in_thread = in_thread
        self.fds = fds
        self.on_bytes = on_bytes
        self.done: Deferred[Ended] = Deferred()
        self._connection = connection
        # zero_copy_socket made sure it is Twisted's TCP transport, an IConsumer (twisted.web types
        # a request's transport as the narrower ITransport).
        self._transport = cast(IConsumer, request.transport)
        self._channel = request.channel
        self._copy: socket.socket | None = None  # the jobs' duplicate of the connection's descriptor
        self._writable: _Writable | None = None  # set while the reactor watches the socket
        self._stop = threading.Event()
        self._headers_written = False
        self._started = False
        self._job_running = False
        self._over = False

    def start(self) -> Deferred[Ended]:
        self.request.notifyFinish().addErrback(lambda _: self.stopProducing())
        # The channel registered itself (HTTPChannel.connectionMade); it gets the slot back at the end.
        self._transport.unregisterProducer()
        self._transport.registerProducer(self, False)  # calls resumeProducing (or stopProducing) at once
        return self.done

    # --- IPullProducer, as the transport's producer ---------------------------------------------

    def resumeProducing(self) -> None:  # noqa: N802
        if self._over or self._started:
            return  # a job, a wait or the reactor is on it: the transport is not ours to fill
        if not self._headers_written:
            self._headers_written = True
            self.request.write(b"")  # the headers alone; the transport calls again once they are sent
            return
        self._started = True
        self._copy = self._connection.dup()
        self._next()

    def stopProducing(self) -> None:  # noqa: N802
        """The connection is gone (the transport's connectionLost, or the request's notifyFinish).

        A wait for more bytes is left to fire into the void: it touches the follower's state only,
        never its file or the socket."""
        self._stop.set()
        if not self._job_running:
            self._end(Ended.LEFT)

    # --- the jobs -------------------------------------------------------------------------------

    def _next(self) -> None:
        step = self.source.step()
        if step is Step.WHOLE:
            return self._complete()
        if self._stop.is_set():
            return self._end(Ended.LEFT)
        if step is Step.REST:
            self._give_back()  # for the copy loop: the channel in its place
            return self._end(Ended.REST)
        assert self._copy is not None
        self._job_running = True
        try:
            job = self.in_thread(self.source.send, self._copy.fileno(), self._stop)
        except Exception:  # a pool already stopped (the server stopping) refuses the job at once
            return self._broken(Failure())
        job.addCallbacks(self._sent, self._broken)

    def _sent(self, result: tuple[int, Slice]) -> None:
        self._job_running = False
        sent, end = result
        if sent:
            # What twisted.web's access log reports (combinedLogFormatter reads it): a public
            # attribute of Request, though of no interface, kept by Request.write for the bytes
            # it writes; these bytes bypass it.
            self.request.sentLength += sent
            self.on_bytes(sent)
        if self._stop.is_set() or end is Slice.SENT:
            return self._next()
        if end is Slice.CAUGHT_UP:
            if self.source.step() is not Step.SEND:  # finding nothing, the follower found it was done
                return self._next()
            self.source.wait().addCallbacks(lambda _: self._next(), self._broken)
        elif end is Slice.BLOCKED:
            assert self._copy is not None
            self._writable = _Writable(self._copy.fileno(), self._unblocked, self._lost)
            self.fds.addWriter(self._writable)
        elif end is Slice.GONE:
            self._client_left()
        elif end is Slice.UNSUPPORTED:
            # Not worth a log line per response: the copy loop is the path every TLS client takes.
            self._give_back()
            self._end(Ended.REST)
        else:
            self._give_back()  # for the abort that follows: the channel in its place
            self._end(Failure(BlobTruncated(f"the blob's file ended at byte {self.source.position}")))

    def _unblocked(self) -> None:
        self._unwatch()
        self._next()

    def _lost(self, reason: Failure) -> None:
        """The reactor saw the watched socket fail (a hang-up or an error on it): the client left."""
        self._unwatch()
        self._client_left()

    def _unwatch(self) -> None:
        if self._writable is not None:
            self.fds.removeWriter(self._writable)
            self._writable = None

    def _broken(self, reason: Failure) -> None:
        self._job_running = False
        if self._stop.is_set():  # the client left mid-send: whatever failed since only says so
            return self._end(Ended.LEFT)
        self._give_back()  # for the abort that follows: it must find the channel in its place
        self._end(reason)

    def _client_left(self) -> None:
        """The client left, and this producer saw it before the transport was told (or at once)."""
        if not self._stop.is_set():
            # What the copy loop's failed write leads to: the connection closed, which Twisted
            # then tells the request (and this producer, as stopProducing).
            self._give_back()
            abort(self.request)
        self._end(Ended.LEFT)

    # --- the end --------------------------------------------------------------------------------

    def _complete(self) -> None:
        if self._stop.is_set():
            # The last job put the last byte in the socket, and the client, having it all, hung
            # up before the job's result reached the reactor. The response is whole (as whole as
            # any finished one: its bytes were handed to the kernel, as finish's are); Twisted
            # refuses to finish a request whose connection is gone, so write the access-log line
            # finish would have written (Request.finish calls the factory's log the same way).
            factory = self._channel.factory
            if isinstance(factory, HTTPFactory):
                factory.log(self.request)
            return self._end(Ended.WHOLE)
        self._give_back()
        self.request.finish()
        self._end(Ended.WHOLE)

    def _give_back(self) -> None:
        """Hand the transport's producer slot back to the channel, as it was before the body."""
        self._transport.unregisterProducer()
        self._transport.registerProducer(self._channel, True)
        # The transport has drained (it told us so): say it to the channel too, in case a response
        # before this one had it paused (HTTPChannel only reads the next request once resumed).
        self._channel.resumeProducing()

    def _end(self, outcome: Ended | Failure) -> None:
        if self._over:
            return
        self._over = True
        self._unwatch()
        if self._copy is not None:
            self._copy.close()
            self._copy = None
        if isinstance(outcome, Failure):
            self.done.errback(outcome)
        else:
            self.done.callback(outcome)


async def send_file(
    request: Request,
    reader: BlobReader,
    connection: socket.socket,
    in_thread: ThreadRunner,
    fds: IReactorFDSet,
    on_bytes: Callable[[int], None],
) -> bool:
    """Send ``reader``'s range as the body of ``request`` (headers set, none written) and finish it.

    True if the client got it all; False if it went away. Returns only once no job is running, so the
    caller may close ``reader`` then.
    """
    body = SendfileBody(
        request=request, source=Stored(reader), connection=connection, in_thread=in_thread, fds=fds,
        on_bytes=on_bytes,
    )
    ended = await body.start()
    if ended is Ended.REST:  # the store's filesystem cannot sendfile
        return await send(request, reader, in_thread, on_bytes)
    return ended is Ended.WHOLE


async def send_following(
    request: Request,
    following: Following,
    connection: socket.socket,
    in_thread: ThreadRunner,
    fds: IReactorFDSet,
    on_bytes: Callable[[int], None],
    on_abort: Callable[[str], None] | None = None,
) -> bool:
    """Send a download of known size as the body of ``request`` (headers set, none written) as it
    lands, with ``sendfile`` up to its final byte, the rest through the copy loop (:class:`Landing`).

    True if the client got it all; False if it went away or the response was aborted. Closes the
    follower, whichever way it ends.
    """
    follower, size = following.follower, following.size
    try:
        if size is None:
            raise ValueError("only a download of known size has a Content-Length to send it under")
        body = SendfileBody(
            request=request, source=Landing(follower, size, following.wait_for_more), connection=connection,
            in_thread=in_thread, fds=fds, on_bytes=on_bytes,
        )
        ended = await body.start()
        if ended is not Ended.REST:
            return ended is Ended.WHOLE
        return await send(
            request, follower, in_thread, on_bytes, following.wait_for_more, size, following.resume, on_abort,
        )
    finally:
        follower.close()  # the copy loop closes it too (and any successor): closing is idempotent
