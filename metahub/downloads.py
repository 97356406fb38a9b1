"""Single flight: one upstream download per blob per node, followed by every client that wants it.

A :class:`Download` streams the upstream body into a :class:`storage.BlobWriter` (hashing as it goes)
and wakes its followers whenever bytes land. Clients never read from the network stream: they read
the growing temporary file through a :class:`storage.BlobFollower`, so a slow client costs no memory
and the first client is served exactly like the twentieth. On a digest mismatch the writer refuses to
commit, the followers see FAILED, and their responses are aborted.
"""
from __future__ import annotations

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse

from storage import BlobWriteError, BlobWriter, DigestMismatch, Storage

from . import errors
from .metrics import Metrics
from .names import Route
from .threads import ThreadRunner
from .upstream import UpstreamClient

log = Logger()


class _BodySink(Protocol):
    """Writes an upstream body into the blob writer; stalls longer than ``idle_timeout`` abort it."""

    def __init__(self, download: Download, clock: IReactorTime, idle_timeout: float) -> None:
        self.download = download
        self.clock = clock
        self.idle_timeout = idle_timeout
        self.done: Deferred[None] = Deferred()  # fires when the body ends, however it ends
        self.reason: Failure | None = None
        self._timer: IDelayedCall | None = None

    def connectionMade(self) -> None:
        self._timer = self.clock.callLater(self.idle_timeout, self._stalled)

    def dataReceived(self, data: bytes) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.reset(self.idle_timeout)
        try:
            self.download.received(data)
        except BlobWriteError as failure:  # more bytes than Content-Length promised
            self.download.write_error = failure
            self.transport.stopProducing()

    def _stalled(self) -> None:
        self.download.write_error = errors.gateway_timeout("upstream stopped sending the blob")
        self.transport.stopProducing()

    def connectionLost(self, reason: Failure = ResponseDone()) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self.reason = reason
        self.done.callback(None)


class Download:
    """One upstream fetch of ``digest`` into the store."""

    def __init__(self, digest: str, route: Route, size: int | None, writer: BlobWriter) -> None:
        self.digest = digest
        self.route = route
        self.size = size
        self.writer = writer
        self.received_bytes = 0
        self.write_error: Exception | None = None
        self.finished: Deferred[bool] = Deferred()  # True when committed
        self.committed = False
        self._waiters: list[Deferred[None]] = []

    def received(self, data: bytes) -> None:
        self.writer.write(data)
        self.received_bytes += len(data)
        self._wake()

    def changed(self) -> Deferred[None]:
        """Fires when more bytes land or the download ends (whichever comes first)."""
        waiter: Deferred[None] = Deferred()
        if self.finished.called:
            waiter.callback(None)
        else:
            self._waiters.append(waiter)
        return waiter

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def _end(self, committed: bool) -> None:
        self.committed = committed
        self.finished.callback(committed)
        self._wake()


class Downloads:
    """The downloads under way on this node, keyed by digest."""

    def __init__(
        self,
        storage: Storage,
        clients: dict[str, UpstreamClient],
        clock: IReactorTime,
        in_thread: ThreadRunner,
        metrics: Metrics,
    ) -> None:
        self.storage = storage
        self.clients = clients
        self.clock = clock
        self.in_thread = in_thread
        self.metrics = metrics
        self._active: dict[str, Download] = {}
        self._starting: dict[str, list[Deferred[Download]]] = {}

    def active(self, digest: str) -> Download | None:
        return self._active.get(digest)

    async def join(self, route: Route, digest: str) -> Download:
        """The download of ``digest``: the one under way, or a new one through ``route``.

        Raises the upstream's RegistryError (404, 401, 502, ...) when the upstream refuses.
        """
        if digest in self._active:
            return self._active[digest]
        waiter: Deferred[Download] = Deferred()
        if digest in self._starting:
            self._starting[digest].append(waiter)
        else:
            self._starting[digest] = [waiter]
            ensureDeferred(self._start(route, digest)).addBoth(self._started, digest)
        return await waiter

    def _started(self, result: Download | Failure, digest: str) -> None:
        for waiter in self._starting.pop(digest):
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)

    async def _start(self, route: Route, digest: str) -> Download:
        upstream = route.upstream.name
        self.metrics.upstream_fetches.labels(upstream, "blob").inc()
        try:
            response: IResponse = await self.clients[upstream].get_blob(route.repository, digest)
        except errors.RegistryError:
            self.metrics.upstream_failures.labels(upstream).inc()
            raise
        size = None if response.length is UNKNOWN_LENGTH else int(response.length)
        download = Download(digest, route, size, self.storage.blobs.writer(digest, size))
        sink = _BodySink(download, self.clock, route.upstream.read_timeout)
        self._active[digest] = download
        self.metrics.in_flight.inc()
        # From here every outcome, even an exception while starting the body, ends in _finish,
        # which unregisters the download: a stuck "active" entry would hang every later request.
        sink.done.addCallback(lambda _: ensureDeferred(self._finish(download, sink.reason)))
        try:
            response.deliverBody(sink)
        except Exception:
            sink.connectionLost(Failure())
        return download

    async def _finish(self, download: Download, reason: Failure) -> None:
        upstream = download.route.upstream.name
        self.metrics.upstream_bytes.labels(upstream).inc(download.received_bytes)
        committed = False
        try:
            if download.write_error is None and reason.check(ResponseDone):
                # fsync and rename off the reactor: a large fsync takes a while.
                await self.in_thread(download.writer.commit)
                now = self.clock.seconds()
                self.storage.index.put_blob(download.digest, download.received_bytes, now, repository=download.route.key)
                committed = True
            else:
                download.writer.abort()
                self.metrics.upstream_failures.labels(upstream).inc()
                log.warn(
                    "download of {digest} from {upstream} failed: {why}",
                    digest=download.digest, upstream=upstream,
                    why=download.write_error or reason.getErrorMessage(),
                )
        except DigestMismatch as mismatch:
            self.metrics.digest_mismatches.labels(upstream).inc()
            log.error(
                "upstream {upstream} sent wrong bytes for {digest} (got {actual}); nothing cached",
                upstream=upstream, digest=download.digest, actual=mismatch.actual,
            )
        except BlobWriteError as failure:
            self.metrics.upstream_failures.labels(upstream).inc()
            log.error("download of {digest} not committed: {why}", digest=download.digest, why=str(failure))
        finally:
            del self._active[download.digest]
            self.metrics.in_flight.dec()
            download._end(committed)
