"""Content-addressed blob files: write verified, read by range, follow a write in progress.

Layout under the store root::

    blobs/sha256/<first 2 hex>/<64 hex>    committed, verified blobs (manifests are blobs too)
    tmp/<64 hex>.<writer id>.part          writes in progress (same filesystem, so rename is atomic)

The protocol, which holds across threads, processes and nodes sharing the directory:

* A writer creates its own uniquely named temporary file, hashes every byte it writes, and on
  :meth:`BlobWriter.commit` fsyncs and renames it to the blob's name only if the sha256 (and the size,
  when one was expected) match. Nothing under a blob's name is ever partial or unverified. Two writers
  of the same digest both succeed: the second finds the blob there and drops its own copy.
* A failed or abandoned write unlinks its temporary file; a killed writer's file is left behind and
  removed by :meth:`BlobStore.clean_temp` once it is older than a grace period, so a live writer on
  another node is never hurt.
* A :class:`BlobFollower` reads a temporary file while it grows. Whether the write succeeded is decided
  by the names alone: the blob's name appearing means committed (rename is atomic), the temporary name
  vanishing without it means failed.

Everything here is synchronous, blocking file I/O. A server on an event loop should call it from a
thread when the store may be on a shared filesystem that can stall.
"""
from __future__ import annotations

import hashlib
import os
import secrets
import socket
import time
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import Enum

from .digest import from_hex, parse_digest
from .files import fsync_dir, write_all, writev_all

_PART = ".part"
_PAGE = 4096


class BlobNotFound(KeyError):
    """No committed blob under that digest."""


class BlobWriteError(Exception):
    """A write was not committed; nothing was left under the blob's name."""


class TempFileRemoved(BlobWriteError):
    """The temporary file vanished before its commit (a node that took the write over removed it)."""


class DigestMismatch(BlobWriteError):
    def __init__(self, expected: str, actual: str) -> None:
        super().__init__(f"digest mismatch: expected {expected}, got {actual}")
        self.expected = expected
        self.actual = actual


class SizeMismatch(BlobWriteError):
    def __init__(self, expected: int, actual: int) -> None:
        super().__init__(f"size mismatch: expected {expected} bytes, got {actual}")
        self.expected = expected
        self.actual = actual


@dataclass(frozen=True)
class BlobFile:
    """A committed blob as found on disk."""

    digest: str
    size: int
    mtime: float


class BlobStore:
    """The blob files under one root directory (local disk or a shared POSIX/NFS directory)."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        self.blob_dir = os.path.join(self.root, "blobs", "sha256")
        self.tmp_dir = os.path.join(self.root, "tmp")
        os.makedirs(self.blob_dir, exist_ok=True)
        os.makedirs(self.tmp_dir, exist_ok=True)
        self._writer_id = f"{socket.gethostname()}-{os.getpid()}"

    def path(self, digest: str) -> str:
        """Where ``digest`` lives; raises :class:`~storage.digest.InvalidDigest` for a bad digest."""
        hex_ = parse_digest(digest)
        return os.path.join(self.blob_dir, hex_[:2], hex_)

    def stat(self, digest: str) -> BlobFile | None:
        """The committed blob's size and mtime, or None when it is not in the store."""
        try:
            st = os.stat(self.path(digest))
        except FileNotFoundError:
            return None
        return BlobFile(digest, st.st_size, st.st_mtime)

    def open(self, digest: str, start: int = 0, end: int | None = None) -> BlobReader:
        """Open a committed blob for the bytes ``[start, end)`` (``end`` None: to the end)."""
        try:
            fd = os.open(self.path(digest), os.O_RDONLY)
        except FileNotFoundError:
            raise BlobNotFound(digest) from None
        return BlobReader(fd, start, end)

    def writer(self, digest: str, size: int | None = None) -> BlobWriter:
        """Start writing the blob ``digest``; ``size`` is checked on commit when given."""
        hex_ = parse_digest(digest)
        name = f"{hex_}.{self._writer_id}-{secrets.token_hex(4)}{_PART}"
        return BlobWriter(self, digest, os.path.join(self.tmp_dir, name), size)

    def in_progress(self, digest: str) -> list[str]:
        """Temporary files of writes of ``digest`` under way (by any process), largest first."""
        prefix = parse_digest(digest) + "."
        found: list[tuple[int, str]] = []
        with os.scandir(self.tmp_dir) as entries:
            for entry in entries:
                if entry.name.startswith(prefix) and entry.name.endswith(_PART):
                    try:
                        found.append((entry.stat().st_size, entry.path))
                    except FileNotFoundError:
                        continue
        return [path for _, path in sorted(found, reverse=True)]

    def follow(self, digest: str) -> BlobFollower | None:
        """A reader of ``digest`` that works whether it is committed or still being written.

        Returns None when the blob is neither in the store nor being written.
        """
        final = self.path(digest)
        for path in [final, *self.in_progress(digest)]:
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue
            return BlobFollower(self, digest, fd, None if path == final else path)
        # The last writer may have committed between our two looks.
        if os.path.exists(final):
            return BlobFollower(self, digest, os.open(final, os.O_RDONLY), None)
        return None

    def remove(self, digest: str) -> bool:
        """Delete a committed blob; readers holding it open keep reading. True if it was there."""
        try:
            os.unlink(self.path(digest))
        except FileNotFoundError:
            return False
        return True

    def clean_temp(self, grace: float, now: float | None = None) -> int:
        """Remove temporary files not written to for ``grace`` seconds (crashed writers)."""
        limit = (time.time() if now is None else now) - grace
        removed = 0
        with os.scandir(self.tmp_dir) as entries:
            for entry in entries:
                try:
                    if entry.is_file(follow_symlinks=False) and entry.stat().st_mtime < limit:
                        os.unlink(entry.path)
                        removed += 1
                except OSError:  # gone meanwhile, or a stale NFS handle: one entry must not stop the sweep
                    continue
        return removed

    def iter_blobs(self) -> Iterator[BlobFile]:
        """Every committed blob (a full scan: for reindex and maintenance, never at startup)."""
        with os.scandir(self.blob_dir) as prefixes:
            for prefix in prefixes:
                if not (prefix.is_dir() and len(prefix.name) == 2):
                    continue
                with os.scandir(prefix.path) as entries:
                    for entry in entries:
                        digest = from_hex(entry.name)
                        if not entry.name.startswith(prefix.name):
                            continue
                        try:
                            parse_digest(digest)
                            st = entry.stat()
                        except (ValueError, FileNotFoundError):
                            continue
                        yield BlobFile(digest, st.st_size, st.st_mtime)


class BlobWriter:
    """Writes one blob through a temporary file; see the module docstring for the protocol.

    Use as a context manager, or call :meth:`commit` / :meth:`abort`. A writer that is dropped without
    either removes its temporary file when it is garbage collected.
    """

    def __init__(self, store: BlobStore, digest: str, temp_path: str, size: int | None) -> None:
        self.store = store
        self.digest = digest
        self.temp_path = temp_path
        self.expected_size = size
        self.bytes_written = 0
        self._hash = hashlib.sha256()
        self._fd: int | None = os.open(temp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        self._finalizer = weakref.finalize(self, _discard, self._fd, temp_path)
        self.committed = False
        self._verified = False

    def write(self, data: bytes | memoryview) -> None:
        if self._fd is None:
            raise BlobWriteError("write on a closed blob writer")
        if self._verified:
            raise BlobWriteError("write after verify")
        if self.expected_size is not None and self.bytes_written + len(data) > self.expected_size:
            self.abort()
            raise SizeMismatch(self.expected_size, self.bytes_written + len(data))
        try:
            write_all(self._fd, data)
        except OSError as failure:  # a full disk, a lost NFS server: this write cannot succeed
            self.abort()
            raise BlobWriteError(f"writing {self.temp_path} failed: {failure}") from failure
        self._hash.update(data)
        self.bytes_written += len(data)

    def write_pieces(self, pieces: Sequence[bytes | memoryview]) -> None:
        """:meth:`write` of several pieces in one ``writev`` (no join, which would copy every
        byte once more), then their hash."""
        if self._fd is None:
            raise BlobWriteError("write on a closed blob writer")
        if self._verified:
            raise BlobWriteError("write after verify")
        size = sum(len(piece) for piece in pieces)
        if self.expected_size is not None and self.bytes_written + size > self.expected_size:
            self.abort()
            raise SizeMismatch(self.expected_size, self.bytes_written + size)
        try:
            writev_all(self._fd, pieces)
        except OSError as failure:
            self.abort()
            raise BlobWriteError(f"writing {self.temp_path} failed: {failure}") from failure
        for piece in pieces:
            self._hash.update(piece)
        self.bytes_written += size

    def verify(self) -> None:
        """Check the size and the digest of everything written so far, before :meth:`commit`.

        The bytes are then known good although not yet durable: a reader of the temporary file in
        this process may hand them out. On a mismatch the temporary file is removed and the error
        raised.
        """
        if self._fd is None:
            raise BlobWriteError("verify on a closed blob writer")
        if self._verified:
            return
        actual = from_hex(self._hash.hexdigest())
        if self.expected_size is not None and self.bytes_written != self.expected_size:
            self.abort()
            raise SizeMismatch(self.expected_size, self.bytes_written)
        if actual != self.digest:
            self.abort()
            raise DigestMismatch(self.digest, actual)
        self._verified = True

    def commit(self) -> str:
        """Verify, fsync and rename into place; returns the blob's path.

        On a digest or size mismatch the temporary file is removed and the error raised.
        """
        self.verify()
        assert self._fd is not None
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = None
        self._finalizer.detach()
        final = self.store.path(self.digest)
        parent = os.path.dirname(final)
        os.makedirs(parent, exist_ok=True)
        if os.path.exists(final):
            # Another writer committed the same bytes first; its file is as good as ours. Ours may
            # be gone already: a node that took our lease over while our store stalled removed it.
            _unlink_if_there(self.temp_path)
        else:
            try:
                os.rename(self.temp_path, final)
            except FileNotFoundError:
                # Removed under us by a node that took the download over (we looked dead to it).
                if not os.path.exists(final):
                    raise TempFileRemoved(f"{self.temp_path} was removed before its commit") from None
            else:
                fsync_dir(parent)
        self.committed = True
        return final

    def abort(self) -> None:
        """Drop the write; idempotent."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            self._finalizer.detach()
            _discard(fd, self.temp_path)

    def __enter__(self) -> BlobWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.committed:
            self.abort()


def _discard(fd: int, path: str) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
    _unlink_if_there(path)


def _unlink_if_there(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class BlobReader:
    """A committed blob opened for the byte range ``[start, end)``."""

    def __init__(self, fd: int, start: int, end: int | None) -> None:
        self._fd = fd
        self.size = os.fstat(fd).st_size
        stop = self.size if end is None else min(end, self.size)
        if start < 0 or start > stop:
            os.close(fd)
            raise ValueError(f"range [{start}, {end}) outside a blob of {self.size} bytes")
        self.start = start
        self.position = start
        self.end = stop

    def fileno(self) -> int:
        return self._fd

    def narrow(self, start: int, end: int) -> None:
        """Read only ``[start, end)`` of the opened range from now on: a Range request served from
        the file already open, with no second open (the blob may be evicted in between)."""
        if not self.start <= start <= end <= self.end:
            raise ValueError(f"range [{start}, {end}) outside [{self.start}, {self.end})")
        self.start = self.position = start
        self.end = end

    @property
    def remaining(self) -> int:
        return self.end - self.position

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes of the range; empty at its end."""
        data = os.pread(self._fd, min(n, self.remaining), self.position)
        self.position += len(data)
        return data

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> BlobReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class FollowState(Enum):
    WRITING = "writing"  # more bytes may come
    COMMITTED = "committed"  # every byte was delivered and they are the verified blob's
    FAILED = "failed"  # the write was abandoned or its bytes did not verify (see ``failure``)


class FollowFailure(Enum):
    """Why a follower FAILED: only the first says a byte was wrong; the others that its source
    went away, and the bytes delivered so far may still be completed from another source."""

    MISMATCH = "did_not_verify"  # what was delivered is not the blob (or not all of it)
    REMOVED = "source_removed"  # the followed file vanished and the blob was not committed
    IDLE = "source_idle"  # the followed file stopped growing for ``stall_timeout``
    ABANDONED = "source_abandoned"  # the download writing it ended without a commit

    @property
    def recoverable(self) -> bool:
        return self is not FollowFailure.MISMATCH


class BlobFollower:
    """Reads a blob while it is being written, and learns at the end whether the write committed.

    :meth:`read` never waits: it returns what has landed (possibly nothing). The caller polls, or is
    woken by the writer when it is in the same process. When the temporary file vanishes the follower
    checks the blob's name: if a *different* writer's file is there (ours failed, theirs committed),
    it continues from that file and, at the end, confirms that the bytes already delivered equal the
    committed ones, so a client never gets bytes that did not verify while hearing "committed".

    Set :attr:`verify_bytes` when the file is written by another node over a shared filesystem:
    NFS and FUSE clients may serve a page cached while it was the file's partial last page (a zero
    tail), and name inodes per path, so neither the bytes nor the inode check can be trusted there.
    The follower then hashes what it delivers and reports COMMITTED only if that hash is the digest,
    and reads a growing file only up to its last whole page.
    """

    def __init__(self, store: BlobStore, digest: str, fd: int, temp_path: str | None) -> None:
        self.store = store
        self.digest = digest
        self.temp_path = temp_path
        self.position = 0
        self.state = FollowState.WRITING
        self.failure: FollowFailure | None = None
        self._fd = fd
        self._final = store.path(digest)
        self._size: int | None = None
        self._switched_at: int | None = None
        self._old_fd: int | None = None
        #: Seconds a writer may stay silent before it is taken for dead (None: wait forever). A
        #: writer killed mid-write leaves its file behind; without this, followers would wait on it.
        self.stall_timeout: float | None = None
        self.verify_bytes = False
        self._hash = hashlib.sha256()
        if temp_path is None:
            self._size = os.fstat(fd).st_size

    def fileno(self) -> int:
        return self._fd

    def read(self, n: int) -> bytes:
        """Up to ``n`` new bytes; empty when none have landed yet or the blob is done (see state)."""
        if self.state is not FollowState.WRITING:
            return b""
        limit = n if self._size is None else min(n, self._size - self.position)
        if self._size is None and self.verify_bytes:
            limit = min(limit, self._whole_pages() - self.position)
        data = os.pread(self._fd, limit, self.position) if limit > 0 else b""
        if data:
            self.position += len(data)
            if self.verify_bytes:
                self._hash.update(data)
            return data
        self._check_progress()
        if self.state is FollowState.WRITING and self._size is not None and self.position < self._size:
            return self.read(n)
        return b""

    def landed(self, n: int) -> int:
        """How many of the next ``n`` bytes :meth:`read` would return, left unread: for a caller that
        sends them from :meth:`fileno` itself (``sendfile``), then says so with :meth:`advance`. 0
        when none have landed or the blob is done (see state), decided as :meth:`read` decides.

        Not for a follower that hashes what it delivers (:attr:`verify_bytes`): it must read them.
        """
        if self.verify_bytes:
            raise ValueError("a follower that hashes what it delivers must read it")
        if self.state is not FollowState.WRITING:
            return 0
        if self._size is not None:  # vouched for, or the committed blob's: every byte is in the file
            landed = min(n, self._size - self.position)
        else:
            try:
                landed = min(n, os.fstat(self._fd).st_size - self.position)
            except FileNotFoundError:  # sshfs stats an open file by its name: renamed or removed
                landed = 0  # which of the two, the verdict below finds out
        if landed > 0:
            return landed
        self._check_progress()
        if self.state is FollowState.WRITING and self._size is not None and self.position < self._size:
            return self.landed(n)
        return 0

    def advance(self, n: int) -> None:
        """The caller delivered the next ``n`` bytes from :meth:`fileno` itself (see :meth:`landed`)."""
        if self.verify_bytes:
            raise ValueError("a follower that hashes what it delivers must read it")
        self.position += n

    def vouch(self, size: int) -> None:
        """The writer of the followed file, in this process, verified its first ``size`` bytes.

        They may be delivered as committed without waiting for the rename, which waits for an
        fsync. Ignored when the follower cannot tie those bytes to that writer: it switched to
        another writer's file, or it reads another node's file (:attr:`verify_bytes`).
        """
        if self.state is FollowState.WRITING and self._switched_at is None and not self.verify_bytes:
            self._size = size
            if self.position >= size:
                self._finish()

    def _check_progress(self) -> None:
        """No new bytes: decide between still writing, committed and failed."""
        if self._size is not None:
            if self.position >= self._size:
                self._finish()
            return
        try:
            final_st = os.stat(self._final)
        except FileNotFoundError:
            if self.temp_path is not None and not os.path.exists(self.temp_path):
                # Rename is atomic: look at the blob's name once more before calling it failed.
                if os.path.exists(self._final):
                    return self._check_progress()
                self._fail(FollowFailure.REMOVED)
            elif self._stalled():
                self._fail(FollowFailure.IDLE)
            return
        if not self._is_final(final_st):
            if self.temp_path is not None and os.path.exists(self.temp_path) and not self._stalled():
                return  # another writer finished first; ours still writes the same bytes
            self._switch_to_final()
        self._size = final_st.st_size
        if self.position >= self._size:
            self._finish()

    def _is_final(self, final_st: os.stat_result) -> bool:
        """Is the file we read the committed blob itself? False when it cannot be told: some FUSE
        filesystems (sshfs) stat an open file by its name, which a rename took away, and number
        inodes per name; then the follower switches to the blob and compares what it delivered."""
        try:
            own = os.fstat(self._fd)
        except FileNotFoundError:
            return False
        return (own.st_dev, own.st_ino) == (final_st.st_dev, final_st.st_ino)

    def _stalled(self) -> bool:
        return self.stall_timeout is not None and self.idle_seconds() > self.stall_timeout

    def _switch_to_final(self) -> None:
        try:
            fd = os.open(self._final, os.O_RDONLY)
        except FileNotFoundError:
            return self._fail(FollowFailure.REMOVED)
        self._old_fd, self._fd = self._fd, fd
        self._switched_at = self.position

    def _whole_pages(self) -> int:
        """The growing file's length rounded down to a page (by name: revalidates NFS/FUSE sizes)."""
        try:
            size = os.stat(self.temp_path).st_size if self.temp_path else 0
        except FileNotFoundError:
            return self.position
        return size - size % _PAGE

    def _finish(self) -> None:
        if self.position != self._size:
            return self._fail(FollowFailure.MISMATCH)
        if self.verify_bytes:
            if from_hex(self._hash.hexdigest()) != self.digest:
                return self._fail(FollowFailure.MISMATCH)
        elif self._switched_at and self._old_fd is not None and not self._same_prefix(self._switched_at):
            return self._fail(FollowFailure.MISMATCH)
        self.state = FollowState.COMMITTED
        self._close_old()

    def _same_prefix(self, length: int) -> bool:
        """Were the bytes read from the abandoned file the committed blob's bytes?"""
        assert self._old_fd is not None
        chunk = 1 << 20
        for offset in range(0, length, chunk):
            take = min(chunk, length - offset)
            if os.pread(self._old_fd, take, offset) != os.pread(self._fd, take, offset):
                return False
        return True

    def _fail(self, why: FollowFailure) -> None:
        self.state = FollowState.FAILED
        self.failure = why
        self._close_old()

    def abandon(self) -> None:
        """The download writing the followed file ended without a commit: stop waiting for it."""
        if self.state is FollowState.WRITING:
            self._fail(FollowFailure.ABANDONED)

    def delivered_hash(self) -> hashlib._Hash:
        """The sha256 state of the bytes delivered so far (reads them back when they were not
        hashed as they went). Blocking: for a follower's successor (:meth:`carry_on`)."""
        if self.verify_bytes:
            return self._hash.copy()
        digest = hashlib.sha256()
        # After a switch, the bytes before it came from the abandoned file (kept open).
        sources = [(self._old_fd, 0, self._switched_at), (self._fd, self._switched_at, self.position)] \
            if self._switched_at is not None and self._old_fd is not None else [(self._fd, 0, self.position)]
        for fd, start, end in sources:
            for offset in range(start, end, 1 << 20):
                take = min(1 << 20, end - offset)
                data = os.pread(fd, take, offset)
                if len(data) != take:
                    raise BlobWriteError("the bytes delivered so far can no longer be read back")
                digest.update(data)
        return digest

    def carry_on(self, position: int, delivered: hashlib._Hash) -> None:
        """Continue a response another follower began: skip the ``position`` bytes it delivered
        (whose hash is ``delivered``) and, at the end, report COMMITTED only if all of them,
        old and new, hash to the digest."""
        self.position = position
        self._hash = delivered
        self.verify_bytes = True
        if self._size is not None and self.position >= self._size:
            self._finish()

    def _close_old(self) -> None:
        if self._old_fd is not None:
            os.close(self._old_fd)
            self._old_fd = None

    def idle_seconds(self, now: float | None = None) -> float:
        """Seconds since the file being followed last grew: a large value means a dead writer."""
        try:
            mtime = os.fstat(self._fd).st_mtime
        except FileNotFoundError:
            return 0.0  # renamed or removed under us (seen on sshfs): something is happening
        return max(0.0, (time.time() if now is None else now) - mtime)

    def close(self) -> None:
        self._close_old()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> BlobFollower:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = [
    "BlobFile",
    "BlobFollower",
    "BlobNotFound",
    "BlobReader",
    "BlobStore",
    "BlobWriteError",
    "BlobWriter",
    "DigestMismatch",
    "FollowFailure",
    "FollowState",
    "SizeMismatch",
    "TempFileRemoved",
]
