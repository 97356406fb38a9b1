"""The store a server uses: blob files plus this node's index, kept consistent with each other.

The index is trusted for speed and corrected by the files: a digest the index lacks is looked up with
one ``stat`` (``blobs.stat``) and adopted (``index.put_blob``), by the caller, which knows which
thread may do which (``Index`` writes belong to one thread); a digest whose file is gone (evicted by
another node) is forgotten when the caller reports it with :meth:`Storage.forget`.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from .blobstore import BlobStore
from .gc import AccessStamps
from .index import Index
from .lease import Leases

#: Temporary files untouched for this long belong to dead writers (see BlobStore.clean_temp).
DEFAULT_TEMP_GRACE = 3600.0


@dataclass(frozen=True)
class ReindexResult:
    added: int
    removed: int
    total: int


class Storage:
    """Opens the blob store at ``store_path`` and the LMDB index at ``index_path``.

    Opening costs the same with ten blobs or ten million: it creates directories if needed, opens
    LMDB and removes temporary files older than ``temp_grace`` (crashed writers); it never scans blobs.
    """

    def __init__(
        self,
        store_path: str,
        index_path: str,
        clock: Callable[[], float] = time.time,
        temp_grace: float = DEFAULT_TEMP_GRACE,
    ) -> None:
        self.clock = clock
        self.blobs = BlobStore(store_path)
        self.index = Index(index_path)
        self.stamps = AccessStamps()
        self.blobs.clean_temp(temp_grace, clock())

    def close(self) -> None:
        self.index.flush_access()
        self.index.close()

    def clean_leftovers(self, leases: Leases, older_than: float = DEFAULT_TEMP_GRACE) -> int:
        """Remove what dead writers left: temporary files, and leases, break files and tombs, with
        no sign of life for ``older_than`` seconds; returns how many files went.

        Opening the store removes only old temporary files, once; a long-running node calls this now
        and then for the crashes of other nodes (a half-written 200 MB layer nobody asks for again
        would otherwise stay until some node restarts).
        """
        return self.blobs.clean_temp(older_than, self.clock()) + leases.clean(older_than)

    def record_access(self, digest: str, now: float) -> None:
        """Note a read, for the index's last access and the file's mtime stamp (both batched)."""
        self.index.record_access(digest, now)
        self.stamps.note(digest, now)

    def forget(self, *digests: str) -> None:
        """The index named blobs whose files are gone: drop them so the next lookup sees the truth."""
        self.index.remove_blobs(digests)

    def reindex(self) -> ReindexResult:
        """Make the index agree with the files: add blobs it lacks, drop those whose file is gone.

        Media types, links and tags already in the index are kept; a full scan of the store. Writes
        go in batches of :data:`storage.index.BATCH_RECORDS` (one fdatasync each, not one per blob):
        a crash part way leaves the batches committed so far, and running reindex again completes it.
        """
        on_disk = {}
        for found in self.blobs.iter_blobs():
            on_disk[found.digest] = found
        known = {record.digest: record for record in self.index.iter_blobs()}
        gone = known.keys() - on_disk.keys()
        added = 0
        with self.index.batch() as batch:
            for digest in gone:
                batch.remove_blob(digest)
            for digest, found in on_disk.items():
                record = known.get(digest)
                if record is None or record.size != found.size:
                    batch.put_blob(digest, found.size, found.mtime)
                    added += 1
        return ReindexResult(added=added, removed=len(gone), total=len(on_disk))
