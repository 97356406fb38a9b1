"""metahub's blob store: content-addressed files plus a per-node LMDB index. No Twisted, no HTTP.

The server needs exactly this API::

    from storage import Storage, FollowState, DigestMismatch, SizeMismatch, BlobNotFound

    store = Storage("/srv/store", "/var/lib/metahub/index")   # open in startService, not at import
    store.lookup(digest)          # BlobRecord(size, media_type, ...) or None; adopts files the index lacks
    store.forget(digest)          # the file was gone (evicted elsewhere): drop the index entry
    store.reindex()               # rebuild the index from the files (maintenance, full scan)
    store.close()

    # Writing (one per download): verified, fsynced, atomically renamed; nothing partial is visible.
    with store.blobs.writer(digest, size=None) as w:
        w.write(chunk)            # hashes as it writes; bytes reach the OS at once (followers see them)
        w.commit()                # raises DigestMismatch / SizeMismatch and leaves nothing behind

    # Reading a committed blob, optionally a byte range [start, end):
    with store.blobs.open(digest, start, end) as r:   # BlobNotFound if absent
        r.size, r.remaining, r.read(n), r.fileno()

    # Reading a blob that may still be written (by this process, another process or another node):
    f = store.blobs.follow(digest)    # None when neither committed nor being written
    data = f.read(n)                  # never waits; b"" means "nothing new yet" or "done"
    f.state                           # FollowState.WRITING / COMMITTED / FAILED
    f.idle_seconds()                  # how long the writer has been silent (dead-writer detection)

    # The index (store.index): per blob size, media type, created, last access and linked
    # repositories; per (upstream, repository, tag) the digest and when it was last confirmed.
    store.index.put_blob(digest, size, now, media_type=None, repository=None)
    store.index.link([digest, ...], repo); store.index.is_linked(digest, repo)
    store.index.record_access(digest, now); store.index.flush_access()   # batched last-access
    store.index.set_tag(upstream, repo, tag, digest, checked=now); store.index.get_tag(...)

Digests are validated (``sha256:`` + 64 lowercase hex, :func:`parse_digest`) before they become a
path; anything else raises :class:`InvalidDigest` (a ``ValueError``).

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
    FollowState,
    SizeMismatch,
)
from .digest import InvalidDigest, is_digest, parse_digest, sha256_digest
from .index import BlobRecord, Index, TagRecord
from .store import ReindexResult, Storage

__all__ = [
    "BlobFile",
    "BlobFollower",
    "BlobNotFound",
    "BlobReader",
    "BlobRecord",
    "BlobStore",
    "BlobWriteError",
    "BlobWriter",
    "DigestMismatch",
    "FollowState",
    "Index",
    "InvalidDigest",
    "ReindexResult",
    "SizeMismatch",
    "Storage",
    "TagRecord",
    "is_digest",
    "parse_digest",
    "sha256_digest",
]
