"""The node's LMDB index: what this node knows about blobs and tags.

It is a cache of the blob store, never the truth: losing it loses nothing (:func:`storage.reindex`
rebuilds it) and a blob missing from it is looked up on disk by the caller. LMDB must live on local
disk (lmdb.h: "Do not use LMDB databases on remote filesystems"), so every node has its own.

Sub-databases:

``blobs``   raw 32-byte digest -> JSON ``{size, media_type, created, last_access}``
``links``   raw digest -> repository names seen with it (dupsort), for cross-repository safety
``tags``    ``upstream \\0 repository \\0 tag`` -> JSON ``{digest, checked}``

Write transactions are short. The server makes them from one thread of their own (each commit
waits for the disk, which the reactor must not), and reads them anywhere: LMDB's readers never wait
for its writer. Growing the map is the one step that needs every transaction of the process closed
(lmdb.h, mdb_env_set_mapsize), so each transaction here is counted, and growth waits for the count
to reach zero while new ones wait for the growth. Each commit costs an
fdatasync, which dominates a write (85% of an index-only fill of 10^5 blobs), so many records go in
together: :meth:`Index.batch` gathers puts, links, tags and removals and commits them
:data:`BATCH_RECORDS` at a time; last-access times are buffered by :meth:`Index.record_access` and
written in one transaction by :meth:`Index.flush_access`, so a busy server does not fsync per
request. The map grows on demand: a write that hits ``MapFullError`` doubles the map size and is
retried.
"""
from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import lmdb

from .digest import from_hex, parse_digest

T = TypeVar("T")

_INITIAL_MAP_SIZE = 1 << 20  # grown on demand; small so growth is exercised in normal use

#: Records (calls) per transaction of an :meth:`Index.batch`. A thousand of scenario 9's records
#: take about 50 ms to write and commit (the write lock is not held for long) and cost one
#: fdatasync instead of a thousand.
#: A crash loses at most the batch being written: the index is a cache that ``reindex`` rebuilds
#: from the blob files, and a running server adopts a blob the index lacks on its next request.
BATCH_RECORDS = 1000


@dataclass(frozen=True)
class BlobRecord:
    digest: str
    size: int
    media_type: str | None
    created: float
    last_access: float


@dataclass(frozen=True)
class TagRecord:
    digest: str
    checked: float  # when upstream last confirmed (or first told us) tag -> digest


def _key(digest: str) -> bytes:
    return bytes.fromhex(parse_digest(digest))


def _tag_key(upstream: str, repository: str, tag: str) -> bytes:
    return "\0".join((upstream, repository, tag)).encode()


class Index:
    """One node's LMDB environment, opened at ``path`` (a directory on local disk)."""

    def __init__(self, path: str, map_size: int = _INITIAL_MAP_SIZE) -> None:
        os.makedirs(path, exist_ok=True)
        # metasync=False: a system crash may undo the last transaction but never breaks the
        # environment; losing a transaction of a cache is harmless.
        self.env = lmdb.open(path, map_size=map_size, max_dbs=4, metasync=False, readahead=False)
        self._blobs = self.env.open_db(b"blobs")
        self._links = self.env.open_db(b"links", dupsort=True)
        self._tags = self.env.open_db(b"tags")
        # Notes of reads come from the reactor while the writer's thread takes the batch: the swap
        # and the notes must not interleave (a note landing in a batch being written is lost, or
        # breaks the iteration).
        self._access_lock = threading.Lock()
        self._pending_access: dict[bytes, float] = {}
        self._transactions = threading.Condition()
        self._open = 0  # transactions open now, in any thread
        self._growing = False

    def close(self) -> None:
        self.env.close()

    @property
    def map_size(self) -> int:
        return int(self.env.info()["map_size"])

    @contextmanager
    def _transaction(self, write: bool = False) -> Iterator[lmdb.Transaction[bytes]]:
        txn = self._begin(write)
        try:
            with txn:
                yield txn
        finally:
            self._closed()

    def _begin(self, write: bool) -> lmdb.Transaction[bytes]:
        while True:
            with self._transactions:
                while self._growing:
                    self._transactions.wait()
                self._open += 1
            try:
                return self.env.begin(write=write)
            except lmdb.MapResizedError:
                # Another process (``metahub cache gc`` beside the server) grew the map: every
                # transaction here fails until this process adopts the new size.
                self._closed()
                self._resize(None)

    def _closed(self) -> None:
        with self._transactions:
            self._open -= 1
            if not self._open:
                self._transactions.notify_all()

    def _write(self, work: Callable[[lmdb.Transaction[bytes]], T]) -> T:
        while True:
            full = self.map_size
            try:
                with self._transaction(write=True) as txn:
                    return work(txn)
            except lmdb.MapFullError:
                self._resize(full)

    def _resize(self, full: int | None) -> None:
        """Once no transaction of this process is open: double a map found full at ``full`` bytes,
        or (``None``) adopt the size another process gave it."""
        with self._transactions:
            while self._growing:
                self._transactions.wait()
            if full is not None and self.map_size != full:
                return  # another writer grew it meanwhile
            self._growing = True
            try:
                while self._open:
                    self._transactions.wait()
                self.env.set_mapsize(0 if full is None else full * 2)  # 0: the size in the file
            finally:
                self._growing = False
                self._transactions.notify_all()

    @contextmanager
    def batch(self, records: int | None = None) -> Iterator[IndexBatch]:
        """Group writes: ``with index.batch() as b: b.put_blob(...)`` commits every ``records``
        (default :data:`BATCH_RECORDS`) records in one transaction and the rest when the block ends.

        Each committed batch is atomic; an exception in the block discards the records not yet
        committed (batches committed before it stay, which is fine for a cache :meth:`Storage.reindex`
        rebuilds). The write transaction is open only while a batch is committed, not while the
        caller produces records.
        """
        batch = IndexBatch(self, BATCH_RECORDS if records is None else records)
        yield batch
        batch.commit()

    # -- blobs ---------------------------------------------------------------------------------

    def put_blob(
        self,
        digest: str,
        size: int,
        now: float,
        media_type: str | None = None,
        repository: str | None = None,
    ) -> BlobRecord:
        """Record a blob (created now unless known), keeping a known media type if none is given."""
        return self._write(self._put_blob(digest, size, now, media_type, repository))

    def _put_blob(
        self, digest: str, size: int, now: float, media_type: str | None, repository: str | None
    ) -> Callable[[lmdb.Transaction[bytes]], BlobRecord]:
        key = _key(digest)

        def work(txn: lmdb.Transaction[bytes]) -> BlobRecord:
            raw = txn.get(key, db=self._blobs)
            old = json.loads(raw) if raw is not None else {}
            record = {
                "size": size,
                "media_type": media_type or old.get("media_type"),
                "created": old.get("created", now),
                "last_access": now,
            }
            txn.put(key, json.dumps(record).encode(), db=self._blobs)
            if repository is not None:
                txn.put(key, repository.encode(), db=self._links, dupdata=True)
            return BlobRecord(digest, **record)

        return work

    def get_blob(self, digest: str) -> BlobRecord | None:
        with self._transaction() as txn:
            raw = txn.get(_key(digest), db=self._blobs)
        return None if raw is None else BlobRecord(digest, **json.loads(raw))

    def remove_blobs(self, digests: Iterable[str]) -> None:
        """Drop blobs and their links, all in one transaction (one fsync, however many)."""
        keys = [_key(digest) for digest in digests]
        self._write(self._remove(keys))
        self._drop_access(keys)

    def _remove(self, keys: list[bytes]) -> Callable[[lmdb.Transaction[bytes]], None]:
        def work(txn: lmdb.Transaction[bytes]) -> None:
            for key in keys:
                txn.delete(key, db=self._blobs)
                txn.delete(key, db=self._links)

        return work

    def iter_blobs(self) -> Iterator[BlobRecord]:
        """Every record, in one read transaction that stays open until the iteration ends: a
        write made meanwhile that must grow the map would wait for it (in this thread: for ever)."""
        with self._transaction() as txn:
            for key, raw in txn.cursor(db=self._blobs):
                yield BlobRecord(from_hex(bytes(key).hex()), **json.loads(raw))

    def count_blobs(self) -> int:
        with self._transaction() as txn:
            return int(txn.stat(self._blobs)["entries"])

    # -- repository links ----------------------------------------------------------------------

    def link(self, digests: Iterable[str], repository: str) -> None:
        """Remember that ``repository`` references or served these digests (one transaction)."""
        self._write(self._link(digests, repository))

    def _link(self, digests: Iterable[str], repository: str) -> Callable[[lmdb.Transaction[bytes]], None]:
        keys = [_key(digest) for digest in digests]
        value = repository.encode()

        def work(txn: lmdb.Transaction[bytes]) -> None:
            for key in keys:
                txn.put(key, value, db=self._links, dupdata=True)

        return work

    def is_linked(self, digest: str, repository: str) -> bool:
        with self._transaction() as txn:
            cursor = txn.cursor(db=self._links)
            return cursor.set_key_dup(_key(digest), repository.encode())

    # -- access times --------------------------------------------------------------------------

    def record_access(self, digest: str, now: float) -> None:
        """Note a read in memory; :meth:`flush_access` writes the batch."""
        key = _key(digest)
        with self._access_lock:
            self._pending_access[key] = now

    def _drop_access(self, keys: Iterable[bytes]) -> None:
        with self._access_lock:
            for key in keys:
                self._pending_access.pop(key, None)

    def flush_access(self) -> int:
        """Write buffered access times of blobs the index knows; returns how many were written."""
        with self._access_lock:
            pending, self._pending_access = self._pending_access, {}
        if not pending:
            return 0

        def work(txn: lmdb.Transaction[bytes]) -> int:
            written = 0
            for key, when in pending.items():
                raw = txn.get(key, db=self._blobs)
                if raw is None:
                    continue
                record = json.loads(raw)
                if when > record["last_access"]:
                    record["last_access"] = when
                    txn.put(key, json.dumps(record).encode(), db=self._blobs)
                    written += 1
            return written

        return self._write(work)

    # -- tags ----------------------------------------------------------------------------------

    def set_tag(self, upstream: str, repository: str, tag: str, digest: str, checked: float) -> None:
        self._write(self._set_tag(upstream, repository, tag, digest, checked))

    def _set_tag(
        self, upstream: str, repository: str, tag: str, digest: str, checked: float
    ) -> Callable[[lmdb.Transaction[bytes]], bool]:
        parse_digest(digest)
        value = json.dumps({"digest": digest, "checked": checked}).encode()
        key = _tag_key(upstream, repository, tag)
        return lambda txn: txn.put(key, value, db=self._tags)

    def get_tag(self, upstream: str, repository: str, tag: str) -> TagRecord | None:
        with self._transaction() as txn:
            raw = txn.get(_tag_key(upstream, repository, tag), db=self._tags)
        return None if raw is None else TagRecord(**json.loads(raw))


class IndexBatch:
    """Writes gathered by :meth:`Index.batch`; each call validates its digest at once (a bad digest
    raises before it can spoil the batch), and the records are written when ``records`` are pending."""

    def __init__(self, index: Index, records: int) -> None:
        if records < 1:
            raise ValueError(f"a batch holds at least one record, not {records}")
        self._index = index
        self._records = records
        self._pending: list[Callable[[lmdb.Transaction[bytes]], object]] = []
        self._removed: list[bytes] = []
        self.transactions = 0  # committed so far, for callers that report them

    def put_blob(
        self, digest: str, size: int, now: float, media_type: str | None = None, repository: str | None = None
    ) -> None:
        self._add(self._index._put_blob(digest, size, now, media_type, repository))

    def link(self, digests: Iterable[str], repository: str) -> None:
        self._add(self._index._link(digests, repository))

    def set_tag(self, upstream: str, repository: str, tag: str, digest: str, checked: float) -> None:
        self._add(self._index._set_tag(upstream, repository, tag, digest, checked))

    def remove_blob(self, digest: str) -> None:
        key = _key(digest)
        self._removed.append(key)
        self._add(self._index._remove([key]))

    def _add(self, work: Callable[[lmdb.Transaction[bytes]], object]) -> None:
        self._pending.append(work)
        if len(self._pending) >= self._records:
            self.commit()

    def commit(self) -> None:
        """Write what is pending now, in one transaction (replayed whole if the map had to grow)."""
        pending, self._pending = self._pending, []
        if not pending:
            return

        def work(txn: lmdb.Transaction[bytes]) -> None:
            for write in pending:
                write(txn)

        self._index._write(work)
        self.transactions += 1
        self._index._drop_access(self._removed)
        self._removed = []
