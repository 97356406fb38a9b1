"""Re-hash every blob, quarantine the corrupt ones; count what the store holds."""
from __future__ import annotations

import os

import pytest

from storage import (
    BlobStore,
    Leases,
    parse_digest,
    quarantine_dir,
    stats,
    verify,
)
from tests.unit.fakes import commit_blob


@pytest.fixture
def store(tmp_path) -> BlobStore:
    return BlobStore(str(tmp_path / "store"))


def corrupt(store: BlobStore, digest: str) -> None:
    with open(store.path(digest), "r+b") as f:
        f.seek(10)
        f.write(b"\xff\x00")


def test_good_blobs_verify(store) -> None:
    digests = [commit_blob(store, os.urandom(3000)) for _ in range(5)]
    result = verify(store)
    assert (result.checked, result.corrupt, result.vanished) == (5, [], 0)
    assert {found.digest for found in store.iter_blobs()} == set(digests)


def test_a_corrupt_blob_is_quarantined_and_good_ones_stay(store) -> None:
    good = [commit_blob(store, os.urandom(3000)) for _ in range(4)]
    bad = commit_blob(store, os.urandom(3000))
    original = open(store.path(bad), "rb").read()
    corrupt(store, bad)
    result = verify(store)
    assert result.checked == 5 and result.corrupt == [bad] and result.quarantined
    assert store.stat(bad) is None
    moved = os.path.join(quarantine_dir(store), parse_digest(bad))
    assert os.path.exists(moved) and open(moved, "rb").read() != original
    assert {found.digest for found in store.iter_blobs()} == set(good)
    assert verify(store).corrupt == []


def test_without_quarantine_the_corrupt_blob_stays(store) -> None:
    bad = commit_blob(store, b"some bytes" * 100)
    corrupt(store, bad)
    result = verify(store, quarantine=False)
    assert result.corrupt == [bad] and not result.quarantined
    assert store.stat(bad) is not None
    assert not os.path.exists(quarantine_dir(store))


def test_a_truncated_blob_is_corrupt(store) -> None:
    bad = commit_blob(store, b"x" * 5000)
    os.truncate(store.path(bad), 100)
    assert verify(store).corrupt == [bad]


def test_progress_reports_every_blob(store) -> None:
    sizes = [100, 2000, 30000]
    digests = [commit_blob(store, os.urandom(size)) for size in sizes]
    reports = []
    verify(store, progress=reports.append)
    assert [r.checked for r in reports] == [1, 2, 3]
    assert {r.total for r in reports} == {3}
    assert {r.bytes_total for r in reports} == {sum(sizes)}
    assert reports[-1].bytes_checked == sum(sizes)
    assert sorted(r.digest for r in reports) == sorted(digests)


def test_a_blob_evicted_during_verify_is_not_corrupt(store) -> None:
    digests = sorted(commit_blob(store, os.urandom(100)) for _ in range(3))

    def evict_the_last(progress) -> None:
        if progress.checked == 1:
            store.remove(digests[-1])

    result = verify(store, progress=evict_the_last)
    assert (result.checked, result.vanished, result.corrupt) == (2, 1, [])


def test_stats(store) -> None:
    assert stats(store).blob_count == 0
    sizes = [10, 200, 3000]
    digests = [commit_blob(store, os.urandom(size)) for size in sizes]
    open(os.path.join(store.tmp_dir, "deadbeef.node-1-abcd.part"), "wb").close()
    Leases(store.root).try_take("gc")
    corrupt(store, digests[0])
    verify(store)
    result = stats(store)
    assert (result.blob_count, result.total_bytes) == (2, 3200)
    assert (result.temp_files, result.leases, result.quarantined) == (1, 1, 1)


def test_a_good_copy_committed_after_hashing_is_not_quarantined(store) -> None:
    from storage.verify import _quarantine

    data = os.urandom(500)
    digest = commit_blob(store, data)
    corrupt(store, digest)
    hashed = os.stat(store.path(digest))
    store.remove(digest)  # evicted, then fetched again by another node
    commit_blob(store, data)
    _quarantine(store, digest, hashed)
    assert open(store.path(digest), "rb").read() == data
