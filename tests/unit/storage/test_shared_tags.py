"""Shared tag records: atomic replace, read by any node, never a path outside tags/."""
from __future__ import annotations

import json
import multiprocessing
import os
import time

import pytest

from storage import (
    BlobStore,
    InvalidDigest,
    InvalidTagPath,
    SharedTags,
    TagRecord,
    sha256_digest,
)

D1 = sha256_digest(b"one")
D2 = sha256_digest(b"two")


@pytest.fixture
def root(tmp_path) -> str:
    return str(tmp_path / "store")


def test_a_tag_written_by_one_node_is_read_by_another(root) -> None:
    node_a, node_b = SharedTags(root), SharedTags(root)
    assert node_b.read("docker.io", "library/alpine", "3.19") is None
    node_a.write("docker.io", "library/alpine", "3.19", D1, checked=1700000000.5)
    assert node_b.read("docker.io", "library/alpine", "3.19") == TagRecord(D1, 1700000000.5)
    node_b.write("docker.io", "library/alpine", "3.19", D2, checked=1700000100)
    assert node_a.read("docker.io", "library/alpine", "3.19") == TagRecord(D2, 1700000100.0)
    # Other tags, repositories and upstreams are separate.
    assert node_a.read("docker.io", "library/alpine", "3.20") is None
    assert node_a.read("docker.io", "library", "alpine") is None
    assert node_a.read("ghcr.io", "library/alpine", "3.19") is None


def test_layout_and_no_leftovers(root) -> None:
    tags = SharedTags(root)
    tags.write("docker.io", "library/alpine", "3.19", D1, checked=5.0)
    path = os.path.join(root, "tags", "docker.io", "library", "alpine", "_tags", "3.19.json")
    assert tags.path("docker.io", "library/alpine", "3.19") == path
    with open(path) as f:
        assert json.load(f) == {"digest": D1, "checked": 5.0}
    assert os.listdir(os.path.join(root, "tmp")) == []


def test_a_repository_and_a_tag_file_never_collide(root) -> None:
    """Repository "a/x.json" and tag "x" of repository "a" are both valid names."""
    tags = SharedTags(root)
    tags.write("up", "a", "x", D1, checked=1.0)
    tags.write("up", "a/x.json", "latest", D2, checked=2.0)
    assert tags.read("up", "a", "x") == TagRecord(D1, 1.0)
    assert tags.read("up", "a/x.json", "latest") == TagRecord(D2, 2.0)


def test_a_bad_digest_is_refused(root) -> None:
    with pytest.raises(InvalidDigest):
        SharedTags(root).write("up", "a", "t", "sha256:short", checked=1.0)


@pytest.mark.parametrize(
    "content", [b"", b"{", b"[]", b'{"digest": "x", "checked": 1}', b'{"digest": "%s"}']
)
def test_an_unreadable_record_reads_as_none(root, content: bytes) -> None:
    tags = SharedTags(root)
    path = tags.path("up", "a", "t")
    os.makedirs(os.path.dirname(path))
    with open(path, "wb") as f:
        f.write(content.replace(b"%s", D1.encode()))
    assert tags.read("up", "a", "t") is None


@pytest.mark.parametrize(
    "upstream, repository, tag",
    [
        ("..", "a", "t"),
        (".", "a", "t"),
        ("", "a", "t"),
        ("a/b", "c", "t"),
        ("/etc", "c", "t"),
        ("up", "../../etc", "t"),
        ("up", "a/../../b", "t"),
        ("up", "/etc/passwd", "t"),
        ("up", "a//b", "t"),
        ("up", "a/", "t"),
        ("up", "", "t"),
        ("up", "a\0b", "t"),
        ("up", "_tags", "t"),
        ("up", "a", ".."),
        ("up", "a", "../../x"),
        ("up", "a", "x/y"),
        ("up", "a", ".hidden"),
        ("up", "a", ""),
        ("up", "a", "t\0"),
        ("up\0", "a", "t"),
        ("up", "a\\..\\b", "t"),
    ],
)
def test_names_that_could_escape_are_refused(root, upstream: str, repository: str, tag: str) -> None:
    tags = SharedTags(root)
    with pytest.raises(InvalidTagPath):
        tags.write(upstream, repository, tag, D1, checked=1.0)
    with pytest.raises(InvalidTagPath):
        tags.read(upstream, repository, tag)
    assert os.listdir(os.path.join(root, "tags")) == []
    assert sorted(os.listdir(root)) == ["tags", "tmp"]


def test_crash_leftovers_are_cleaned_with_the_stores_temp_files(root) -> None:
    SharedTags(root)  # creates tmp/, where a crashed tag write leaves its file
    leftover = os.path.join(root, "tmp", "tag.node-1-abc.tmp")
    open(leftover, "wb").close()
    os.utime(leftover, (time.time() - 7200, time.time() - 7200))
    assert BlobStore(root).clean_temp(grace=3600) == 1


# -- across processes ---------------------------------------------------------------------------


def _write_forever(root: str, digest: str, started, stop) -> None:
    tags = SharedTags(root)
    n = 0
    while not stop.is_set():
        tags.write("docker.io", "library/alpine", "latest", digest, checked=float(n))
        n += 1
        if n == 1:
            started.set()


def test_a_reader_never_sees_a_partial_record(root) -> None:
    """Two writer processes replace the record as fast as they can; every read is a whole record."""
    SharedTags(root)
    ctx = multiprocessing.get_context("fork")
    stop = ctx.Event()
    started = [ctx.Event(), ctx.Event()]
    writers = [
        ctx.Process(target=_write_forever, args=(root, digest, event, stop))
        for digest, event in zip((D1, D2), started)
    ]
    for w in writers:
        w.start()
    try:
        assert all(s.wait(30) for s in started)
        reader = SharedTags(root)
        seen = set()
        deadline = time.monotonic() + 1.5
        reads = 0
        while time.monotonic() < deadline:
            record = reader.read("docker.io", "library/alpine", "latest")
            assert record is not None, "a reader saw a missing or partial record"
            seen.add(record.digest)
            reads += 1
    finally:
        stop.set()
        for w in writers:
            w.join(timeout=30)
    assert all(w.exitcode == 0 for w in writers)
    assert seen <= {D1, D2} and reads > 100
    assert os.listdir(os.path.join(root, "tmp")) == []
