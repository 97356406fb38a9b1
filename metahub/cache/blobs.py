"""Where a blob comes from: the store when cached, else the single-flight download, else (when the
store cannot take a file) straight from upstream. The HTTP face (:mod:`metahub.web.blobs`) asks
:class:`BlobCache` and writes what it answers; nothing here knows about requests or headers.

A cached blob is served for repository R only if R is linked to it (R's manifest referenced it, or it
was fetched through R) or upstream confirms R has it: a digest alone must not let one repository's
private layers be read through another name.

A response following a download whose source goes away (another node died or stepped aside, or
this node stepped aside for the node that took its lease over) is carried on by its
:attr:`Following.resume`: it joins the digest's download again (which follows the live holder, takes
a dead holder's lease over and fetches the whole blob, or finds it committed) and follows that from
the byte the client has, hashing the bytes already sent with the new ones.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse

from metahub.cache.capacity import StoreUnavailable
from metahub.cache.downloads import AlreadyStored, Download, Downloads
from metahub.cache.routing import Route
from metahub.oci import errors
from metahub.runtime.metrics import Metrics
from metahub.runtime.threads import ThreadRunner
from metahub.upstream.upstreams import Upstreams
from storage import (
    BlobFollower,
    BlobNotFound,
    BlobReader,
    BlobRecord,
    BlobStore,
    BlobWriteError,
    FollowState,
    Storage,
)

#: ``wait_for_more`` of a follower: awaited when no new bytes have landed.
WaitForMore = Callable[[], Deferred[None]]
#: Given a follower that FAILED without a wrong byte: a successor carrying on from its position, and
#: the successor's ``wait_for_more``; None when there is none.
Recover = Callable[[BlobFollower], Deferred["tuple[BlobFollower, WaitForMore] | None"]]


@dataclass(frozen=True)
class Committed:
    """A blob in the store, open: the caller closes ``reader``."""

    reader: BlobReader
    size: int


@dataclass(frozen=True)
class Following:
    """A download to follow from its first byte; ``size`` is None when upstream did not say."""

    follower: BlobFollower
    size: int | None
    wait_for_more: WaitForMore
    resume: Recover


@dataclass(frozen=True)
class Bypass:
    """The store cannot take the blob: upstream's response, to relay to this client alone, verified.

    The caller delivers ``response``'s body (or discards it) and reports the bytes that came in to
    ``received``."""

    response: IResponse
    size: int | None
    read_timeout: float
    received: Callable[[int], None]


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


class BlobCache:
    def __init__(
        self,
        *,
        storage: Storage,
        upstreams: Upstreams,
        downloads: Downloads,
        clock: IReactorTime,
        in_thread: ThreadRunner,
        index_writes: ThreadRunner,
        read_in_thread: ThreadRunner,
        metrics: Metrics,
    ) -> None:
        self.storage = storage
        self.upstreams = upstreams
        self.downloads = downloads
        self.clock = clock
        self.in_thread = in_thread
        #: Every write of the index, in order, on a thread of its own: each commit waits for the disk.
        self.index_writes = index_writes
        #: Reads of files already open: a pool of their own, never queued behind opens that a
        #: stalled store holds up (docs/cluster.md).
        self.read_in_thread = read_in_thread
        self.metrics = metrics

    async def find(self, digest: str) -> BlobRecord | None:
        """The index's record, or a stat of the file (in a thread: the store may be on NFS), which
        the index then adopts."""
        record = self.storage.index.get_blob(digest)
        if record is not None:
            return record
        found = await self.in_thread(self.storage.blobs.stat, digest)
        if found is None:
            return None
        return await self.index_writes(self.storage.index.put_blob, digest, found.size, self.clock.seconds())

    async def confirm(self, route: Route, digest: str) -> None:
        """Make sure ``route``'s repository may see ``digest``; link it if upstream says so."""
        if self.storage.index.is_linked(digest, route.key):
            return
        await self.upstreams.client(route.upstream.name).head_blob(route.repository, digest)
        await self.index_writes(self.storage.index.link, [digest], route.key)

    async def cached(self, route: Route, digest: str) -> Committed | None:
        """The stored blob, open, if ``route`` may see it; None (a miss, counted) if it is not there."""
        if await self.find(digest) is not None:
            await self.confirm(route, digest)
            committed = await self.open(digest)
            if committed is not None:
                return committed
        self.metrics.count_lookup("blob", "miss")
        return None

    async def open(self, digest: str) -> Committed | None:
        """Open the stored blob (a hit); None if the file turned out to be gone (evicted elsewhere)."""
        try:
            reader = await self.in_thread(self.storage.blobs.open, digest)
        except BlobNotFound:
            await self.index_writes(self.storage.forget, digest)
            return None
        try:
            self.metrics.count_lookup("blob", "hit")
            self.storage.record_access(digest, self.clock.seconds())
        except BaseException:
            reader.close()
            raise
        return Committed(reader, reader.size)

    async def upstream_size(self, route: Route, digest: str) -> int | None:
        """Upstream's word that ``route``'s repository has the blob, and its size if upstream says."""
        return await self.upstreams.client(route.upstream.name).head_blob(route.repository, digest)

    async def fetch(self, route: Route, digest: str, partial: Callable[[int], bool]) -> Committed | Following | Bypass:
        """Join (or start) the blob's download: a download to follow, or the blob once committed.

        ``partial(size)`` says whether the client wants only part of a blob of ``size`` bytes: that
        part is served from the committed blob once verified, never from a download under way.
        Raises :class:`metahub.oci.errors.RegistryError` when the blob cannot be had."""
        retried = False
        while True:
            try:
                download = await self.downloads.join(route, digest)
            except AlreadyStored:  # another node committed it a moment ago, through some repository
                await self.confirm(route, digest)
                return await self._committed(digest)
            except StoreUnavailable:
                return await self._bypass(route, digest)
            if download.route.key != route.key:  # joined a download another repository asked for
                await self.confirm(route, digest)
            # Another node's download (through whichever upstream) or another repository's failed
            # before this client got a byte: not this route's failure, so fetch once for itself.
            may_retry = not retried and (download.writer is None or download.route.key != route.key)
            if download.size is not None and partial(download.size):
                if not await download.outcome():
                    if may_retry:
                        retried = True
                        continue
                    raise errors.bad_gateway(f"upstream {route.upstream.name} failed to deliver {digest}")
                return await self._committed(digest)
            follower = await self._follower(download)
            if follower is not None:
                return self._following(route, digest, follower, download)
            if not may_retry:
                raise errors.bad_gateway(f"upstream {route.upstream.name} failed to deliver {digest}")
            retried = True

    async def _committed(self, digest: str) -> Committed:
        committed = await self.open(digest)
        if committed is None:
            raise errors.blob_unknown(digest)
        return committed

    def _following(self, route: Route, digest: str, follower: BlobFollower, download: Download) -> Following:
        followed = [download]  # the download the response follows now: resume may move it on

        def resume(old: BlobFollower) -> Deferred[tuple[BlobFollower, WaitForMore] | None]:
            return ensureDeferred(self._resume(route, digest, old, followed))

        return Following(follower, download.size, wait_for_more(follower, download), resume)

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

    async def _bypass(self, route: Route, digest: str) -> Bypass:
        """The store cannot take the blob: upstream's response for this client alone, counted."""
        self.downloads.capacity.bypassed("blob")
        client = self.upstreams.client(route.upstream.name)
        response = await client.get_blob(route.repository, digest)
        size = None if response.length is UNKNOWN_LENGTH else int(response.length)
        return Bypass(response, size, route.upstream.read_timeout, client.received)

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
