"""Single flight: one upstream download per blob per cluster, followed by every client that wants it.

A :class:`Download` hands the upstream body, in pieces of about a megabyte, to a lane: a serial
queue on a few threads every download shares (:mod:`metahub.runtime.lane`), which writes them into
a :class:`storage.BlobWriter`'s temporary file (one ``writev`` per piece, no join) and hashes them,
in order, so neither the hashing nor a stalled shared filesystem holds up the reactor. Hashing in a
second lane beside the writes was measured and cost more CPU than it saved wall time on two shared
cores (docs/benchmarks.md, "Scenario 10: the cold path"). The first piece goes at once, however
small, so a client's first byte does not wait for a megabyte. When the lane falls behind (a slow
disk, or every worker busy), the upstream connection is paused, so a download waiting for a worker
holds :data:`QUEUED_LIMIT` bytes at most. Clients never read from the network stream: they read
the growing temporary file through a :class:`storage.BlobFollower`, woken as bytes land, so a slow
client costs no memory and the first client is served exactly like the twentieth. Once every byte has verified, this node's followers may
end before the commit's fsync; on a digest mismatch the writer refuses to commit, the followers see
FAILED, and their responses are aborted.

Across nodes sharing the store, the node that takes the blob's lease (``leases/<hex>.lease``,
exclusive create, heartbeated) downloads; the others follow its growing temporary file by polling.
A lease whose holder fell silent for ``lease_timeout`` is taken over by one node, which starts the
download again; a follower's watcher notices that itself and ends its download unfinished, so the
responses following it go on from whichever source is there next (see :mod:`metahub.cache.blobs`). A
holder whose heartbeat finds its lease taken over (its store stalled so long it looked dead) steps
aside: it stops its upstream transfer, commits nothing, and its followers go on the same way.
Correctness never rests on the lease: if two nodes did fetch, both verify and the store ends with
one correct file.

On a node, single flight is per upstream and digest: one upstream hanging or refusing must not reach
the clients of another, so a request through another upstream fetches for itself (without the lease,
which this node's other download holds). A request through another repository of the same upstream
joins, and if the start fails (that repository may lack the blob, this one may not) fetches for
itself. A store that cannot take the file (:mod:`metahub.cache.capacity`) raises StoreUnavailable, and the
caller serves the blob straight from upstream.
"""
from __future__ import annotations

import os

from twisted.internet.defer import Deferred, ensureDeferred, gatherResults
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse

from metahub.cache.capacity import StoreCapacity, StoreUnavailable, store_error
from metahub.cache.routing import Route
from metahub.oci import errors
from metahub.runtime.lane import Lane, LaneFactory
from metahub.runtime.metrics import Metrics
from metahub.runtime.threads import ThreadRunner
from metahub.upstream.body import BODY_DONE, BodyProtocol
from metahub.upstream.discard import Discard
from metahub.upstream.upstreams import Upstreams
from storage import (
    BlobWriteError,
    BlobWriter,
    DigestMismatch,
    Lease,
    Leases,
    SizeMismatch,
    Storage,
    TempFileRemoved,
    parse_digest,
)

log = Logger()

#: How often a node following another node's download looks at the shared directory.
REMOTE_POLL = 0.05
#: A follower is woken when this much has landed past what it read (or at the end): waking it per
#: 64 KiB network read cost a thread hop each and most of a cold pull's time (docs/benchmarks.md).
WAKE_BYTES = 1 << 20
#: Upstream bytes go to the lane in pieces of about this size: one job and one wake-up per piece.
WRITE_BYTES = 1 << 20
#: Bytes handed to the lane but not yet written beyond which the upstream connection is paused
#: (resumed at half): a disk slower than the network costs this much memory, not the whole blob.
QUEUED_LIMIT = 4 << 20


class AlreadyStored(Exception):
    """The blob was committed (by another node) while this one was about to fetch it."""


class LeaseLost(BlobWriteError):
    """Another node took this download's lease over: this node's copy is dropped, not committed."""


class _BodySink(BodyProtocol):
    """Hands an upstream body to its download; stalls longer than ``idle_timeout`` abort it."""

    def __init__(self, download: Download, clock: IReactorTime, idle_timeout: float) -> None:
        self.download = download
        self.clock = clock
        self.idle_timeout = idle_timeout
        self.done: Deferred[None] = Deferred()  # fires when the body ends, however it ends
        self.reason: Failure | None = None
        self._timer: IDelayedCall | None = None

    def connectionMade(self) -> None:
        self.download.flow = self.producer
        self._timer = self.clock.callLater(self.idle_timeout, self._stalled)

    def dataReceived(self, data: bytes) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.reset(self.idle_timeout)
        try:
            self.download.received(data)
        except BlobWriteError as failure:  # more bytes than Content-Length promised
            self.download.write_error = failure
            self.producer.stopProducing()

    def _stalled(self) -> None:
        if self.download.paused:
            why = f"the store fell behind: no upstream bytes could be taken for {self.idle_timeout:g} s"
        else:
            why = "upstream stopped sending the blob"
        self.download.write_error = errors.gateway_timeout(why)
        self.producer.stopProducing()

    def connectionLost(self, reason: Failure = BODY_DONE) -> None:
        self.download.flow = None
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self.reason = reason
        self.done.callback(None)


class Download:
    """One fetch of ``digest`` into the store: by this node (``writer`` set) or by another node."""

    def __init__(
        self, digest: str, route: Route, size: int | None, writer: BlobWriter | None, clock: IReactorTime,
        lane: Lane | None = None,
    ) -> None:
        self.digest = digest
        self.route = route
        self.size = size
        self.writer = writer
        self.lane = lane  # where the writer runs; set with it
        self.clock = clock
        #: The temporary file followers read; another node's is found once it exists.
        self.temp_path: str | None = writer.temp_path if writer is not None else None
        self.received_bytes = 0  # from upstream
        self.written_bytes = 0  # in the temporary file: what followers can read
        #: Every byte was written and hashed right: this node's followers may end before the commit.
        self.verified = False
        self.write_error: BaseException | None = None
        #: The upstream body's transport while it is open: paused while the lane is behind.
        self.flow: IPushProducer | None = None
        self.paused = False
        self._pieces: list[bytes] = []
        self._piece_bytes = 0
        self._queued = 0  # handed to the lane, not yet written
        self.finished: Deferred[bool] = Deferred()  # True when committed
        #: Set when it ends: True if committed. A follower of a download that ended without a
        #: commit may still finish its response from another source when :attr:`recoverable`.
        self.committed: bool | None = None
        #: Its failure was not upstream's or the bytes': another node's download ended unfinished,
        #: or this node stepped aside for the node that took its lease over.
        self.recoverable = writer is None
        self.lease: Lease | None = None
        self.lease_lost = False  # its heartbeat found the lease taken over
        self.heartbeat: LoopingCall | None = None
        self._waiters: list[tuple[int, Deferred[None]]] = []  # (bytes written to wait for, waiter)

    def received(self, data: bytes) -> None:
        if self.size is not None and self.received_bytes + len(data) > self.size:
            raise SizeMismatch(self.size, self.received_bytes + len(data))
        first = self.received_bytes == 0
        self.received_bytes += len(data)
        self._pieces.append(data)
        self._piece_bytes += len(data)
        if first or self._piece_bytes >= WRITE_BYTES:  # the first at once: a client waits for it
            self.flush()

    def flush(self) -> Deferred[None]:
        """Hand what was received to the lane; fires once it and everything before it is written."""
        assert self.writer is not None and self.lane is not None
        pieces, size = self._pieces, self._piece_bytes
        self._pieces, self._piece_bytes = [], 0
        self._queued += size
        written: Deferred[None] = self.lane.run(_write_pieces, self.writer, pieces)
        written.addCallbacks(self._written, self._write_failed, callbackArgs=(size,))
        if self._queued > QUEUED_LIMIT and not self.paused and self.flow is not None:
            self.paused = True
            self.flow.pauseProducing()
        return written

    def _written(self, _: None, size: int) -> None:
        self._queued -= size
        self.written_bytes += size
        self._wake(everyone=False)
        if self.paused and self._queued <= QUEUED_LIMIT // 2:
            self.paused = False
            if self.flow is not None:
                self.flow.resumeProducing()

    def _write_failed(self, failure: Failure) -> None:
        if self.write_error is None:
            self.write_error = failure.value
            if self.flow is not None:
                self.flow.stopProducing()

    def outcome(self) -> Deferred[bool]:
        """True once committed, False if the download failed: a Deferred of the caller's own.

        Never await :attr:`finished` itself: awaiting a Deferred in a coroutine leaves None as its
        result, so the next caller would read a failure.
        """
        waiter: Deferred[bool] = Deferred()

        def pass_on(committed: bool) -> bool:
            waiter.callback(committed)
            return committed

        self.finished.addCallback(pass_on)
        return waiter

    def changed(self, position: int = 0) -> Deferred[None]:
        """Fires once ``WAKE_BYTES`` have landed past ``position`` (what the caller has read), or
        the download ends; another node's download wakes its followers at every poll.

        Once it has ended, followers still catching up are paced instead of spinning.
        """
        if self.finished.called:
            return deferLater(self.clock, REMOTE_POLL, lambda: None)
        waiter: Deferred[None] = Deferred()
        # A follower that has read nothing yet wakes at the first bytes: its client waits for them.
        wanted = position + WAKE_BYTES if position else 1
        if self.writer is not None and wanted <= self.written_bytes:
            waiter.callback(None)
        else:
            self._waiters.append((wanted, waiter))
        return waiter

    def _wake(self, everyone: bool = True) -> None:
        ready = [w for w in self._waiters if everyone or w[0] <= self.written_bytes]
        if not ready:
            return
        self._waiters = [w for w in self._waiters if w not in ready]
        for _, waiter in ready:
            waiter.callback(None)

    def _end(self, committed: bool) -> None:
        self.committed = committed
        self.finished.callback(committed)
        self._wake()


#: A node's downloads are keyed by upstream name and digest: what can fail together.
_Key = tuple[str, str]


class Downloads:
    """The downloads under way on this node, keyed by upstream and digest."""

    def __init__(
        self,
        *,
        storage: Storage,
        upstreams: Upstreams,
        clock: IReactorTime,
        in_thread: ThreadRunner,
        index_writes: ThreadRunner,
        metrics: Metrics,
        leases: Leases,
        lanes: LaneFactory,
        lease_timeout: float = 30.0,
        capacity: StoreCapacity,
    ) -> None:
        self.storage = storage
        self.capacity = capacity
        self.lanes = lanes
        self.leases = leases
        self.lease_timeout = lease_timeout
        self.upstreams = upstreams
        self.clock = clock
        self.in_thread = in_thread
        #: Every write of the index, in order, on a thread of its own: each commit waits for the disk.
        self.index_writes = index_writes
        self.metrics = metrics
        self._active: dict[_Key, Download] = {}
        #: Downloads being started: the route of the request that started each, and who waits.
        self._starting: dict[_Key, tuple[Route, list[Deferred[Download]]]] = {}

    def committing(self) -> Deferred[list[bool]]:
        """Fires once every download whose bytes have verified is committed. A clean stop waits
        for these: their clients already have the whole blob, so it must be in the store."""
        return gatherResults([d.outcome() for d in self._active.values() if d.verified])

    async def join(self, route: Route, digest: str) -> Download:
        """The download of ``digest`` through ``route``'s upstream: the one under way, or a new one.

        Raises the upstream's RegistryError (404, 401, 502, ...) when the upstream refuses this
        route, and StoreUnavailable when the store cannot take the file.
        """
        key = (route.upstream.name, digest)
        while True:
            if key in self._active:
                return self._active[key]
            waiter: Deferred[Download] = Deferred()
            if key not in self._starting:
                if not self.capacity.can_store():
                    raise StoreUnavailable(f"the store refused a file less than {self.capacity.retry_after:g} s ago")
                self._starting[key] = (route, [waiter])
                ensureDeferred(self._start(route, digest)).addBoth(self._started, key)
                return await waiter
            starter, waiters = self._starting[key]
            waiters.append(waiter)
            try:
                return await waiter
            except (AlreadyStored, StoreUnavailable):
                raise  # true whichever repository asked
            except Exception:
                if starter.key == route.key:
                    raise
            # The starter's repository was refused (or its fetch failed); this one's may hold the
            # blob: fetch for itself, so its own access check decides.

    def _started(self, result: Download | Failure, key: _Key) -> None:
        for waiter in self._starting.pop(key)[1]:
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)

    def _fetching_elsewhere(self, route: Route, digest: str) -> bool:
        """Whether this node is fetching ``digest`` through another upstream (so holds its lease)."""
        upstream = route.upstream.name
        return any(u != upstream and d == digest for u, d in [*self._active, *self._starting])

    def _unavailable(self, error: OSError, what: str) -> StoreUnavailable:
        self.capacity.failed(error, what)
        return StoreUnavailable(f"the store cannot take {what}: {error}")

    async def _release(self, lease: Lease) -> None:
        try:
            await self.in_thread(lease.release)
        except OSError as error:  # a read-only store: the lease goes stale and is taken over
            log.warn("could not release the lease {name}: {error}", name=lease.name, error=error)

    async def _start(self, route: Route, digest: str) -> Download:
        lease: Lease | None = None
        # Another upstream's fetch of this digest here holds the lease; it may hang or fail
        # without this route's clients: fetch beside it, unleased (the store keeps one file).
        if not self._fetching_elsewhere(route, digest):
            try:
                lease = await self.in_thread(self.leases.try_take, parse_digest(digest), self.lease_timeout)
            except OSError as error:  # the lease is the first file this download writes
                raise self._unavailable(error, f"a lease for {digest}") from error
            if lease is None:
                return await self._follow_remote(route, digest)
        upstream = route.upstream.name
        try:
            # One trip to the pool, not two, before the upstream request: a client waits for it.
            others = await self.in_thread(self._unless_stored, digest)
            if others is None:
                raise AlreadyStored(digest)  # committed elsewhere between our lookup and the lease
            response: IResponse = await self.upstreams.client(upstream).get_blob(route.repository, digest)
            size = None if response.length is UNKNOWN_LENGTH else int(response.length)
            try:
                writer = await self.in_thread(self.storage.blobs.writer, digest, size)
            except OSError as error:
                response.deliverBody(Discard())
                raise self._unavailable(error, f"blob {digest}") from error
        except BaseException:
            if lease is not None:
                await self._release(lease)
            raise
        download = Download(digest, route, size, writer, self.clock, self.lanes(f"download {parse_digest(digest)[:12]}"))
        if others:
            self.clock.callLater(self.lease_timeout, lambda: ensureDeferred(self._drop_later(digest, writer.temp_path)))
        if lease is not None:
            download.lease = lease
            download.heartbeat = LoopingCall(lambda: ensureDeferred(self._heartbeat(download)))
            download.heartbeat.clock = self.clock
            download.heartbeat.start(self.lease_timeout / 3, now=False)
        sink = _BodySink(download, self.clock, route.upstream.read_timeout)
        self._active[(upstream, digest)] = download
        self.metrics.in_flight.inc()
        # From here every outcome, even an exception while starting the body, ends in _finish,
        # which unregisters the download: a stuck "active" entry would hang every later request.
        def finish(_: None) -> Deferred[None]:
            assert sink.reason is not None  # connectionLost sets it before it fires done
            return ensureDeferred(self._finish(download, sink.reason))

        sink.done.addCallback(finish)
        try:
            response.deliverBody(sink)
        except Exception:
            sink.connectionLost(Failure())
        return download

    async def _heartbeat(self, download: Download) -> None:
        lease = download.lease
        if lease is None:
            return
        try:
            ours = await self.in_thread(lease.heartbeat)
        except OSError as error:  # the store failing for a moment; the lease may go stale meanwhile
            log.warn("could not heartbeat the lease {name}: {error}", name=lease.name, error=error)
            return
        if not ours:
            self._step_aside(download)

    def _step_aside(self, download: Download) -> None:
        """The lease is no longer ours: another node judged this one dead (no heartbeat for
        ``lease_timeout``, as when the store stalls), took it over and removed our file. Unless
        every byte has verified already (then the commit goes ahead: one correct file either way),
        stop fetching and commit nothing; the followers go on from the other node's download."""
        download.lease = None  # not ours to release
        download.lease_lost = True
        if download.heartbeat is not None and download.heartbeat.running:
            download.heartbeat.stop()
        if download.verified or download.finished.called or download.flow is None:
            return  # every byte is in: the commit goes ahead, or _finish steps aside if it fails
        self._stepping_aside(download)
        if download.write_error is None:
            download.write_error = LeaseLost(f"the lease for {download.digest} was taken over")
        download.flow.stopProducing()

    def _stepping_aside(self, download: Download) -> None:
        download.recoverable = True
        log.warn(
            "lost the lease for {digest} to another node (this node's store stalled past lease_timeout?);"
            " stepping aside: its download is dropped and its clients are served from the other node's",
            digest=download.digest,
        )

    async def _still_ours(self, download: Download) -> bool:
        """Before a failed download blames upstream or the store: was it a stall long enough to lose
        the lease (its heartbeats hung with the store)? Then it steps aside instead (True if not)."""
        if download.lease is not None and not download.lease_lost:
            try:
                if await self.in_thread(download.lease.heartbeat):
                    return True
            except OSError:
                return True
            download.lease = None
        elif not download.lease_lost:
            return True
        if not isinstance(download.write_error, LeaseLost):
            self._stepping_aside(download)
        return False

    async def _follow_remote(self, route: Route, digest: str) -> Download:
        """Another node holds the lease: follow its file instead of fetching again."""
        # The HEAD confirms this repository may read the blob, and gives its size.
        size = await self.upstreams.client(route.upstream.name).head_blob(route.repository, digest)
        await self.index_writes(self.storage.index.link, [digest], route.key)
        download = Download(digest, route, size, None, self.clock)
        self._active[(route.upstream.name, digest)] = download
        ensureDeferred(self._watch_remote(download))
        return download

    async def _watch_remote(self, download: Download) -> None:
        committed = False
        try:
            while True:
                state, temp_path = await self.in_thread(self._remote_state, download.digest)
                if state != "writing":
                    committed = state == "committed"
                    break
                if temp_path is not None and temp_path != download.temp_path:
                    download.temp_path = temp_path
                download._wake()
                await deferLater(self.clock, REMOTE_POLL, lambda: None)
        finally:
            del self._active[(download.route.upstream.name, download.digest)]
            download._end(committed)

    def _unless_stored(self, digest: str) -> int | None:
        """None if the blob is stored; else, as it is about to be fetched, :meth:`_drop_stale_temps`:
        a lease taken over from a dead holder leaves its half-written file, which no node must
        follow instead of ours."""
        if self.storage.blobs.stat(digest) is not None:
            return None
        return self._drop_stale_temps(digest)

    def _drop_stale_temps(self, digest: str, keep: str | None = None) -> int:
        """Remove this digest's temp files untouched for ``lease_timeout``; how many others remain."""
        now = self.leases.clock()
        remaining = 0
        for path in self.storage.blobs.in_progress(digest):
            if path == keep:
                continue
            try:
                if now - os.stat(path).st_mtime > self.lease_timeout:
                    os.unlink(path)
                else:
                    remaining += 1
            except FileNotFoundError:
                continue
        return remaining

    async def _drop_later(self, digest: str, keep: str) -> None:
        """A dead holder may have written its file up to a heartbeat interval after its lease's last
        stamp, so at takeover its file can look fresher than ``lease_timeout``: look once more when
        it cannot (a live writer's file is never that old; ours is kept)."""
        try:
            await self.in_thread(self._drop_stale_temps, digest, keep)
        except OSError as error:
            log.warn("could not remove a dead download's file of {digest}: {error}", digest=digest, error=error)

    def _newest(self, paths: list[str], since: float | None) -> str | None:
        """The temp file written to most recently, if written to after ``since``: the live holder's.

        A holder that took the lease over from a dead one creates its file a moment after taking
        it, and removes the dead one's only after that: a file last written before the take-over
        (``since``: the lease's ``taken_at`` less a third of ``lease_timeout`` for clock skew, well
        after the dead holder's last write) is the dead one's, and following it would fail.
        """
        dated = []
        for path in paths:
            try:
                mtime = os.stat(path).st_mtime
            except FileNotFoundError:
                continue
            if since is None or mtime >= since:
                dated.append((mtime, path))
        return max(dated)[1] if dated else None

    def _remote_state(self, digest: str) -> tuple[str, str | None]:
        """("committed" | "writing" | "gone", temp file): runs in a thread, it reads the shared dir."""
        if self.storage.blobs.stat(digest) is not None:
            return "committed", None
        lease = self.leases.holder(parse_digest(digest))
        temps = self.storage.blobs.in_progress(digest)
        alive = lease is not None and lease.age(self.leases.clock()) <= self.lease_timeout
        if alive or (lease is not None and temps and lease.holder is None):
            assert lease is not None
            since = None if lease.taken_at is None else lease.taken_at - self.lease_timeout / 3
            return "writing", self._newest(temps, since)
        # Released or dead. Look at the blob's name once more: release comes right after commit.
        return ("committed" if self.storage.blobs.stat(digest) is not None else "gone"), None

    async def _finish(self, download: Download, reason: Failure) -> None:
        writer, lane = download.writer, download.lane
        assert writer is not None and lane is not None
        upstream = download.route.upstream.name
        client = self.upstreams.client(upstream)
        client.received(download.received_bytes)
        committed = False
        try:
            await download.flush()  # the last piece; the lane keeps order, so all are written then
            if download.write_error is None and reason.check(ResponseDone):
                await lane.run(writer.verify)
                download.verified = True
                download._wake()  # this node's followers may send their last byte before the fsync
                await lane.run(writer.commit)
                now = self.clock.seconds()
                await self.index_writes(
                    self.storage.index.put_blob, download.digest, download.received_bytes, now, None, download.route.key,
                )
                committed = True
                self.capacity.stored()
            elif not await self._still_ours(download):
                await lane.run(writer.abort)
            else:
                await lane.run(writer.abort)
                refused = store_error(download.write_error) if download.write_error is not None else None
                if refused is not None:  # out of space midway: the clients' retries go straight through
                    self.capacity.failed(refused, f"blob {download.digest}")
                else:
                    client.body_failed()
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
        except TempFileRemoved as removed:  # a node that took our lease over removed our file
            download.recoverable = True
            log.warn("download of {digest} not committed: {why}; another node took it over",
                     digest=download.digest, why=str(removed))
        except BlobWriteError as failure:
            client.body_failed()
            log.error("download of {digest} not committed: {why}", digest=download.digest, why=str(failure))
        except OSError as error:  # the fsync or rename of the commit: a full or read-only store
            await lane.run(writer.abort)
            self.capacity.failed(error, f"blob {download.digest}")
        finally:
            lane.close()
            if download.heartbeat is not None and download.heartbeat.running:
                download.heartbeat.stop()
            if download.lease is not None:
                await self._release(download.lease)
            del self._active[(upstream, download.digest)]
            self.metrics.in_flight.dec()
            download._end(committed)


def _write_pieces(writer: BlobWriter, pieces: list[bytes]) -> None:
    """In the lane: one ``writev`` of the pieces, then their hash. ``hashlib`` and ``os.writev``
    let go of the GIL, so this runs beside the reactor."""
    writer.write_pieces(pieces)
