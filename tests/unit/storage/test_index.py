"""The LMDB index and the Storage facade that keeps it consistent with the files."""
from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest

from storage import Index, Storage, sha256_digest
from tests.unit.fakes import commit_blob

D1 = sha256_digest(b"one")
D2 = sha256_digest(b"two")


@pytest.fixture
def index(tmp_path) -> Index:
    idx = Index(str(tmp_path / "index"))
    yield idx
    idx.close()


def test_blob_records(index: Index) -> None:
    assert index.get_blob(D1) is None
    index.put_blob(D1, 3, now=100.0, media_type="application/vnd.oci.image.manifest.v1+json")
    index.put_blob(D1, 3, now=200.0)  # a later sighting keeps created and the known media type
    rec = index.get_blob(D1)
    assert (rec.size, rec.created, rec.last_access) == (3, 100.0, 200.0)
    assert rec.media_type == "application/vnd.oci.image.manifest.v1+json"
    assert index.count_blobs() == 1
    index.put_blob(D2, 5, now=100.0, repository="ghcr.io/org/app")
    index.remove_blobs([D1, D2])  # one transaction for an eviction's whole list
    assert index.get_blob(D1) is None and index.get_blob(D2) is None and index.count_blobs() == 0
    assert not index.is_linked(D2, "ghcr.io/org/app")


def test_repository_links(index: Index) -> None:
    index.put_blob(D1, 3, now=1.0, repository="docker.io/library/alpine")
    index.link([D1, D2], "ghcr.io/org/app")
    index.link([D1], "ghcr.io/org/app")  # idempotent
    assert index.is_linked(D1, "docker.io/library/alpine")
    assert not index.is_linked(D1, "docker.io/library/busybox")
    assert not index.is_linked(D2, "docker.io/library/alpine")
    assert index.is_linked(D1, "ghcr.io/org/app") and index.is_linked(D2, "ghcr.io/org/app")
    assert not index.is_linked(sha256_digest(b"other"), "ghcr.io/org/app")


def test_tags(index: Index) -> None:
    assert index.get_tag("docker.io", "library/alpine", "3") is None
    index.set_tag("docker.io", "library/alpine", "3", D1, checked=10.0)
    index.set_tag("ghcr.io", "library/alpine", "3", D2, checked=11.0)
    index.set_tag("docker.io", "library/alpine", "3", D2, checked=12.0)
    tag = index.get_tag("docker.io", "library/alpine", "3")
    assert (tag.digest, tag.checked) == (D2, 12.0)
    assert index.get_tag("ghcr.io", "library/alpine", "3").digest == D2
    with pytest.raises(ValueError):
        index.set_tag("docker.io", "x", "y", "sha256:nope", checked=1.0)


def test_access_times_are_batched(index: Index) -> None:
    index.put_blob(D1, 3, now=1.0)
    index.record_access(D1, 50.0)
    index.record_access(D2, 60.0)  # not indexed: ignored on flush
    assert index.get_blob(D1).last_access == 1.0
    assert index.flush_access() == 1
    assert index.get_blob(D1).last_access == 50.0
    assert index.flush_access() == 0


def test_map_grows_past_its_initial_size(tmp_path) -> None:
    index = Index(str(tmp_path / "index"), map_size=64 * 1024)
    start = index.map_size
    repo = "r" * 200
    for i in range(3000):
        index.put_blob(sha256_digest(str(i).encode()), i, now=float(i), repository=f"{repo}/{i}")
    assert index.map_size > start
    assert index.count_blobs() == 3000
    assert index.get_blob(sha256_digest(b"2999")).size == 2999
    index.close()


def test_reindex_after_deleting_the_index(tmp_path) -> None:
    import shutil

    s = Storage(str(tmp_path / "store"), str(tmp_path / "index"))
    digests = [commit_blob(s.blobs, os.urandom(100 + i)) for i in range(20)]
    for d in digests:
        s.index.put_blob(d, s.blobs.stat(d).size, 1.0)
    s.index.set_tag("docker.io", "library/x", "latest", digests[0], checked=1.0)
    s.close()
    shutil.rmtree(tmp_path / "index")

    s = Storage(str(tmp_path / "store"), str(tmp_path / "index"))
    assert s.index.count_blobs() == 0
    result = s.reindex()
    assert (result.added, result.removed, result.total) == (20, 0, 20)
    assert {r.digest for r in s.index.iter_blobs()} == set(digests)
    assert s.index.get_blob(digests[3]).size == 103

    s.blobs.remove(digests[0])  # gone from disk: reindex drops it from the index
    assert s.reindex() == type(result)(added=0, removed=1, total=19)
    s.close()


def test_opening_does_not_scan_blobs(tmp_path, monkeypatch) -> None:
    s = Storage(str(tmp_path / "store"), str(tmp_path / "index"))
    for i in range(5):
        commit_blob(s.blobs, bytes([i]))
    s.close()

    def no_scan(self):
        raise AssertionError("startup scanned the blob store")

    monkeypatch.setattr("storage.blobstore.BlobStore.iter_blobs", no_scan)
    Storage(str(tmp_path / "store"), str(tmp_path / "index")).close()


def test_startup_removes_only_old_temp_files(tmp_path) -> None:
    s = Storage(str(tmp_path / "store"), str(tmp_path / "index"))
    stale = s.blobs.writer(D1)
    stale.write(b"partial")
    fresh = s.blobs.writer(D2)
    fresh.write(b"partial")
    os.utime(stale.temp_path, (0, 0))
    s.close()
    Storage(str(tmp_path / "store"), str(tmp_path / "index"), temp_grace=600).close()
    assert not os.path.exists(stale.temp_path)
    assert os.path.exists(fresh.temp_path)


def test_the_map_grows_only_once_no_transaction_of_another_thread_is_open(tmp_path) -> None:
    # lmdb.h: mdb_env_set_mapsize only while no transaction of the process is active. The server
    # writes from a thread of its own and reads on the reactor, so growth must wait for the reads.
    index = Index(str(tmp_path / "index"), map_size=64 * 1024)
    index.put_blob(D1, 3, now=1.0)
    start = index.map_size
    reading = index.iter_blobs()
    assert next(reading).digest == D1  # a read transaction, open until the iteration ends

    def fill() -> None:
        for i in range(3000):
            index.put_blob(sha256_digest(str(i).encode()), i, now=float(i), repository="r" * 200)

    writer = threading.Thread(target=fill)
    writer.start()
    writer.join(timeout=1.0)
    assert writer.is_alive() and index.map_size == start  # the full map waits for the reader
    assert list(reading) == []
    writer.join(timeout=30)
    assert not writer.is_alive() and index.map_size > start
    assert index.count_blobs() == 3001
    index.close()


def test_a_map_another_process_grew_is_adopted(tmp_path) -> None:
    # `metahub cache gc` may write the index beside a running server; LMDB then fails every
    # transaction of the server (MDB_MAP_RESIZED) until it adopts the new size.
    path = tmp_path / "index"
    index = Index(str(path), map_size=64 * 1024)
    index.put_blob(D1, 3, now=1.0)
    grow = (
        "import sys\nfrom storage import Index, sha256_digest\n"
        f"other = Index({str(path)!r}, map_size=64 * 1024)\n"
        "for i in range(3000):\n"
        "    other.put_blob(sha256_digest(str(i).encode()), i, now=1.0, repository='r' * 200)\n"
        "other.close()\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    subprocess.run([sys.executable, "-c", grow], check=True, env={**os.environ, "PYTHONPATH": root}, timeout=60)
    assert index.get_blob(D1).size == 3
    assert index.get_blob(sha256_digest(b"2999")).size == 2999
    index.put_blob(D2, 4, now=2.0)
    assert index.count_blobs() == 3002
    index.close()
