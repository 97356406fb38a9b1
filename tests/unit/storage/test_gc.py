"""LRU eviction down to a bound: oldest first, sparing pinned and recently read blobs."""
from __future__ import annotations

import multiprocessing
import os

import pytest

from storage import (
    GC_LEASE,
    AccessStamps,
    BlobStore,
    Leases,
    collect,
    collect_with_lease,
    sha256_digest,
    stamp_access,
)
from tests.unit.fakes import commit_blob

NOW = 1_700_000_000.0
HOUR = 3600.0


@pytest.fixture
def store(tmp_path) -> BlobStore:
    return BlobStore(str(tmp_path / "store"))


def fill(store: BlobStore, count: int = 10, size: int = 1000) -> list[str]:
    """``count`` blobs of ``size`` bytes, the first accessed longest ago (one hour apart)."""
    return [commit_blob(store, bytes([i]) * size, NOW - (count - i) * HOUR) for i in range(count)]


def present(store: BlobStore) -> set[str]:
    return {found.digest for found in store.iter_blobs()}


def test_stamp_access_sets_the_mtime_and_reports_missing_files(store) -> None:
    digest = commit_blob(store, b"x", NOW - 5 * HOUR)
    gone = sha256_digest(b"gone")
    assert stamp_access(store, [digest, gone], NOW) == [gone]
    assert store.stat(digest).mtime == NOW


def test_removes_oldest_first_down_to_the_bound(store) -> None:
    digests = fill(store)
    result = collect(store, max_size=6500, now=NOW, grace=HOUR / 2, pinned=set())
    assert result.removed == digests[:4]
    assert (result.before_bytes, result.after_bytes, result.removed_bytes) == (10_000, 6000, 4000)
    assert present(store) == set(digests[4:])
    assert not result.interrupted and not result.dry_run


def test_nothing_to_do_under_the_bound(store) -> None:
    digests = fill(store)
    result = collect(store, max_size=10_000, now=NOW, grace=0, pinned=set())
    assert result.removed == [] and result.after_bytes == 10_000
    assert present(store) == set(digests)


def test_spares_pinned_and_recently_accessed_blobs(store) -> None:
    digests = fill(store)
    pinned = {digests[0], digests[2]}
    # Blobs 7, 8, 9 were accessed within the last 3.5 hours.
    result = collect(store, max_size=0, now=NOW, grace=3.5 * HOUR, pinned=pinned)
    assert result.removed == [digests[1], *digests[3:7]]
    assert sorted(result.kept_pinned) == sorted(pinned)
    assert result.kept_recent == digests[7:]
    assert present(store) == pinned | set(digests[7:])
    assert result.after_bytes == 5000  # the bound could not be met: everything left is protected


def test_a_blob_stamped_after_the_scan_is_spared(store, monkeypatch) -> None:
    digests = fill(store, count=3)
    real_iter = BlobStore.iter_blobs

    def scan_then_another_node_reads(self):
        found = list(real_iter(self))
        stamp_access(self, [digests[0]], NOW)  # read elsewhere just after our scan
        return iter(found)

    monkeypatch.setattr(BlobStore, "iter_blobs", scan_then_another_node_reads)
    result = collect(store, max_size=2000, now=NOW, grace=HOUR / 2, pinned=set())
    assert result.removed == [digests[1]]
    assert digests[0] in result.kept_recent
    assert present(store) == {digests[0], digests[2]}


def test_a_blob_removed_by_someone_else_counts_as_gone(store, monkeypatch) -> None:
    digests = fill(store, count=3)
    real_iter = BlobStore.iter_blobs

    def scan_then_another_collector_removes(self):
        found = list(real_iter(self))
        self.remove(digests[0])
        return iter(found)

    monkeypatch.setattr(BlobStore, "iter_blobs", scan_then_another_collector_removes)
    result = collect(store, max_size=2000, now=NOW, grace=0, pinned=set())
    assert result.removed == []
    assert result.after_bytes == 2000
    assert present(store) == set(digests[1:])


def test_dry_run_removes_nothing(store) -> None:
    digests = fill(store)
    result = collect(store, max_size=6500, now=NOW, grace=HOUR / 2, pinned={digests[1]}, dry_run=True)
    assert result.dry_run
    assert result.removed == [digests[0], *digests[2:5]]
    assert result.after_bytes == 6000
    assert present(store) == set(digests)


def test_a_reader_with_the_file_open_keeps_reading_after_eviction(store) -> None:
    data = os.urandom(1 << 20)
    digest = commit_blob(store, data, NOW - 10 * HOUR)
    with store.open(digest) as reader:
        first = reader.read(1000)
        assert collect(store, max_size=0, now=NOW, grace=HOUR, pinned=set()).removed == [digest]
        assert store.stat(digest) is None
        rest = reader.read(len(data))
    assert first + rest == data


def test_keep_going_false_stops_before_removing(store) -> None:
    fill(store, count=3)
    result = collect(store, max_size=0, now=NOW, grace=0, pinned=set(), keep_going=lambda: False)
    assert result.interrupted and result.removed == []
    assert len(present(store)) == 3


def test_access_stamps_batch_and_skip_recently_stamped(store, monkeypatch) -> None:
    a, b = commit_blob(store, b"a", NOW - 10 * HOUR), commit_blob(store, b"b", NOW - 10 * HOUR)
    stamps = AccessStamps(resolution=60)
    for _ in range(100):
        stamps.note(a, NOW)
    stamps.note(b, NOW)
    calls = []
    real = os.utime
    monkeypatch.setattr(os, "utime", lambda *args, **kw: (calls.append(args[0]), real(*args, **kw)))
    assert stamps.flush(store, NOW) == []
    assert len(calls) == 2
    assert store.stat(a).mtime == NOW and store.stat(b).mtime == NOW
    stamps.note(a, NOW + 30)  # stamped 30 s ago: not again
    assert stamps.flush(store, NOW + 30) == [] and len(calls) == 2
    stamps.note(a, NOW + 61)
    store.remove(b)
    stamps.note(b, NOW + 61)
    assert stamps.flush(store, NOW + 61) == [b]
    assert store.stat(a).mtime == NOW + 61


def test_collect_with_lease_skips_when_another_node_collects(store) -> None:
    digests = fill(store, count=3)
    other = Leases(store.root, node="other").try_take(GC_LEASE)
    leases = Leases(store.root, node="me")
    assert collect_with_lease(store, leases, 0, NOW, 0, set()) is None
    assert present(store) == set(digests)
    other.release()
    result = collect_with_lease(store, leases, 0, NOW, 0, set())
    assert result is not None and result.removed == digests
    assert leases.holder(GC_LEASE) is None  # released afterwards


def test_collect_with_lease_heartbeats_and_stops_when_the_lease_is_lost(store) -> None:
    fill(store, count=5)
    ticks = iter(range(0, 10_000, 10))
    leases = Leases(store.root, clock=lambda: float(next(ticks)) + NOW)
    seen = []
    real_heartbeat = leases.heartbeat

    def heartbeat(lease):
        seen.append(lease.holder)
        if len(seen) == 2:  # taken over by another node before the second heartbeat
            os.unlink(leases.path(GC_LEASE))
            Leases(store.root, node="thief").try_take(GC_LEASE)
        return real_heartbeat(lease)

    leases.heartbeat = heartbeat
    result = collect_with_lease(store, leases, 0, NOW, 0, set(), stale_after=40)
    assert result is not None and result.interrupted
    assert len(result.removed) == 1  # one removal after the first heartbeat, none after the loss
    assert len(present(store)) == 4
    assert leases.holder(GC_LEASE).holder.startswith("thief-")  # not released by the loser


def _collect_in_process(root: str, barrier, results) -> None:
    store = BlobStore(root)
    barrier.wait()
    result = collect_with_lease(store, Leases(root), 0, NOW, 0, set())
    results.put(None if result is None else result.removed)


def test_one_collector_per_cluster(store) -> None:
    digests = fill(store, count=20)
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(4)
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_collect_in_process, args=(store.root, barrier, results)) for _ in range(4)
    ]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    # Whoever ran removed everything; a process that found the lease held did nothing. (A later
    # process may take the released lease and find nothing left to remove.)
    ran = [removed for removed in outcomes if removed is not None]
    assert sorted(d for removed in ran for d in removed) == sorted(digests)
    assert present(store) == set()
