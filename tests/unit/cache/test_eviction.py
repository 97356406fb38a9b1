"""Eviction: what the pins reach, and one collection under (or, on a full store, without) the lease."""
from __future__ import annotations

import errno
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from metahub.cache.eviction import pinned_digests, run_collection
from metahub.config.file import Config, parse_config
from metahub.oci import media
from storage import GC_LEASE, Leases, SharedTags, Storage, sha256_digest
from tests.unit.fakes import commit_blob, minimal

NOW = 1_800_000_000.0
DAY = 86400.0


def config(tmp_path: Path, **storage: Any) -> Config:
    data = minimal(tmp_path)
    data["storage"] |= storage
    return parse_config(data | {"pin": ["app:1", f"other@{OTHER_DIGEST}"]}, str(tmp_path))


#: ``library/other``'s manifest, pinned by digest.
OTHER = json.dumps({"schemaVersion": 2, "mediaType": media.OCI_MANIFEST, "layers": []}).encode()
OTHER_DIGEST = sha256_digest(OTHER)


@dataclass
class Image:
    """``library/app:1``: an index of two platform manifests, each with a config and a layer."""

    index: str
    manifests: list[str]
    blobs: list[str]  # configs and layers

    @property
    def everything(self) -> set[str]:
        return {self.index, *self.manifests, *self.blobs}


def descriptor(digest: str, size: int, media_type: str) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": digest, "size": size}


def put_image(storage: Storage, label: str, accessed: float) -> tuple[str, list[str]]:
    """A manifest with a config and a random (binary) layer; returns its digest and its blobs'."""
    config_body, layer = json.dumps({"label": label}).encode(), os.urandom(2000)
    blobs = [commit_blob(storage.blobs, config_body, accessed), commit_blob(storage.blobs, layer, accessed)]
    body = json.dumps({
        "schemaVersion": 2, "mediaType": media.OCI_MANIFEST,
        "config": descriptor(blobs[0], len(config_body), "application/vnd.oci.image.config.v1+json"),
        "layers": [descriptor(blobs[1], len(layer), "application/vnd.oci.image.layer.v1.tar")],
    }).encode()
    return commit_blob(storage.blobs, body, accessed), blobs


@pytest.fixture
def storage(tmp_path: Path) -> Iterator[Storage]:
    opened = Storage(str(tmp_path / "store"), str(tmp_path / "index"), clock=lambda: NOW)
    yield opened
    opened.close()


@pytest.fixture
def image(storage: Storage) -> Image:
    """The pinned image (and OTHER), accessed long ago: the oldest in the store."""
    old = NOW - 30 * DAY
    manifests, blobs = [], []
    for label in ("amd64", "arm64"):
        digest, reached = put_image(storage, label, old)
        manifests.append(digest)
        blobs += reached
    body = json.dumps({
        "schemaVersion": 2, "mediaType": media.OCI_INDEX,
        "manifests": [descriptor(d, 500, media.OCI_MANIFEST) for d in manifests],
    }).encode()
    index = commit_blob(storage.blobs, body, old)
    storage.index.set_tag("docker.io", "library/app", "1", index, NOW - DAY)
    commit_blob(storage.blobs, OTHER, old)
    return Image(index, manifests, blobs)


def test_a_pinned_tag_reaches_the_index_its_manifests_and_their_blobs(
    tmp_path: Path, storage: Storage, image: Image
) -> None:
    pinned = pinned_digests(config(tmp_path), storage, SharedTags(str(tmp_path / "store")))
    assert pinned == image.everything | {OTHER_DIGEST}


def test_a_tag_another_node_resolved_is_read_from_the_shared_tags(
    tmp_path: Path, storage: Storage, image: Image
) -> None:
    shared = SharedTags(str(tmp_path / "store"))
    shared.write("docker.io", "library/app", "2", image.manifests[1], NOW)
    data = minimal(tmp_path) | {"pin": ["docker.io/app:2"]}
    pinned = pinned_digests(parse_config(data, str(tmp_path)), storage, shared)
    assert pinned == {image.manifests[1], *image.blobs[2:]}


def test_a_pin_nobody_resolved_or_whose_blobs_are_gone_reaches_what_there_is(
    tmp_path: Path, storage: Storage, image: Image
) -> None:
    shared = SharedTags(str(tmp_path / "store"))
    unknown = parse_config(minimal(tmp_path) | {"pin": ["app:never-pulled"]}, str(tmp_path))
    assert pinned_digests(unknown, storage, shared) == set()
    os.unlink(storage.blobs.path(image.manifests[0]))  # evicted by another node, say
    pinned = pinned_digests(config(tmp_path), storage, shared)
    assert image.manifests[0] in pinned and not set(image.blobs[:2]) & pinned  # its children are unknown now
    assert set(image.blobs[2:]) <= pinned


def test_without_a_bound_nothing_is_collected(tmp_path: Path, storage: Storage, image: Image) -> None:
    leases = Leases(str(tmp_path / "store"), clock=lambda: NOW)
    assert run_collection(config(tmp_path), storage, leases, SharedTags(str(tmp_path / "store")), NOW) is None
    assert all(storage.blobs.stat(d) is not None for d in image.everything)


def size_of(storage: Storage, digest: str) -> int:
    found = storage.blobs.stat(digest)
    assert found is not None
    return found.size


def fill(storage: Storage, count: int) -> list[str]:
    """Unpinned blobs of 1000 bytes each, accessed two to one days ago (oldest first)."""
    return [commit_blob(storage.blobs, bytes([i]) * 1000, NOW - 2 * DAY + i * 60) for i in range(count)]


def test_a_collection_evicts_the_oldest_unpinned_blobs_down_to_the_bound(
    tmp_path: Path, storage: Storage, image: Image
) -> None:
    loose = fill(storage, 5)
    recent = commit_blob(storage.blobs, b"read a minute ago" * 100, NOW - 60)
    pinned_bytes = sum(size_of(storage, d) for d in image.everything | {OTHER_DIGEST})
    bound = pinned_bytes + 2000 + 1700  # room for the pins, two loose blobs and the recent one
    leases = Leases(str(tmp_path / "store"), clock=lambda: NOW)
    result = run_collection(config(tmp_path, max_size=bound), storage, leases, SharedTags(str(tmp_path / "store")), NOW)
    assert result is not None and result.removed == loose[:3]
    assert result.after_bytes <= bound
    assert all(storage.blobs.stat(d) is not None for d in image.everything | {recent, *loose[3:]})
    assert all(storage.blobs.stat(d) is None for d in loose[:3])
    assert leases.holder(GC_LEASE) is None  # released


def test_a_dry_run_reports_and_removes_nothing(tmp_path: Path, storage: Storage, image: Image) -> None:
    loose = fill(storage, 3)
    leases = Leases(str(tmp_path / "store"), clock=lambda: NOW)
    result = run_collection(config(tmp_path, max_size=1), storage, leases, SharedTags(str(tmp_path / "store")), NOW,
                            dry_run=True)
    assert result is not None and result.dry_run and result.removed == loose
    assert all(storage.blobs.stat(d) is not None for d in loose)


def test_while_another_node_collects_this_one_does_not(tmp_path: Path, storage: Storage, image: Image) -> None:
    loose = fill(storage, 3)
    store = str(tmp_path / "store")
    other = Leases(store, clock=lambda: NOW, node="other").try_take(GC_LEASE, 120.0)
    assert other is not None
    leases = Leases(store, clock=lambda: NOW, node="this")
    assert run_collection(config(tmp_path, max_size=1), storage, leases, SharedTags(store), NOW) is None
    assert all(storage.blobs.stat(d) is not None for d in loose)


def test_a_store_too_full_for_the_lease_file_is_collected_without_it(
    tmp_path: Path, storage: Storage, image: Image, monkeypatch: pytest.MonkeyPatch
) -> None:
    loose = fill(storage, 3)
    leases = Leases(str(tmp_path / "store"), clock=lambda: NOW)

    def full(*args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(leases, "try_take", full)
    result = run_collection(config(tmp_path, max_size=1), storage, leases, SharedTags(str(tmp_path / "store")), NOW)
    assert result is not None and result.removed == loose  # the pins stay, even over the bound


def test_any_other_failure_to_take_the_lease_is_raised(
    tmp_path: Path, storage: Storage, image: Image, monkeypatch: pytest.MonkeyPatch
) -> None:
    loose = fill(storage, 1)
    leases = Leases(str(tmp_path / "store"), clock=lambda: NOW)

    def broken(*args: object) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(leases, "try_take", broken)
    with pytest.raises(OSError) as raised:
        run_collection(config(tmp_path, max_size=1), storage, leases, SharedTags(str(tmp_path / "store")), NOW)
    assert raised.value.errno == errno.EIO
    assert storage.blobs.stat(loose[0]) is not None
