"""A full store on a real filesystem: metahub keeps proxying, verified and without keeping anything.

The store lives on a 2 MiB tmpfs mounted for the test (root only: ``mount -t tmpfs``), filled to the
last byte once metahub has started; upstream is a real docker-registry.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from storage import sha256_digest
from tests.peers import skopeo
from tests.peers.oci import MANIFEST, Image, make_image
from tests.peers.registry import Registry
from tests.peers.require import missing

from .common import request
from .metahub_process import Metahub

TMPFS_SIZE = 2 << 20


@contextlib.contextmanager
def small_filesystem(path: Path) -> Iterator[Path]:
    """A tmpfs of TMPFS_SIZE bytes at ``path``, unmounted on exit."""
    path.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE}", "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        missing(f"cannot mount a tmpfs for the full-disk test (needs root): {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def fill(path: Path) -> None:
    """Write ``path`` until the filesystem it is on has not one byte left."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        size = 1 << 16
        while size:
            try:
                os.write(fd, b"\0" * size)
            except OSError as error:
                assert error.errno == errno.ENOSPC
                size //= 2
    finally:
        os.close(fd)


def old_blobs(store: Path) -> int:
    """Fill the store with committed blobs last read two days ago (eviction's first choice)."""
    written = 0
    long_ago = time.time() - 2 * 86400
    while True:
        data = os.urandom(64 << 10)
        digest = hashlib.sha256(data).hexdigest()
        target = store / "blobs" / "sha256" / digest[:2] / digest
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        except OSError as error:
            assert error.errno == errno.ENOSPC
            target.unlink(missing_ok=True)
            break
        os.utime(target, (long_ago, long_ago))
        written += 1
    fill(store / "filler")  # the last few KiB
    return written


def metric(hub: Metahub, name: str) -> float | None:
    status, _, body = request(hub.host, "GET", "/metrics")
    assert status == 200
    for line in body.decode().splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


def store_files(store: Path, kind: str) -> list[str]:
    return [name for _, _, names in os.walk(store / kind) for name in names]


@pytest.fixture
def image(tmp_path) -> Iterator[tuple[Image, Path, Registry]]:
    """team/app:1 on a real docker-registry: a 600 kB layer, far more than a full store can take."""
    with Registry(tmp_path / "upstream") as registry:
        layout = tmp_path / "layout"
        pushed = make_image(layout, "1", layers=[600_000])
        skopeo.push(layout, "1", f"{registry.host}/team/app:1")
        yield pushed, layout, registry


def pull(hub: Metahub, image: Image, layout: Path) -> None:
    """The manifest by tag, then the config and the layer: each 200 with the right bytes."""
    status, headers, body = request(hub.host, "GET", "/v2/team/app/manifests/1", {"Accept": MANIFEST})
    assert status == 200 and body == image.manifest and headers["docker-content-digest"] == image.digest
    for blob in (image.config, *image.layers):
        status, headers, body = request(hub.host, "GET", f"/v2/team/app/blobs/{blob.digest}")
        assert status == 200 and sha256_digest(body) == blob.digest
        assert body == (layout / "blobs" / "sha256" / blob.digest[7:]).read_bytes()


def test_a_full_store_still_serves_manifests_and_blobs_from_upstream(tmp_path, image) -> None:
    pushed, layout, registry = image
    with small_filesystem(tmp_path / "store") as store, Metahub(
        tmp_path / "metahub", {"local": {"url": registry.url}}, default_upstream="local",
        storage={"path": str(store), "index": str(tmp_path / "index")},
    ) as hub:
        fill(store / "filler")
        pull(hub, pushed, layout)
        status, _, _ = request(hub.host, "GET", f"/v2/team/app/blobs/{pushed.layers[0].digest}",
                               {"Range": "bytes=100-199"})
        assert status == 206
        assert store_files(store, "blobs") == [] and store_files(store, "tmp") == []
        assert store_files(store, "leases") == []
        assert metric(hub, "metahub_store_full") == 1
        assert metric(hub, 'metahub_store_write_failures_total{reason="no_space"}') >= 1
        assert metric(hub, 'metahub_store_bypassed_total{kind="blob"}') == 3
        assert "the store cannot take" in hub.log() and "nothing is evicted" in hub.log()
        pull(hub, pushed, layout)  # and again, while it is still full
        assert store_files(store, "tmp") == []


def test_a_full_store_asks_eviction_for_room_and_then_keeps_blobs_again(tmp_path, image) -> None:
    pushed, layout, registry = image
    with small_filesystem(tmp_path / "store") as store, Metahub(
        tmp_path / "metahub", {"local": {"url": registry.url}}, default_upstream="local",
        storage={"path": str(store), "index": str(tmp_path / "index"), "max_size": "1MiB"},
    ) as hub:
        assert old_blobs(store) > 16
        pull(hub, pushed, layout)  # the manifest finds the store full; eviction runs meanwhile
        deadline = time.monotonic() + 20
        while "evicted" not in hub.log() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "evicted" in hub.log() and "collecting without the cluster's gc lease" in hub.log()
        pull(hub, pushed, layout)  # eviction made room: kept this time
        kept = store_files(store, "blobs")
        assert pushed.layers[0].digest[7:] in kept and pushed.config.digest[7:] in kept
        assert store_files(store, "tmp") == [] and metric(hub, "metahub_store_full") == 0
        status, _, body = request(hub.host, "GET", "/v2/team/app/manifests/1", {"Accept": MANIFEST})
        assert status == 200 and json.loads(body)["layers"][0]["digest"] == pushed.layers[0].digest


def test_a_read_only_store_is_bypassed_too(tmp_path, image) -> None:
    pushed, layout, registry = image
    with small_filesystem(tmp_path / "store") as store, Metahub(
        tmp_path / "metahub", {"local": {"url": registry.url}}, default_upstream="local",
        storage={"path": str(store), "index": str(tmp_path / "index")},
    ) as hub:
        subprocess.run(["mount", "-o", "remount,ro", str(store)], check=True)
        pull(hub, pushed, layout)
        assert store_files(store, "blobs") == [] and store_files(store, "tmp") == []
        assert metric(hub, 'metahub_store_write_failures_total{reason="read_only"}') >= 1
        assert metric(hub, "metahub_store_full") == 0  # not full: read-only, as the log says
        assert "Read-only file system" in hub.log()
