"""Sending a committed blob with ``os.sendfile``: file to socket in the kernel, no copy through Python.

Only a response that is a cached blob's body (a :class:`storage.BlobReader`: every byte committed
and verified) on a plain TCP connection takes this path (:func:`zero_copy_socket`). TLS must
encrypt in user space, and a follower of a download must hold its last byte back until the write
verifies (:mod:`metahub.web.streaming`): both keep the copy loop.

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
by the copy loop from the byte reached; a file that ends early, or a read that fails, breaks the
response (the caller aborts the connection: its Content-Length can no longer be met).

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
from typing import cast

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

from metahub.runtime.threads import ThreadRunner
from metahub.web.connection import abort
from metahub.web.streaming import send
from storage import BlobReader

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
    """The blob's file ended before the size it had when opened: something truncated it."""


class SendfileUnsupported(OSError):
    """The store's filesystem cannot ``sendfile`` (some FUSE and network filesystems): the body
    carries on through the copy loop from the byte it had reached."""


#: What sendfile(2) fails with when the file cannot be spliced to a socket.
_UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP})
#: Errors of a socket whose client went away without a reset (no ConnectionError subclass).
_GONE = frozenset({errno.ETIMEDOUT, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENOTCONN})


def zero_copy_socket(request: Request, source: object) -> socket.socket | None:
    """The socket to ``sendfile`` ``source`` into, or None when the copy loop must serve it.

    Yes only for a ``GET`` of a committed blob (``source`` is a :class:`storage.BlobReader`) with a
    ``Content-Length`` (no chunked coding around the body), on an HTTP/1.x channel over a plain TCP
    connection: Twisted's TCP transport, a :class:`FileDescriptor` with a socket as its system
    handle, not TLS (neither Twisted's TLS wrapper, which is no FileDescriptor, nor a connection
    that started TLS, which provides ``ISSLTransport``).
    """
    transport = request.transport
    if not isinstance(source, BlobReader) or request.method != b"GET":
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
    """The body of one response, sent with ``sendfile``; ``done`` fires True once it is all sent and
    the request finished (or logged, when the client hung up the moment it had the last byte),
    False if the client went away first (nothing is finished then), or fails with the error that
    broke it (the caller aborts the connection)."""

    def __init__(
        self,
        *,
        request: Request,
        reader: BlobReader,
        connection: socket.socket,
        in_thread: ThreadRunner,
        fds: IReactorFDSet,
        on_bytes: Callable[[int], None],
    ) -> None:
        self.request = request
        self.reader = reader
        self.in_thread = in_thread
        self.fds = fds
        self.on_bytes = on_bytes
        self.done: Deferred[bool] = Deferred()
        self.position = reader.position
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

    def start(self) -> Deferred[bool]:
        self.request.notifyFinish().addErrback(lambda _: self.stopProducing())
        # The channel registered itself (HTTPChannel.connectionMade); it gets the slot back at the end.
        self._transport.unregisterProducer()
        self._transport.registerProducer(self, False)  # calls resumeProducing (or stopProducing) at once
        return self.done

    # --- IPullProducer, as the transport's producer ---------------------------------------------

    def resumeProducing(self) -> None:  # noqa: N802
        if self._over or self._started:
            return  # a job is running or the reactor watches the socket: the transport is not ours to fill
        if not self._headers_written:
            self._headers_written = True
            self.request.write(b"")  # the headers alone; the transport calls again once they are sent
            return
        self._started = True
        self._copy = self._connection.dup()
        self._next()

    def stopProducing(self) -> None:  # noqa: N802
        """The connection is gone (the transport's connectionLost, or the request's notifyFinish)."""
        self._stop.set()
        if not self._job_running:
            self._end(False)

    # --- the jobs -------------------------------------------------------------------------------

    def _next(self) -> None:
        remaining = self.reader.end - self.position
        if remaining == 0:
            return self._complete()
        if self._stop.is_set():
            return self._end(False)
        assert self._copy is not None
        self._job_running = True
        job = self.in_thread(
            send_slice, self._copy.fileno(), self.reader.fileno(), self.position, min(SLICE, remaining), self._stop,
        )
        job.addCallbacks(self._sent, self._broken)

    def _sent(self, result: tuple[int, Slice]) -> None:
        self._job_running = False
        sent, end = result
        if sent:
            self.position += sent
            # What twisted.web's access log reports (combinedLogFormatter reads it): a public
            # attribute of Request, though of no interface, kept by Request.write for the bytes
            # it writes; these bytes bypass it.
            self.request.sentLength += sent
            self.on_bytes(sent)
        if self._stop.is_set() or end is Slice.SENT:
            return self._next()
        if end is Slice.BLOCKED:
            assert self._copy is not None
            self._writable = _Writable(self._copy.fileno(), self._unblocked, self._lost)
            self.fds.addWriter(self._writable)
        elif end is Slice.GONE:
            self._client_left()
        else:
            self._give_back()  # for what follows (the copy loop, or the abort): the channel in its place
            if end is Slice.TRUNCATED:
                self._end(Failure(BlobTruncated(f"the blob's file ended at byte {self.position}, not {self.reader.end}")))
            else:
                self._end(Failure(SendfileUnsupported("the store's filesystem cannot sendfile")))

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
            return self._end(False)
        self._give_back()  # for the abort that follows: it must find the channel in its place
        self._end(reason)

    def _client_left(self) -> None:
        """The client left, and this producer saw it before the transport was told (or at once)."""
        if not self._stop.is_set():
            # What the copy loop's failed write leads to: the connection closed, which Twisted
            # then tells the request (and this producer, as stopProducing).
            self._give_back()
            abort(self.request)
        self._end(False)

    # --- the end --------------------------------------------------------------------------------

    def _complete(self) -> None:
        if self._stop.is_set():
            # The last job put the last byte in the socket, and the client, having it all, hung
            # up before the job's result reached the reactor. The response is whole; Twisted
            # refuses to finish a request whose connection is gone, so write the access-log line
            # finish would have written (Request.finish calls the factory's log the same way).
            factory = self._channel.factory
            if isinstance(factory, HTTPFactory):
                factory.log(self.request)
            return self._end(True)
        self._give_back()
        self.request.finish()
        self._end(True)

    def _give_back(self) -> None:
        """Hand the transport's producer slot back to the channel, as it was before the body."""
        self._transport.unregisterProducer()
        self._transport.registerProducer(self._channel, True)
        # The transport has drained (it told us so): say it to the channel too, in case a response
        # before this one had it paused (HTTPChannel only reads the next request once resumed).
        self._channel.resumeProducing()

    def _end(self, outcome: bool | Failure) -> None:
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
        request=request, reader=reader, connection=connection, in_thread=in_thread, fds=fds, on_bytes=on_bytes,
    )
    try:
        return await body.start()
    except SendfileUnsupported:
        # Not worth a log line per response: the copy loop is the path every TLS client takes.
        reader.position = body.position
        return await send(request, reader, in_thread, on_bytes)
