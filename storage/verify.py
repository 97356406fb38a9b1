"""Maintenance over the whole store: re-hash every blob, and count what is there.

:func:`verify` reads every committed blob, hashes it and compares with its name. A blob that does
not match (bit rot, a disk or server fault, someone editing files by hand) is moved to
``<root>/quarantine/<64 hex>`` by rename, within the same filesystem, so it stops being served at
once, atomically, and stays available for inspection; the next request fetches a good copy. The
caller should then drop the corrupt digests from its index (:meth:`storage.Storage.forget`); other
nodes' indexes heal when they find the file gone.

Verify is safe to run while nodes serve and collect: a blob that disappears mid-scan (evicted) is
counted as vanished, not corrupt, and before quarantining, the file under the blob's name is checked
to be the very file that was hashed (same device and inode), so a good copy committed in the
meantime is never moved away. A full verify reads every byte of the store: on NFS that is the whole
store over the network.

:func:`stats` counts without reading contents: one directory scan.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from .blobstore import BlobStore
from .digest import parse_digest

_CHUNK = 1 << 20


@dataclass(frozen=True)
class VerifyProgress:
    """Passed to the progress callback after each blob."""

    checked: int
    total: int
    bytes_checked: int
    bytes_total: int
    digest: str  # the blob just checked


@dataclass(frozen=True)
class VerifyResult:
    checked: int  # blobs hashed
    corrupt: list[str] = field(default_factory=list)  # digests whose bytes did not match
    vanished: int = 0  # blobs removed by someone else during the scan
    quarantined: bool = True  # whether the corrupt blobs were moved away


@dataclass(frozen=True)
class StoreStats:
    blob_count: int
    total_bytes: int
    temp_files: int  # downloads in progress, or leftovers of crashed writers
    leases: int  # lease files present (held or stale)
    quarantined: int = 0  # files in the quarantine folder


def quarantine_dir(store: BlobStore) -> str:
    return os.path.join(store.root, "quarantine")


def verify(
    store: BlobStore,
    quarantine: bool = True,
    progress: Callable[[VerifyProgress], None] | None = None,
) -> VerifyResult:
    """Re-hash every blob; with ``quarantine``, move corrupt ones to ``<root>/quarantine/<hex>``."""
    blobs = sorted(store.iter_blobs(), key=lambda b: b.digest)
    bytes_total = sum(b.size for b in blobs)
    bytes_checked = 0
    checked = 0
    vanished = 0
    corrupt: list[str] = []
    if quarantine:
        os.makedirs(quarantine_dir(store), exist_ok=True)
    for index, found in enumerate(blobs):
        path = store.path(found.digest)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            vanished += 1
        else:
            try:
                good = _hash(fd) == parse_digest(found.digest)
                if not good:
                    corrupt.append(found.digest)
                    if quarantine:
                        _quarantine(store, found.digest, os.fstat(fd))
            finally:
                os.close(fd)
            checked += 1
        bytes_checked += found.size
        if progress is not None:
            progress(VerifyProgress(index + 1, len(blobs), bytes_checked, bytes_total, found.digest))
    return VerifyResult(checked=checked, corrupt=corrupt, vanished=vanished, quarantined=quarantine)


def _hash(fd: int) -> str:
    digest = hashlib.sha256()
    offset = 0
    while True:
        chunk = os.pread(fd, _CHUNK, offset)
        if not chunk:
            return digest.hexdigest()
        digest.update(chunk)
        offset += len(chunk)


def _quarantine(store: BlobStore, digest: str, hashed: os.stat_result) -> None:
    path = store.path(digest)
    try:
        current = os.stat(path)
    except FileNotFoundError:
        return
    if (current.st_dev, current.st_ino) != (hashed.st_dev, hashed.st_ino):
        return  # replaced since we hashed it (evicted and fetched again): not the corrupt file
    try:
        os.rename(path, os.path.join(quarantine_dir(store), parse_digest(digest)))
    except FileNotFoundError:
        pass


def stats(store: BlobStore) -> StoreStats:
    """Blob count and bytes, temporary files, lease files and quarantined files."""
    count = 0
    total = 0
    for found in store.iter_blobs():
        count += 1
        total += found.size
    return StoreStats(
        blob_count=count,
        total_bytes=total,
        temp_files=_count(store.tmp_dir),
        leases=_count(os.path.join(store.root, "leases"), ".lease"),
        quarantined=_count(quarantine_dir(store)),
    )


def _count(directory: str, suffix: str = "") -> int:
    try:
        with os.scandir(directory) as entries:
            return sum(1 for entry in entries if entry.name.endswith(suffix) and entry.is_file())
    except FileNotFoundError:
        return 0


__all__ = ["StoreStats", "VerifyProgress", "VerifyResult", "quarantine_dir", "stats", "verify"]
