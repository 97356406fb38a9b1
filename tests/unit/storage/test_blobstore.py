"""The blob files: verified writes, ranges, following a write, crash leftovers."""
from __future__ import annotations

import errno
import gc
import hashlib
import multiprocessing
import os

import pytest

from storage import (
    BlobNotFound,
    BlobStore,
    BlobWriteError,
    DigestMismatch,
    FollowFailure,
    FollowState,
    InvalidDigest,
    SizeMismatch,
    parse_digest,
    sha256_digest,
)


def digest_of(data: bytes) -> str:
    return sha256_digest(data)


@pytest.fixture
def store(tmp_path) -> BlobStore:
    return BlobStore(str(tmp_path / "store"))


def names_under(root: str) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


@pytest.mark.parametrize(
    "bad",
    [
        "sha256:" + "A" * 64,
        "sha256:" + "a" * 63,
        "sha256:" + "a" * 65,
        "sha512:" + "a" * 128,
        "sha256:../../" + "a" * 58,
        "sha256:" + "a" * 64 + "\n",
        "a" * 64,
        "",
    ],
)
def test_only_sha256_lowercase_hex_digests_become_paths(store: BlobStore, bad: str) -> None:
    with pytest.raises(InvalidDigest):
        store.path(bad)
    with pytest.raises(InvalidDigest):
        store.writer(bad)
    with pytest.raises(ValueError):
        parse_digest(bad)


def test_layout_is_two_hex_fanout(store: BlobStore) -> None:
    data = b"hello"
    digest = digest_of(data)
    with store.writer(digest) as w:
        w.write(data)
        path = w.commit()
    hex_ = digest.split(":")[1]
    assert path == os.path.join(store.root, "blobs", "sha256", hex_[:2], hex_)
    assert open(path, "rb").read() == data
    assert store.stat(digest).size == 5
    assert os.listdir(store.tmp_dir) == []


def test_digest_mismatch_leaves_nothing(store: BlobStore) -> None:
    digest = digest_of(b"expected")
    w = store.writer(digest)
    w.write(b"something else")
    with pytest.raises(DigestMismatch) as err:
        w.commit()
    assert err.value.actual == digest_of(b"something else")
    assert store.stat(digest) is None
    assert names_under(store.root) == []


def test_size_mismatch_short_and_long(store: BlobStore) -> None:
    data = b"0123456789"
    digest = digest_of(data)
    short = store.writer(digest, size=11)
    short.write(data)
    with pytest.raises(SizeMismatch):
        short.commit()
    long = store.writer(digest, size=4)
    with pytest.raises(SizeMismatch):
        long.write(data)
    assert store.stat(digest) is None
    assert names_under(store.root) == []


def test_abandoned_writers_clean_up(store: BlobStore) -> None:
    digest = digest_of(b"x")
    with pytest.raises(RuntimeError):
        with store.writer(digest) as w:
            w.write(b"x")
            raise RuntimeError("client went away")
    dropped = store.writer(digest)
    dropped.write(b"x")
    del dropped
    gc.collect()
    assert os.listdir(store.tmp_dir) == []
    assert store.stat(digest) is None


def test_two_writers_of_one_digest_both_succeed(store: BlobStore) -> None:
    data = os.urandom(4096)
    digest = digest_of(data)
    a, b = store.writer(digest), store.writer(digest)
    a.write(data)
    b.write(data)
    a.commit()
    b.commit()
    assert open(store.path(digest), "rb").read() == data
    assert os.listdir(store.tmp_dir) == []


def _write_in_process(root: str, data: bytes, barrier) -> None:
    store = BlobStore(root)
    w = store.writer(sha256_digest(data), size=len(data))
    for i in range(0, len(data), 65536):
        w.write(data[i : i + 65536])
    barrier.wait()  # both processes commit at the same moment
    w.commit()


def test_concurrent_writers_in_two_processes(tmp_path) -> None:
    root = str(tmp_path / "store")
    data = os.urandom(3 << 20)
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_write_in_process, args=(root, data, barrier)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    assert [p.exitcode for p in procs] == [0, 0]
    store = BlobStore(root)
    with store.open(sha256_digest(data)) as r:
        assert r.read(len(data) + 1) == data
    assert os.listdir(store.tmp_dir) == []


def test_open_with_range(store: BlobStore) -> None:
    data = bytes(range(256)) * 4
    digest = digest_of(data)
    with store.writer(digest) as w:
        w.write(data)
        w.commit()
    with store.open(digest, 10, 20) as r:
        assert (r.size, r.remaining) == (1024, 10)
        assert r.read(4) + r.read(100) == data[10:20]
        assert r.read(1) == b""
    with store.open(digest, 1000) as r:
        assert r.read(9999) == data[1000:]
    with store.open(digest, 0, 5000) as r:  # an end past the blob is clipped
        assert r.remaining == 1024
    with pytest.raises(ValueError):
        store.open(digest, 2000)
    with pytest.raises(BlobNotFound):
        store.open(digest_of(b"absent"))


def test_follower_reads_a_write_to_the_end(store: BlobStore) -> None:
    data = os.urandom(300_000)
    digest = digest_of(data)
    assert store.follow(digest) is None
    w = store.writer(digest, size=len(data))
    f = store.follow(digest)
    assert f is not None
    got = bytearray()
    assert f.read(1000) == b"" and f.state is FollowState.WRITING
    for i in range(0, len(data), 70_000):
        w.write(data[i : i + 70_000])
        got += f.read(1 << 20)
        assert f.state is FollowState.WRITING
    w.commit()
    while chunk := f.read(50_000):
        got += chunk
    assert f.state is FollowState.COMMITTED
    assert bytes(got) == data
    f.close()


def test_follower_sees_a_failed_write_fail(store: BlobStore) -> None:
    digest = digest_of(b"the real content")
    w = store.writer(digest)
    f = store.follow(digest)
    w.write(b"corrupted bytes")
    assert f.read(100) == b"corrupted bytes"
    with pytest.raises(DigestMismatch):
        w.commit()
    assert f.read(100) == b""
    assert f.state is FollowState.FAILED


def test_follower_of_failed_write_switches_to_another_writers_blob(store: BlobStore) -> None:
    """Ours fails, a second writer commits: the bytes already given were right, so it completes."""
    data = os.urandom(10_000)
    digest = digest_of(data)
    ours, theirs = store.writer(digest), store.writer(digest)
    ours.write(data[:4000])
    f = store.follow(digest)
    assert f.temp_path == ours.temp_path  # the write with the most bytes is followed
    theirs.write(data)
    got = f.read(4000)
    theirs.commit()
    ours.abort()
    while chunk := f.read(3000):
        got += chunk
    assert f.state is FollowState.COMMITTED
    assert got == data


def test_follower_detects_wrong_prefix_after_switch(store: BlobStore) -> None:
    data = os.urandom(10_000)
    digest = digest_of(data)
    bad = store.writer(digest)
    bad.write(b"\0" * 6000)  # a writer receiving wrong bytes
    f = store.follow(digest)
    assert f.read(6000) == b"\0" * 6000
    good = store.writer(digest)
    good.write(data)
    good.commit()
    bad.abort()
    while f.read(4096):
        pass
    assert f.state is FollowState.FAILED


def test_follow_a_committed_blob(store: BlobStore) -> None:
    data = b"done already"
    digest = digest_of(data)
    with store.writer(digest) as w:
        w.write(data)
        w.commit()
    f = store.follow(digest)
    assert f.read(100) == data
    assert f.read(100) == b"" and f.state is FollowState.COMMITTED


def test_clean_temp_spares_live_writers(store: BlobStore) -> None:
    old = store.writer(digest_of(b"old"))
    old.write(b"o")
    live = store.writer(digest_of(b"live"))
    live.write(b"l")
    os.utime(old.temp_path, (1000, 1000))
    assert store.clean_temp(grace=60) == 1
    assert not os.path.exists(old.temp_path)
    assert os.path.exists(live.temp_path)


def test_clean_temp_goes_on_past_what_it_cannot_remove(store: BlobStore) -> None:
    odd = os.path.join(store.tmp_dir, "a-directory")  # someone's mkdir: not ours to remove, not fatal
    os.mkdir(odd)
    os.utime(odd, (1000, 1000))
    old = store.writer(digest_of(b"old"))
    os.utime(old.temp_path, (1000, 1000))
    assert store.clean_temp(grace=60) == 1
    assert os.path.isdir(odd) and not os.path.exists(old.temp_path)


def test_iter_blobs_skips_foreign_files(store: BlobStore) -> None:
    data = b"a blob"
    digest = digest_of(data)
    with store.writer(digest) as w:
        w.write(data)
        w.commit()
    open(os.path.join(store.blob_dir, "zz"), "w").close()
    os.makedirs(os.path.join(store.blob_dir, "ab"), exist_ok=True)
    open(os.path.join(store.blob_dir, "ab", "not-a-digest"), "w").close()
    assert [(b.digest, b.size) for b in store.iter_blobs()] == [(digest, len(data))]
    assert hashlib.sha256(data).hexdigest() == parse_digest(digest)


def test_a_follower_gives_up_on_a_silent_writer(store: BlobStore) -> None:
    data = os.urandom(1000)
    dead = store.writer(digest_of(data))
    dead.write(data[:300])
    follower = store.follow(dead.digest)
    follower.stall_timeout = 30
    assert follower.read(1000) == data[:300]
    assert follower.read(1000) == b"" and follower.state is FollowState.WRITING
    os.utime(dead.temp_path, (0, 0))  # the writer was killed long ago: its file never grows again
    assert follower.read(1000) == b"" and follower.state is FollowState.FAILED


def test_a_follower_of_a_dead_writer_moves_to_a_committed_copy(store: BlobStore) -> None:
    data = os.urandom(1000)
    dead = store.writer(digest_of(data))
    dead.write(data[:300])
    follower = store.follow(dead.digest)
    follower.stall_timeout = 30
    got = follower.read(1000)
    with store.writer(dead.digest) as other:  # another node took over and committed
        other.write(data)
        other.commit()
    os.utime(dead.temp_path, (0, 0))
    while chunk := follower.read(400):
        got += chunk
    assert follower.state is FollowState.COMMITTED and got == data


def test_a_verifying_follower_refuses_bytes_that_do_not_hash_to_the_digest(store: BlobStore) -> None:
    """A shared filesystem's cache may hand a follower wrong bytes; the hash catches it."""
    data = os.urandom(3 * 4096 + 100)
    writer = store.writer(digest_of(data))
    follower = store.follow(writer.digest)
    follower.verify_bytes = True
    writer.write(data[:4096 + 10])
    assert follower.read(1 << 20) == data[:4096]  # only whole pages of a growing file
    writer.write(data[4096 + 10:])
    writer.commit()
    with open(store.path(writer.digest), "r+b") as committed:  # stands in for a stale cached page
        committed.seek(5000)
        committed.write(b"\0" * 10)
    while follower.read(1 << 20):
        pass
    assert follower.state is FollowState.FAILED


def test_a_verifying_follower_commits_good_bytes(store: BlobStore) -> None:
    data = os.urandom(10_000)
    writer = store.writer(digest_of(data))
    follower = store.follow(writer.digest)
    follower.verify_bytes = True
    got = b""
    for i in range(0, len(data), 3000):
        writer.write(data[i:i + 3000])
        got += follower.read(1 << 20)
    writer.commit()
    while chunk := follower.read(1 << 20):
        got += chunk
    assert follower.state is FollowState.COMMITTED and got == data


def test_verify_checks_before_the_commit_and_ends_writing(tmp_path) -> None:
    store = BlobStore(str(tmp_path))
    data = b"verified" * 100
    writer = store.writer(sha256_digest(data), len(data))
    writer.write(data)
    writer.verify()
    assert store.stat(writer.digest) is None  # verified is not committed: nothing under the name yet
    with pytest.raises(BlobWriteError):
        writer.write(b"more")
    writer.commit()
    assert store.stat(writer.digest).size == len(data)


def test_verify_of_wrong_bytes_removes_the_temporary_file(tmp_path) -> None:
    store = BlobStore(str(tmp_path))
    writer = store.writer(sha256_digest(b"right"), 5)
    writer.write(b"wrong")
    with pytest.raises(DigestMismatch):
        writer.verify()
    assert os.listdir(store.tmp_dir) == [] and store.stat(writer.digest) is None


def test_a_failing_disk_write_is_a_blob_write_error_and_leaves_nothing(tmp_path, monkeypatch) -> None:
    store = BlobStore(str(tmp_path))
    writer = store.writer(sha256_digest(b"data"), 4)

    def full(fd: int, data: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(BlobWriteError, match="No space left"):
        writer.write(b"data")
    monkeypatch.undo()
    assert os.listdir(store.tmp_dir) == []
    with pytest.raises(BlobWriteError):
        writer.commit()


def test_a_vouched_follower_ends_committed_before_the_rename(tmp_path) -> None:
    store = BlobStore(str(tmp_path))
    data = os.urandom(10000)
    writer = store.writer(sha256_digest(data), len(data))
    follower = store.follow(writer.digest)
    writer.write(data)
    writer.verify()
    assert follower.read(1 << 20) == data and follower.state is FollowState.WRITING
    follower.vouch(len(data))
    assert follower.state is FollowState.COMMITTED and follower.read(10) == b""
    writer.commit()


def test_a_follower_says_what_has_landed_for_a_caller_that_sends_it_itself(tmp_path) -> None:
    """landed/advance: what read would give, left in the file (for sendfile), to the same verdict."""
    store = BlobStore(str(tmp_path))
    data = os.urandom(10000)
    writer = store.writer(sha256_digest(data), len(data))
    follower = store.follow(writer.digest)
    assert follower.landed(1 << 20) == 0 and follower.state is FollowState.WRITING
    writer.write(data[:6000])
    assert follower.landed(1 << 20) == 6000 and follower.landed(100) == 100
    assert follower.position == 0  # nothing read: the caller sends from fileno() itself
    follower.advance(6000)
    assert os.pread(follower.fileno(), 10, 5990) == data[5990:6000]
    assert follower.landed(1 << 20) == 0 and follower.state is FollowState.WRITING
    writer.write(data[6000:])
    writer.verify()
    follower.vouch(len(data))  # known size: no more than it ever lands
    assert follower.landed(1 << 20) == 4000
    follower.advance(4000)
    assert follower.landed(1 << 20) == 0 and follower.state is FollowState.COMMITTED
    writer.commit()


def test_a_follower_that_finds_its_file_gone_says_so_when_nothing_has_landed(tmp_path) -> None:
    store = BlobStore(str(tmp_path))
    data = os.urandom(10000)
    writer = store.writer(sha256_digest(data), len(data))
    follower = store.follow(writer.digest)
    writer.write(data[:3000])
    follower.advance(follower.landed(1 << 20))
    writer.abort()
    assert follower.landed(1 << 20) == 0
    assert follower.state is FollowState.FAILED and follower.failure is FollowFailure.REMOVED


def _stat_by_name_only(monkeypatch, follower, name: str) -> None:
    """What sshfs does: fstat of an open file whose name was renamed or removed fails."""
    real = os.fstat

    def fstat(fd: int) -> os.stat_result:
        if fd == follower.fileno() and not os.path.exists(name):
            raise FileNotFoundError(2, "No such file or directory")
        return real(fd)

    monkeypatch.setattr(os, "fstat", fstat)


def test_a_follower_on_sshfs_finds_the_rest_in_the_committed_blob(tmp_path, monkeypatch) -> None:
    store = BlobStore(str(tmp_path))
    data = os.urandom(10000)
    writer = store.writer(sha256_digest(data), len(data))
    follower = store.follow(writer.digest)
    _stat_by_name_only(monkeypatch, follower, writer.temp_path)
    writer.write(data[:4000])
    follower.advance(follower.landed(1 << 20))
    writer.write(data[4000:])
    writer.commit()  # renamed: the follower's file can no longer be stat'ed
    assert follower.landed(1 << 20) == 6000 and follower.state is FollowState.WRITING
    assert os.pread(follower.fileno(), 6000, 4000) == data[4000:]
    follower.advance(6000)
    assert follower.landed(1 << 20) == 0 and follower.state is FollowState.COMMITTED


def test_a_vouched_follower_on_sshfs_needs_no_stat_after_the_rename(tmp_path, monkeypatch) -> None:
    store = BlobStore(str(tmp_path))
    data = os.urandom(10000)
    writer = store.writer(sha256_digest(data), len(data))
    follower = store.follow(writer.digest)
    _stat_by_name_only(monkeypatch, follower, writer.temp_path)
    writer.write(data)
    follower.advance(follower.landed(5000))
    follower.vouch(len(data))
    writer.commit()
    assert follower.landed(1 << 20) == 5000
    follower.advance(5000)
    assert follower.landed(1 << 20) == 0 and follower.state is FollowState.COMMITTED


def test_a_follower_on_sshfs_whose_file_is_removed_says_so(tmp_path, monkeypatch) -> None:
    store = BlobStore(str(tmp_path))
    data = os.urandom(10000)
    writer = store.writer(sha256_digest(data), len(data))
    follower = store.follow(writer.digest)
    _stat_by_name_only(monkeypatch, follower, writer.temp_path)
    writer.write(data[:3000])
    follower.advance(follower.landed(1 << 20))
    writer.abort()
    assert follower.landed(1 << 20) == 0 and follower.failure is FollowFailure.REMOVED


def test_a_follower_that_hashes_must_read_what_it_delivers(tmp_path) -> None:
    store = BlobStore(str(tmp_path))
    writer = store.writer(sha256_digest(b"abc"), 3)
    follower = store.follow(writer.digest)
    follower.verify_bytes = True
    writer.write(b"abc")
    with pytest.raises(ValueError):
        follower.landed(3)
    with pytest.raises(ValueError):
        follower.advance(3)
    writer.abort()


def test_vouching_is_ignored_for_another_nodes_file(tmp_path) -> None:
    store = BlobStore(str(tmp_path))
    data = os.urandom(10000)
    writer = store.writer(sha256_digest(data), len(data))
    follower = store.follow(writer.digest)
    follower.verify_bytes = True  # its bytes are trusted only once they hash right after the rename
    writer.write(data)
    follower.read(1 << 20)
    follower.vouch(len(data))
    assert follower.state is FollowState.WRITING
    writer.commit()
    while follower.read(1 << 20):
        pass
    assert follower.state is FollowState.COMMITTED


def test_pieces_written_in_one_writev_commit(store) -> None:
    """Pieces written together make the same verified blob as the bytes in one piece."""
    pieces = [os.urandom(n) for n in (1, 65536, 0, 4097, 300000)]
    data = b"".join(pieces)
    writer = store.writer(digest_of(data), len(data))
    writer.write_pieces(pieces[:2])
    writer.write_pieces(pieces[2:])
    with open(writer.temp_path, "rb") as written:
        assert written.read() == data  # followers see the bytes before the commit
    assert open(writer.commit(), "rb").read() == data


def test_pieces_wrong_bytes_are_refused(store) -> None:
    data = os.urandom(5000)
    writer = store.writer(digest_of(b"other"), len(data))
    writer.write_pieces([data])
    with pytest.raises(DigestMismatch):
        writer.commit()
    assert not os.path.exists(writer.temp_path)


def test_pieces_beyond_the_expected_size_are_refused(store) -> None:
    data = os.urandom(5000)
    writer = store.writer(digest_of(data), 4000)
    with pytest.raises(SizeMismatch):
        writer.write_pieces([data[:3000], data[3000:]])
    assert not os.path.exists(writer.temp_path)


def test_writev_all_goes_on_after_partial_writes(tmp_path, monkeypatch) -> None:
    """writev may take only part of the pieces, even part of one: the rest follows, in order."""
    from storage import files

    real = os.writev
    monkeypatch.setattr(files.os, "writev", lambda fd, views: real(fd, [memoryview(views[0])[:3]]))
    pieces = [b"abcdefg", b"", b"hi", b"jklmnopq"]
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT)
    try:
        assert files.writev_all(fd, pieces) == 17
    finally:
        os.close(fd)
    assert (tmp_path / "f").read_bytes() == b"abcdefghijklmnopq"


def test_a_reader_narrows_to_a_range_without_opening_again(store) -> None:
    data = os.urandom(10000)
    writer = store.writer(digest_of(data), len(data))
    writer.write(data)
    writer.commit()
    with store.open(digest_of(data)) as reader:
        reader.narrow(100, 1100)
        assert (reader.start, reader.position, reader.end, reader.remaining) == (100, 100, 1100, 1000)
        assert reader.read(1 << 20) == data[100:1100] and reader.read(10) == b""
        for start, end in ((50, 200), (200, 100), (1000, 1200)):  # outside what it was narrowed to
            with pytest.raises(ValueError):
                reader.narrow(start, end)
