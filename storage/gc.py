"""Bounded size: evict the least recently used blobs, one collector per cluster at a time.

Last access lives in the blob file's **mtime**. Blobs are immutable, so their mtime carries no other
meaning once the file is committed (it starts as the commit time, i.e. the first access); nodes
restamp it when they serve a blob (:func:`stamp_access`, batched by :class:`AccessStamps`, never per
request) with explicit times, ``os.utime(path, (now, now))``. Not atime: ``noatime``/``relatime``
mounts and NFS attribute caching make atime useless as a shared record. Stamping with explicit times
requires owning the file, so all nodes must run as the same uid.

:func:`collect` scans the store, sorts blobs by mtime, and unlinks the oldest until the total size is
at most ``max_size``, skipping pinned digests and blobs stamped within ``grace`` seconds. Just before
each unlink it opens the file again (which, on NFS, revalidates the attributes instead of trusting
the attribute cache) and spares it if another node stamped it since the scan; a stamp landing after
that instant is lost, which costs one refetch. Removal is a plain unlink: a reader that has the file
open keeps reading it (on NFS the client that holds it open "silly-renames" it to ``.nfsXXXX`` until
closed, which the blob scan ignores), and a later request fetches the blob again. Indexes of other
nodes learn that a file is gone when they try to open it (:meth:`storage.Storage.forget`).

One node at a time collects: :func:`collect_with_lease` takes the cluster lease ``gc`` and
heartbeats it while it works, stopping early if the lease is lost. Two collectors at once would
still be safe (they pick the same oldest blobs; unlinking a missing file is a no-op), only wasteful.

Sizes are ``st_size`` of committed blobs as of the scan; temporary files of downloads in progress
are not counted. ``grace`` should be much larger than the access-stamp batching interval, the NFS
attribute cache time (``actimeo``) and the longest download, so a blob that is in use is never the
oldest.
"""
from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from .blobstore import BlobStore
from .lease import Leases

#: The lease name the collector runs under.
GC_LEASE = "gc"
#: A collector without a heartbeat for this long is presumed dead and its lease taken over.
DEFAULT_GC_STALE_AFTER = 120.0
_SCAN_CHECK_EVERY = 1000


def stamp_access(store: BlobStore, digests: Iterable[str], now: float) -> list[str]:
    """Set each blob's mtime (its last access) to ``now``; returns the digests whose file was gone.

    Call it with a batch (see :class:`AccessStamps`); the returned digests were evicted elsewhere and
    can be dropped from the node's index.
    """
    missing = []
    for digest in digests:
        try:
            os.utime(store.path(digest), (now, now))
        except FileNotFoundError:
            missing.append(digest)
    return missing


class AccessStamps:
    """Remembers which blobs were read and stamps them in one batch per :meth:`flush`.

    A blob stamped less than ``resolution`` seconds ago is not stamped again, so a hot blob costs one
    ``utime`` per ``resolution``, not one per request. ``note`` is cheap (a set add) and may be
    called from the event loop; ``flush`` does file I/O and belongs in a thread.
    """

    def __init__(self, resolution: float = 60.0) -> None:
        self.resolution = resolution
        # The event loop's notes and a flush's taking of them must not interleave: a note added to
        # the set a flush is stamping would break its iteration, or be lost.
        self._lock = threading.Lock()
        self._pending: set[str] = set()
        self._stamped: dict[str, float] = {}

    def note(self, digest: str, now: float) -> None:
        last = self._stamped.get(digest)
        if last is None or now - last >= self.resolution:
            with self._lock:
                self._pending.add(digest)

    def flush(self, store: BlobStore, now: float) -> list[str]:
        """Stamp every noted blob with ``now``; returns the digests whose file was gone."""
        with self._lock:
            pending, self._pending = self._pending, set()
        missing = stamp_access(store, pending, now)
        gone = set(missing)
        stamped = {d: t for d, t in self._stamped.items() if now - t < self.resolution}
        stamped.update((digest, now) for digest in pending if digest not in gone)
        self._stamped = stamped
        return missing


@dataclass(frozen=True)
class GcResult:
    before_bytes: int  # committed blobs at the scan
    after_bytes: int  # before_bytes minus what was removed (or would be, in a dry run)
    removed: list[str]  # oldest first
    kept_pinned: list[str] = field(default_factory=list)  # pinned digests present in the store
    kept_recent: list[str] = field(default_factory=list)  # unpinned blobs accessed within grace
    removed_bytes: int = 0
    dry_run: bool = False
    interrupted: bool = False  # stopped early (the gc lease was lost)


def collect(
    store: BlobStore,
    max_size: int,
    now: float,
    grace: float,
    pinned: set[str] | frozenset[str] = frozenset(),
    dry_run: bool = False,
    keep_going: Callable[[], bool] | None = None,
) -> GcResult:
    """Evict least recently used blobs until the store holds at most ``max_size`` bytes.

    Never evicts a digest in ``pinned`` or a blob whose mtime is within ``grace`` seconds of ``now``
    (or in the future). ``dry_run`` reports what would go and removes nothing. ``keep_going`` is
    called now and then (every thousand blobs scanned and before each removal); returning False
    stops the collection with what was done so far.
    """
    blobs = []
    scanned = 0
    for found in store.iter_blobs():
        blobs.append(found)
        scanned += 1
        if keep_going is not None and scanned % _SCAN_CHECK_EVERY == 0 and not keep_going():
            total = sum(b.size for b in blobs)
            return GcResult(total, total, [], dry_run=dry_run, interrupted=True)
    before = sum(b.size for b in blobs)
    blobs.sort(key=lambda b: (b.mtime, b.digest))
    kept_pinned = [b.digest for b in blobs if b.digest in pinned]
    kept_recent = [b.digest for b in blobs if b.digest not in pinned and now - b.mtime < grace]
    protected = set(kept_pinned) | set(kept_recent)

    total = before
    removed: list[str] = []
    removed_bytes = 0
    interrupted = False
    for found in blobs:
        if total <= max_size:
            break
        if found.digest in protected:
            continue
        if dry_run:
            removed.append(found.digest)
            removed_bytes += found.size
            total -= found.size
            continue
        if keep_going is not None and not keep_going():
            interrupted = True
            break
        path = store.path(found.digest)
        current = _fresh_mtime(path)
        if current is None:
            total -= found.size  # gone already (another collector, or verify's quarantine)
            continue
        if now - current < grace:
            kept_recent.append(found.digest)  # a node stamped it since the scan
            continue
        try:
            os.unlink(path)
        except FileNotFoundError:
            total -= found.size
            continue
        removed.append(found.digest)
        removed_bytes += found.size
        total -= found.size
    return GcResult(
        before_bytes=before,
        after_bytes=total,
        removed=removed,
        kept_pinned=kept_pinned,
        kept_recent=kept_recent,
        removed_bytes=removed_bytes,
        dry_run=dry_run,
        interrupted=interrupted,
    )


def _fresh_mtime(path: str) -> float | None:
    """The file's mtime from an open + fstat (close-to-open revalidation on NFS), None if gone."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        return os.fstat(fd).st_mtime
    finally:
        os.close(fd)


def collect_with_lease(
    store: BlobStore,
    leases: Leases,
    max_size: int,
    now: float,
    grace: float,
    pinned: set[str] | frozenset[str] = frozenset(),
    dry_run: bool = False,
    stale_after: float = DEFAULT_GC_STALE_AFTER,
) -> GcResult | None:
    """:func:`collect` under the cluster lease ``gc``; None if another node is collecting.

    The lease is heartbeated every ``stale_after / 4`` seconds (by ``leases.clock``) while the
    collection runs, taken over from a collector silent for ``stale_after``, and released at the end.
    """
    lease = leases.try_take(GC_LEASE, stale_after)
    if lease is None:
        return None
    interval = stale_after / 4
    last = [leases.clock()]

    def keep_going() -> bool:
        moment = leases.clock()
        if moment - last[0] < interval:
            return True
        last[0] = moment
        return lease.heartbeat()

    try:
        return collect(store, max_size, now, grace, pinned, dry_run=dry_run, keep_going=keep_going)
    finally:
        lease.release()


__all__ = [
    "AccessStamps",
    "DEFAULT_GC_STALE_AFTER",
    "GC_LEASE",
    "GcResult",
    "collect",
    "collect_with_lease",
    "stamp_access",
]
