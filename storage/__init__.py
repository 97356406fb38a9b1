"""metahub's blob store: content-addressed files plus a per-node LMDB index. No Twisted, no HTTP.

The server needs exactly this API::

    from storage import Storage, FollowState, DigestMismatch, SizeMismatch, BlobNotFound

    store = Storage("/srv/store", "/var/lib/metahub/index")   # open in startService, not at import
    store.index.get_blob(digest)  # BlobRecord(size, media_type, ...) or None: a file the index lacks
    store.blobs.stat(digest)      # BlobFile(digest, size, mtime) or None, which the caller adopts:
    store.index.put_blob(...)     # (see below) from the thread that writes the index
    store.forget(digest)          # the file was gone (evicted elsewhere): drop the index entry
    store.reindex()               # rebuild the index from the files (maintenance, full scan)
    store.clean_leftovers(leases) # dead writers' temp files, leases, break files and tombs (hourly)
    store.close()

    # Writing (one per download): verified, fsynced, atomically renamed; nothing partial is visible.
    with store.blobs.writer(digest, size=None) as w:
        w.write(chunk)            # hashes as it writes; bytes reach the OS at once (followers see them)
        w.verify()                # optional: check size and digest now, before the fsync
        w.commit()                # raises DigestMismatch / SizeMismatch and leaves nothing behind

    # Reading a committed blob, optionally a byte range [start, end):
    with store.blobs.open(digest, start, end) as r:   # BlobNotFound if absent
        r.size, r.remaining, r.read(n), r.fileno()

    # Reading a blob that may still be written (by this process, another process or another node):
    f = store.blobs.follow(digest)    # None when neither committed nor being written
    data = f.read(n)                  # never waits; b"" means "nothing new yet" or "done"
    f.state                           # FollowState.WRITING / COMMITTED / FAILED
    f.idle_seconds()                  # how long the writer has been silent (dead-writer detection)
    f.vouch(size)                     # this process's writer verified: done at size, before the rename

    # The index (store.index): per blob size, media type, created, last access and linked
    # repositories; per (upstream, repository, tag) the digest and when it was last confirmed.
    store.index.put_blob(digest, size, now, media_type=None, repository=None)
    store.index.link([digest, ...], repo); store.index.is_linked(digest, repo)
    store.index.record_access(digest, now); store.index.flush_access()   # batched last-access
    store.index.set_tag(upstream, repo, tag, digest, checked=now); store.index.get_tag(...)
    with store.index.batch() as b:    # many writes, BATCH_RECORDS per transaction (fill, reindex)
        b.put_blob(...); b.link(...); b.set_tag(...); b.remove_blob(digest)

Shared by the nodes of a cluster (plain files in the store directory; see each module's docstring
for the protocol and what holds on NFS)::

    from storage import Leases, SharedTags, AccessStamps, stamp_access, collect, collect_with_lease
    from storage import verify, stats

    leases = Leases(store.blobs.root, clock=time.time)   # <root>/leases/<name>.lease
    lease = leases.try_take(name, stale_after=30.0)     # Lease, or None: another live node holds it
                                  # name: parse_digest(digest) for a fetch, GC_LEASE ("gc") for gc
    lease.heartbeat()             # refresh; False when it was lost (taken over as stale)
    lease.release()               # removes it only if still ours
    leases.holder(name)           # LeaseInfo(name, holder, taken_at, heartbeat) or None
    leases.iter_leases()          # every lease file, held or stale
    leases.clean(older_than)      # leftovers of dead nodes (leases, break files, tombs)

    tags = SharedTags(store.blobs.root)                 # <root>/tags/<upstream>/<repo>/_tags/<tag>.json
    tags.write(upstream, repo, tag, digest, checked=now)   # atomic replace, readable by every node
    tags.read(upstream, repo, tag)                      # TagRecord(digest, checked) or None

    # LRU eviction: a blob file's mtime is its last access, stamped in batches.
    stamps = AccessStamps(resolution=60.0); stamps.note(digest, now)
    stamps.flush(store.blobs, now)                     # -> digests whose file was gone
    stamp_access(store.blobs, digests, now)            # the same, unbuffered
    collect(store.blobs, max_size, now, grace, pinned, dry_run=False)
        # -> GcResult(before_bytes, after_bytes, removed, kept_pinned, kept_recent, ...)
    collect_with_lease(store.blobs, leases, max_size, now, grace, pinned)   # None: gc runs elsewhere

    verify(store.blobs, quarantine=True, progress=cb)  # VerifyResult(checked, corrupt, vanished)
    stats(store.blobs)            # StoreStats(blob_count, total_bytes, temp_files, leases, quarantined)

Digests are validated (``sha256:`` + 64 lowercase hex, :func:`parse_digest`) before they become a
path; anything else raises :class:`InvalidDigest` (a ``ValueError``). Digest strings are made and
taken apart by ``storage.digest`` alone (``sha256_digest``, ``from_hex``, ``parse_digest``,
``is_digest``; ``matches`` for a body an upstream names by any registered algorithm), in metahub too.

All calls block on file I/O. On a shared filesystem that may stall, call them from a thread.
"""
from .blobstore import (
    BlobFile,
    BlobFollower,
    BlobNotFound,
    BlobReader,
    BlobStore,
    BlobWriteError,
    BlobWriter,
    DigestMismatch,
    FollowFailure,
    FollowState,
    SizeMismatch,
    TempFileRemoved,
)
from .digest import (
    ALGORITHM,
    ALGORITHMS,
    InvalidDigest,
    algorithm_of,
    from_hex,
    is_digest,
    matches,
    parse_digest,
    sha256_digest,
)
from .exclusive import create_exclusive
from .index import BATCH_RECORDS, BlobRecord, Index, IndexBatch, TagRecord
from .index_lock import IndexInUse, IndexLock
from .gc import (
    DEFAULT_GC_STALE_AFTER,
    GC_LEASE,
    AccessStamps,
    GcResult,
    collect,
    collect_with_lease,
    stamp_access,
)
from .lease import InvalidLeaseName, Lease, LeaseInfo, Leases
from .shared_tags import InvalidTagPath, SharedTags
from .store import ReindexResult, Storage
from .verify import StoreStats, VerifyProgress, VerifyResult, quarantine_dir, stats, verify

__all__ = [
    "ALGORITHM",
    "ALGORITHMS",
    "AccessStamps",
    "BATCH_RECORDS",
    "BlobFile",
    "BlobFollower",
    "BlobNotFound",
    "BlobReader",
    "BlobRecord",
    "BlobStore",
    "BlobWriteError",
    "BlobWriter",
    "DEFAULT_GC_STALE_AFTER",
    "DigestMismatch",
    "FollowFailure",
    "FollowState",
    "GC_LEASE",
    "GcResult",
    "Index",
    "IndexBatch",
    "IndexInUse",
    "IndexLock",
    "InvalidDigest",
    "InvalidLeaseName",
    "InvalidTagPath",
    "Lease",
    "LeaseInfo",
    "Leases",
    "ReindexResult",
    "SharedTags",
    "SizeMismatch",
    "Storage",
    "StoreStats",
    "TagRecord",
    "TempFileRemoved",
    "VerifyProgress",
    "VerifyResult",
    "algorithm_of",
    "collect",
    "create_exclusive",
    "from_hex",
    "collect_with_lease",
    "is_digest",
    "matches",
    "parse_digest",
    "quarantine_dir",
    "sha256_digest",
    "stamp_access",
    "stats",
    "verify",
]
