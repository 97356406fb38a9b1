"""The sshfs peer proven against real sshd and sshfs: the semantics the shared blob store leans on.

A blob store shared by several nodes needs writes to show up on the other side, ``O_EXCL`` to
refuse an existing name, temp-file-then-rename publishing (also over an existing name), fsync,
and mtimes that survive the trip. Where sshfs differs from a local filesystem (whole-second
mtimes, ``st_nlink`` always 1, node-local locks, ``.fuse_hidden`` files) the test pins it down, so
a change of sshfs or OpenSSH that alters it is noticed.
"""
import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.peers.process import PeerError
from tests.peers.sshfs import SshfsMount, mounted, require_sshd


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """The directory being shared: "this node's" view of the blob store."""
    directory = tmp_path / "share"
    directory.mkdir()
    return directory


@pytest.fixture
def mount(source: Path, tmp_path: Path) -> Iterator[Path]:
    """``source`` as another node sees it; afterwards no mount may be left behind."""
    with SshfsMount(source, tmp_path / "node-b") as share:
        yield share.path
    assert not mounted(share.path)
    assert str(share.path) not in Path("/proc/mounts").read_text()


def test_writes_are_visible_on_the_other_side(source: Path, mount: Path) -> None:
    (mount / "from-mount").write_bytes(b"written through sshfs")
    assert (source / "from-mount").read_bytes() == b"written through sshfs"

    (source / "from-source").write_bytes(b"written locally")
    assert (mount / "from-source").read_bytes() == b"written locally"
    (source / "from-source").write_bytes(b"rewritten locally, longer")
    assert (mount / "from-source").read_bytes() == b"rewritten locally, longer"

    (source / "from-source").unlink()
    assert not (mount / "from-source").exists()
    assert sorted(os.listdir(mount)) == ["from-mount"]


@pytest.mark.parametrize("made_at", ["source", "mount"])
def test_exclusive_create_of_an_existing_name_fails(source: Path, mount: Path,
                                                    made_at: str) -> None:
    (source if made_at == "source" else mount).joinpath("blob").write_bytes(b"first")
    with pytest.raises(FileExistsError):
        os.open(mount / "blob", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    assert (source / "blob").read_bytes() == b"first"

    descriptor = os.open(mount / "fresh", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    try:
        os.write(descriptor, b"second")
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    assert (source / "fresh").read_bytes() == b"second"


def test_rename_publishes_a_temp_file(source: Path, mount: Path) -> None:
    (mount / "blob.tmp").write_bytes(b"payload")
    os.rename(mount / "blob.tmp", mount / "blob")
    assert (source / "blob").read_bytes() == b"payload"
    assert not (source / "blob.tmp").exists()
    assert (mount / "blob").read_bytes() == b"payload"


def test_rename_over_an_existing_name_replaces_it(source: Path, mount: Path) -> None:
    """No ``workaround=rename`` needed: sshfs uses OpenSSH's posix-rename extension."""
    (source / "tag").write_bytes(b"old")
    (mount / "tag.tmp").write_bytes(b"new")
    os.rename(mount / "tag.tmp", mount / "tag")
    assert (source / "tag").read_bytes() == b"new"
    (mount / "tag.tmp2").write_bytes(b"newer")
    os.replace(mount / "tag.tmp2", mount / "tag")
    assert sorted(os.listdir(source)) == ["tag"]
    assert (source / "tag").read_bytes() == b"newer"


def test_hard_link_works_but_only_the_source_shows_the_link_count(source: Path,
                                                                   mount: Path) -> None:
    (mount / "blob").write_bytes(b"data")
    os.link(mount / "blob", mount / "alias")
    assert os.path.samestat(os.stat(source / "blob"), os.stat(source / "alias"))
    assert os.stat(source / "blob").st_nlink == 2
    assert os.stat(mount / "blob").st_nlink == 1  # SFTP v3 attributes carry no link count
    assert (mount / "alias").read_bytes() == b"data"
    with pytest.raises(FileExistsError):
        os.link(mount / "blob", mount / "alias")


def test_fsync_of_file_and_directory(source: Path, mount: Path) -> None:
    with open(mount / "blob", "wb") as blob:
        blob.write(b"x" * 100_000)
        blob.flush()
        os.fsync(blob.fileno())
        assert (source / "blob").stat().st_size == 100_000  # visible before close
    directory = os.open(mount, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def test_utime_reaches_the_source_in_whole_seconds(source: Path, mount: Path) -> None:
    (mount / "blob").write_bytes(b"data")
    os.utime(mount / "blob", ns=(1_600_000_000_250_000_000, 1_700_000_000_750_000_000))
    assert (source / "blob").stat().st_mtime_ns == 1_700_000_000_000_000_000
    assert (mount / "blob").stat().st_mtime_ns == 1_700_000_000_000_000_000

    (source / "local").write_bytes(b"data")
    os.utime(source / "local", ns=(1_650_000_000_999_999_999, 1_650_000_000_999_999_999))
    assert (source / "local").stat().st_mtime_ns == 1_650_000_000_999_999_999
    assert (mount / "local").stat().st_mtime_ns == 1_650_000_000_000_000_000


def test_deleting_an_open_file_leaves_a_fuse_hidden_name_for_a_while(source: Path,
                                                                     mount: Path) -> None:
    with open(mount / "blob", "wb") as blob:
        os.unlink(mount / "blob")
        hidden = [name for name in os.listdir(source) if name.startswith(".fuse_hidden")]
        assert len(hidden) == 1
        blob.write(b"still writable")
    # the kernel sends the release after close() returns; sshfs then removes the hidden file
    for _ in range(100):
        if not os.listdir(source):
            break
        time.sleep(0.02)
    assert os.listdir(source) == []


def test_two_mounts_agree_on_names_but_not_on_locks(source: Path, tmp_path: Path,
                                                    mount: Path) -> None:
    with SshfsMount(source, tmp_path / "node-c") as other:
        (mount / "blob").write_bytes(b"from b")
        assert (other.path / "blob").read_bytes() == b"from b"

        first = os.open(mount / "lease", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        os.close(first)
        with pytest.raises(FileExistsError):
            os.open(other.path / "lease", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        os.mkdir(mount / "dir")
        with pytest.raises(FileExistsError):
            os.mkdir(other.path / "dir")

        # flock is kept by each node's kernel: both nodes get the exclusive lock at once
        with open(mount / "lease", "rb") as mine, open(other.path / "lease", "rb") as theirs:
            fcntl.flock(mine, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(theirs, fcntl.LOCK_EX | fcntl.LOCK_NB)
    assert not mounted(other.path)


def test_stop_unmounts_a_busy_mount_and_ends_sshd(source: Path, tmp_path: Path) -> None:
    share = SshfsMount(source, tmp_path / "node-d")
    sshd_pid = int((tmp_path / "node-d" / "sshd.pid").read_text())
    busy = os.open(share.path / "open-file", os.O_CREAT | os.O_WRONLY)  # plain unmount: EBUSY
    try:
        share.stop()
        assert not mounted(share.path)
        share.stop()
    finally:
        with contextlib.suppress(OSError):  # ENOTCONN: the descriptor's server is gone
            os.close(busy)
    with pytest.raises(ProcessLookupError):
        os.kill(sshd_pid, 0)


def test_a_failed_mount_raises_with_the_logs_and_leaves_nothing_mounted(tmp_path: Path) -> None:
    """sshfs 3.7 mounts before it logs in; the harness must still notice that it gave up."""
    with pytest.raises(PeerError, match="No such file or directory"):
        SshfsMount(tmp_path / "missing", tmp_path / "node-e")
    assert not mounted(tmp_path / "node-e" / "mnt")


def test_sshd_is_found_when_sbin_is_not_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    assert os.path.basename(require_sshd()) == "sshd"
