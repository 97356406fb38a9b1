"""Blob requests: from the store when cached, else through the single-flight download, else (when
the store cannot take a file) straight from upstream, verified and not kept.

A cached blob is served for repository R only if R is linked to it (R's manifest referenced it, or it
was fetched through R) or upstream confirms R has it: a digest alone must not let one repository's
private layers be read through another name.

A response following a download whose source goes away (another node died or stepped aside, or
this node stepped aside for the node that took its lease over) is carried on by :meth:`Blobs._resume`:
it joins the digest's download again (which follows the live holder, takes a dead holder's lease
over and fetches the whole blob, or finds it committed) and follows that from the byte the client
has, hashing the bytes already sent with the new ones.
"""
from __future__ import annotations

import os

from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.interfaces import IReactorFDSet, IReactorTime
from twisted.web.iweb import UNKNOWN_LENGTH
from twisted.web.server import Request

from metahub.cache.capacity import StoreUnavailable
from metahub.cache.downloads import AlreadyStored, Download, Downloads
from metahub.cache.routing import Route
from metahub.oci import errors
from metahub.runtime.memory import Releaser
from metahub.runtime.metrics import Metrics
from metahub.runtime.threads import ThreadRunner
from metahub.upstream.discard import Discard
from metahub.upstream.upstreams import Upstreams
from metahub.web.headers import header_text
from metahub.web.passthrough import VerifyingRelay
from metahub.web.ranges import content_range, parse_range
from metahub.web.sendfile import send_file, zero_copy_socket
from metahub.web.streaming import WaitForMore, send
from storage import (
    BlobFollower,
    BlobNotFound,
    BlobRecord,
    BlobStore,
    BlobWriteError,
    FollowState,
    Storage,
)


def _follow(blobs: BlobStore, download: Download) -> BlobFollower | None:
    """Follow the download's temporary file (or whatever is there: the blob, if it has committed)."""
    if download.temp_path is not None:
        try:
            fd = os.open(download.temp_path, os.O_RDONLY)
        except FileNotFoundError:
            pass
        else:
            return BlobFollower(blobs, download.digest, fd, download.temp_path)
    return blobs.follow(download.digest)


class Blobs:
    def __init__(
        self,
        *,
        storage: Storage,
        upstreams: Upstreams,
        downloads: Downloads,
        clock: IReactorTime,
        in_thread: ThreadRunner,
        metrics: Metrics,
        releaser: Releaser | None = None,
        read_in_thread: ThreadRunner,
        fds: IReactorFDSet | None = None,
    ) -> None:
        self.storage = storage
        self.releaser = releaser
        self.upstreams = upstreams
        self.downloads = downloads
        self.clock = clock
        self.in_thread = in_thread
        #: Reads of files already open: a pool of their own, never queued behind opens that a
        #: stalled store holds up (docs/cluster.md).
        self.read_in_thread = read_in_thread
        #: The reactor's descriptor set, for the zero-copy path of cached blobs on plain TCP
        #: (metahub.web.sendfile); without it every body goes through the copy loop.
        self.fds = fds
        self.metrics = metrics

    async def find(self, digest: str) -> BlobRecord | None:
        """The index's record, or a stat of the file (in a thread: the store may be on NFS), which
        the index then adopts (here, on the thread that writes the index: storage.store says why)."""
        record = self.storage.index.get_blob(digest)
        if record is not None:
            return record
        found = await self.in_thread(self.storage.blobs.stat, digest)
        if found is None:
            return None
        return self.storage.index.put_blob(digest, found.size, self.clock.seconds())

    async def confirm(self, route: Route, digest: str) -> None:
        """Make sure ``route``'s repository may see ``digest``; link it if upstream says so."""
        if self.storage.index.is_linked(digest, route.key):
            return
        await self.upstreams.client(route.upstream.name).head_blob(route.repository, digest)
        self.storage.index.link([digest], route.key)

    def _headers(self, request: Request, digest: str, status: int, length: int | None) -> None:
        request.setResponseCode(status)
        request.setHeader("Content-Type", "application/octet-stream")
        request.setHeader("Docker-Content-Digest", digest)
        request.setHeader("Accept-Ranges", "bytes")
        if length is not None:
            request.setHeader("Content-Length", str(length))

    async def serve(self, request: Request, route: Route, digest: str, head: bool) -> None:
        if self.releaser is None:
            return await self._serve(request, route, digest, head)
        self.releaser.started()
        try:
            await self._serve(request, route, digest, head)
        finally:
            self.releaser.ended()

    async def _serve(self, request: Request, route: Route, digest: str, head: bool) -> None:
        record = await self.find(digest)
        if record is not None:
            await self.confirm(route, digest)
            if await self._serve_cached(request, digest, head):
                return
        self.metrics.cache.labels("blob", "miss").inc()
        if head:
            size = await self.upstreams.client(route.upstream.name).head_blob(route.repository, digest)
            # Exactly what a GET would answer: the same range rules, on the size upstream gives.
            wanted = parse_range(_range_header(request), size) if size is not None else None
            self._range_headers(request, digest, wanted, size)
            request.finish()
            return
        retried = False
        while True:
            try:
                download = await self.downloads.join(route, digest)
            except AlreadyStored:  # another node committed it a moment ago, through some repository
                await self.confirm(route, digest)
                if not await self._serve_cached(request, digest, head):
                    raise errors.blob_unknown(digest) from None
                return
            except StoreUnavailable:
                await self._pass_through(request, route, digest)
                return
            if download.route.key != route.key:  # joined a download another repository asked for
                await self.confirm(route, digest)
            # Another node's download (through whichever upstream) or another repository's failed
            # before this client got a byte: not this route's failure, so fetch once for itself.
            may_retry = not retried and (download.writer is None or download.route.key != route.key)
            wanted = parse_range(_range_header(request), download.size) if download.size is not None else None
            if wanted is not None and wanted != (0, download.size):
                # A partial range of a blob still downloading: serve it once verified.
                if not await download.outcome():
                    if may_retry:
                        retried = True
                        continue
                    raise errors.bad_gateway(f"upstream {route.upstream.name} failed to deliver {digest}")
                if not await self._serve_cached(request, digest, head):
                    raise errors.blob_unknown(digest)
                return
            follower = await self._follower(download)
            if follower is not None:
                break
            if not may_retry:
                raise errors.bad_gateway(f"upstream {route.upstream.name} failed to deliver {digest}")
            retried = True
        # ``wanted`` is None or the whole blob (``bytes=0-``: a 206 of every byte, as when cached).
        self._range_headers(request, digest, wanted, download.size)
        followed = [download]  # the download the response follows now: _resume may move it on

        def resume(old: BlobFollower) -> Deferred[tuple[BlobFollower, WaitForMore] | None]:
            return ensureDeferred(self._resume(route, digest, old, followed))

        await send(
            request, follower, self.read_in_thread, lambda n: self.metrics.bytes_served.labels("upstream").inc(n),
            wait_for_more(follower, download), download.size, resume,
            lambda reason: self.metrics.responses_aborted.labels(reason).inc(),
        )

    async def _resume(
        self, route: Route, digest: str, old: BlobFollower, followed: list[Download]
    ) -> tuple[BlobFollower, WaitForMore] | None:
        """A successor for ``old``, whose source went away without a wrong byte; None if there is none."""
        if not followed[0].recoverable:
            return None  # this node's own fetch failed (upstream, or the store): the client is told
        try:
            delivered = await self.read_in_thread(old.delivered_hash)
        except (OSError, BlobWriteError):
            return None
        try:
            download = await self.downloads.join(route, digest)
        except AlreadyStored:  # committed, by whichever node: finish from the blob itself
            stored = await self.in_thread(self.storage.blobs.follow, digest)
            if stored is None:
                return None
            stored.carry_on(old.position, delivered)
            return stored, _committed
        except (StoreUnavailable, errors.RegistryError):
            return None
        if download.route.key != route.key:
            await self.confirm(route, digest)
        follower = await self._follower(download)
        if follower is None:
            return None
        follower.carry_on(old.position, delivered)
        followed[0] = download
        return follower, wait_for_more(follower, download)

    async def _pass_through(self, request: Request, route: Route, digest: str) -> None:
        """The store cannot take the blob: relay it from upstream to this client alone, verified."""
        upstream = route.upstream
        self.downloads.capacity.bypassed("blob")
        client = self.upstreams.client(upstream.name)
        response = await client.get_blob(route.repository, digest)
        size = None if response.length is UNKNOWN_LENGTH else int(response.length)
        try:
            wanted = parse_range(_range_header(request), size) if size is not None else None
        except errors.RegistryError:
            response.deliverBody(Discard())
            raise
        self._range_headers(request, digest, wanted, size)
        start, end = wanted if wanted is not None else (0, size)
        relay = VerifyingRelay(
            request, digest, size, start, end, self.clock, upstream.read_timeout,
            lambda n: self.metrics.bytes_served.labels("upstream").inc(n),
        )
        response.deliverBody(relay)
        await relay.done
        client.received(relay.received)

    async def _follower(self, download: Download) -> BlobFollower | None:
        """A reader of the download; another node's file may take a moment to appear."""
        while True:
            # Another node's download: wait until its watcher has found the holder's file, rather
            # than picking any file for this digest (a dead holder's may still be there).
            remote_pending = download.writer is None and download.temp_path is None and not download.finished.called
            follower = None if remote_pending else await self.in_thread(_follow, self.storage.blobs, download)
            if follower is not None:
                # A writer silent as long as upstream may be is dead (killed mid-download).
                follower.stall_timeout = download.route.upstream.read_timeout
                # Another node's file over a shared filesystem: trust only bytes that hash right.
                follower.verify_bytes = download.writer is None
                return follower
            if download.finished.called:
                return None
            await download.changed()

    async def _serve_cached(self, request: Request, digest: str, head: bool) -> bool:
        """Serve from the store; False if the file turned out to be gone (evicted elsewhere)."""
        try:
            reader = await self.in_thread(self.storage.blobs.open, digest)
        except BlobNotFound:
            self.storage.forget(digest)
            return False
        try:  # the reader is closed on every path, whatever ends the response
            self.metrics.cache.labels("blob", "hit").inc()
            self.storage.record_access(digest, self.clock.seconds())
            size = reader.size
            wanted = parse_range(_range_header(request), size)
            if wanted is not None:
                reader.close()
                reader = await self.in_thread(self.storage.blobs.open, digest, *wanted)
            self._range_headers(request, digest, wanted, size)
            if head:
                request.finish()
                return True
            def served(n: int) -> None:
                self.metrics.bytes_served.labels("cache").inc(n)

            fds = self.fds
            connection = zero_copy_socket(request, reader) if fds is not None else None
            if fds is not None and connection is not None:
                await send_file(request, reader, connection, self.read_in_thread, fds, served)
            else:
                await send(request, reader, self.read_in_thread, served)
            return True
        finally:
            reader.close()

    def _range_headers(self, request: Request, digest: str, wanted: tuple[int, int] | None, size: int | None) -> None:
        """200 with the whole size, or 206 with ``Content-Range`` for ``wanted``."""
        if wanted is None:
            self._headers(request, digest, 200, size)
            return
        assert size is not None
        self._headers(request, digest, 206, wanted[1] - wanted[0])
        request.setHeader("Content-Range", content_range(wanted[0], wanted[1], size))


def wait_for_more(follower: BlobFollower, download: Download) -> WaitForMore:
    """What a follower of ``download`` awaits once it has read everything that has landed."""

    async def more() -> None:
        if not _vouch(follower, download):
            await download.changed(follower.position)
            if not _vouch(follower, download) and download.committed is False and download.recoverable:
                # Another node's download that ended unfinished (its holder died, or stepped
                # aside), or ours that stepped aside: no more bytes will land in this file.
                follower.abandon()

    return lambda: ensureDeferred(more())


def _committed() -> Deferred[None]:
    """The ``wait_for_more`` of a committed blob's follower: never waited on (it has every byte)."""
    return succeed(None)


def _vouch(follower: BlobFollower, download: Download) -> bool:
    """Let a follower of this node's download end once the bytes verified, before the commit's
    fsync (which can take longer than the whole transfer). True if the follower is done."""
    if download.verified and download.writer is not None and follower.temp_path == download.temp_path:
        follower.vouch(download.written_bytes)
    return follower.state is not FollowState.WRITING


def _range_header(request: Request) -> str | None:
    return header_text(request, b"range")
