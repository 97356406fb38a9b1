"""Index.batch: many index writes in few transactions, each batch all or nothing; reindex uses it.

Transactions are counted with LMDB's own ``last_txnid`` (``env.info()``), which every committed
write transaction advances by one and an aborted one does not.
"""
from __future__ import annotations

import math

import pytest

import storage.index
from storage import Index, Storage, sha256_digest
from tests.unit.fakes import commit_blob

MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def digest(number: int) -> str:
    return sha256_digest(str(number).encode())


def committed_transactions(index: Index) -> int:
    return int(index.env.info()["last_txnid"])


@pytest.fixture
def index(tmp_path) -> Index:
    idx = Index(str(tmp_path / "index"))
    yield idx
    idx.close()


def test_a_batch_writes_every_record_in_bounded_transactions(index: Index) -> None:
    before = committed_transactions(index)
    with index.batch(records=100) as batch:
        for number in range(240):
            batch.put_blob(digest(number), number, now=float(number), media_type=MANIFEST, repository="docker.io/a")
        batch.link([digest(0), digest(1)], "docker.io/b")
        for number in range(50):
            batch.set_tag("docker.io", "a", f"t{number}", digest(number), checked=7.0)
    # 240 + 1 + 50 records, 100 a transaction: 3 transactions, not 291.
    assert committed_transactions(index) - before == math.ceil(291 / 100) == batch.transactions
    assert index.count_blobs() == 240
    record = index.get_blob(digest(239))
    assert (record.size, record.media_type, record.created) == (239, MANIFEST, 239.0)
    assert index.is_linked(digest(239), "docker.io/a") and index.is_linked(digest(1), "docker.io/b")
    assert not index.is_linked(digest(2), "docker.io/b")
    assert index.get_tag("docker.io", "a", "t49").digest == digest(49)


def test_a_batch_sees_its_own_earlier_records(index: Index) -> None:
    """put_blob keeps created and a known media type; within one transaction too."""
    with index.batch() as batch:
        batch.put_blob(digest(1), 3, now=100.0, media_type=MANIFEST)
        batch.put_blob(digest(1), 3, now=200.0)
        batch.remove_blob(digest(2))  # unknown: nothing to remove, no error
    record = index.get_blob(digest(1))
    assert (record.created, record.last_access, record.media_type) == (100.0, 200.0, MANIFEST)


def test_an_exception_in_a_batch_leaves_none_of_its_records(index: Index) -> None:
    index.put_blob(digest(0), 1, now=1.0)
    before = committed_transactions(index)
    with pytest.raises(RuntimeError), index.batch(records=100) as batch:
        for number in range(1, 151):
            batch.put_blob(digest(number), number, now=2.0)
        batch.set_tag("docker.io", "a", "latest", digest(150), checked=2.0)
        batch.remove_blob(digest(0))
        raise RuntimeError("the caller failed mid-batch")
    # The first full batch (records 1-100) committed; the batch under way (101-150, the tag, the
    # removal) left nothing.
    assert committed_transactions(index) - before == 1
    assert index.count_blobs() == 101
    assert index.get_blob(digest(100)) is not None and index.get_blob(digest(101)) is None
    assert index.get_tag("docker.io", "a", "latest") is None
    assert index.get_blob(digest(0)) is not None


def test_a_bad_digest_is_refused_before_it_joins_the_batch(index: Index) -> None:
    with index.batch() as batch:
        batch.put_blob(digest(1), 1, now=1.0)
        with pytest.raises(ValueError):
            batch.set_tag("docker.io", "a", "b", "sha256:nope", checked=1.0)
        with pytest.raises(ValueError):
            batch.put_blob("sha256:nope", 1, now=1.0)
    assert index.count_blobs() == 1


def test_a_batch_that_fills_the_map_is_replayed_whole(tmp_path) -> None:
    index = Index(str(tmp_path / "index"), map_size=64 * 1024)
    start = index.map_size
    with index.batch(records=3000) as batch:
        for number in range(3000):
            batch.put_blob(digest(number), number, now=1.0, repository=f"{'r' * 200}/{number}")
    assert index.map_size > start
    assert index.count_blobs() == 3000
    assert index.is_linked(digest(2999), f"{'r' * 200}/2999")
    index.close()


def test_removing_in_a_batch_drops_buffered_access_times(index: Index) -> None:
    index.put_blob(digest(1), 1, now=1.0)
    index.record_access(digest(1), 5.0)
    with index.batch() as batch:
        batch.remove_blob(digest(1))
    index.put_blob(digest(1), 1, now=2.0)  # adopted again: the old access must not come back
    assert index.flush_access() == 0


def test_a_batch_holds_at_least_one_record(index: Index) -> None:
    with pytest.raises(ValueError):
        with index.batch(records=0):
            pass


@pytest.fixture
def store_of_45_blobs(tmp_path, monkeypatch) -> Storage:
    monkeypatch.setattr(storage.index, "BATCH_RECORDS", 10)
    s = Storage(str(tmp_path / "store"), str(tmp_path / "index"))
    for number in range(45):
        commit_blob(s.blobs, f"blob {number}".encode())
    yield s
    s.close()


def test_reindex_writes_in_batches(store_of_45_blobs: Storage) -> None:
    s = store_of_45_blobs
    before = committed_transactions(s.index)
    assert s.reindex().added == 45
    assert committed_transactions(s.index) - before == math.ceil(45 / 10)
    assert s.index.count_blobs() == 45
    # Removals go in batches too: 45 files gone, 5 transactions.
    for record in list(s.index.iter_blobs()):
        s.blobs.remove(record.digest)
    before = committed_transactions(s.index)
    assert s.reindex().removed == 45
    assert committed_transactions(s.index) - before == math.ceil(45 / 10)
    assert s.index.count_blobs() == 0


def test_reindex_interrupted_keeps_its_committed_batches_and_a_rerun_completes(
    store_of_45_blobs: Storage, monkeypatch
) -> None:
    s = store_of_45_blobs
    put = storage.index.IndexBatch.put_blob
    calls = 0

    def crash_at_the_25th(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        nonlocal calls
        calls += 1
        if calls == 25:
            raise OSError("crash")
        put(self, *args, **kwargs)

    monkeypatch.setattr(storage.index.IndexBatch, "put_blob", crash_at_the_25th)
    with pytest.raises(OSError):
        s.reindex()
    assert s.index.count_blobs() == 20  # two batches of ten; the third was lost whole
    monkeypatch.setattr(storage.index.IndexBatch, "put_blob", put)
    assert s.reindex().added == 25
    assert s.index.count_blobs() == 45
