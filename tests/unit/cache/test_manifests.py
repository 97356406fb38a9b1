"""The manifest cache on a fake clock: tags within tag_ttl, revalidation, and bodies from memory."""
from __future__ import annotations

import errno
import json
import os

from twisted.internet.defer import ensureDeferred, fail, succeed
from twisted.internet.task import Clock

from metahub.cache.manifests import Manifests
from metahub.cache.routing import Route
from metahub.config.file import UpstreamConfig
from metahub.oci import errors, media
from metahub.oci.media import Manifest
from metahub.runtime.metrics import Metrics
from metahub.upstream.client import ManifestHead
from metahub.upstream.upstreams import Upstreams
from storage import SharedTags, Storage, sha256_digest
from storage import blobstore as storage_blobstore
from storage import files as storage_files
from tests.unit.fakes import inline, store_capacity

BODY = json.dumps({"schemaVersion": 2, "mediaType": media.OCI_MANIFEST, "layers": []}).encode()
DIGEST = sha256_digest(BODY)
ROUTE = Route(UpstreamConfig("local", "http://127.0.0.1:1"), "team/app")


class Upstream:
    def __init__(self) -> None:
        self.gets = self.heads = 0
        self.down = False

    def get_manifest(self, repository, reference, accept):
        self.gets += 1
        return succeed(Manifest(BODY, media.OCI_MANIFEST, DIGEST))

    def head_manifest(self, repository, reference, accept):
        self.heads += 1
        if self.down:
            return fail(errors.bad_gateway("upstream local is down"))
        return succeed(ManifestHead(DIGEST, media.OCI_MANIFEST, len(BODY)))


def upstreams(upstream: Upstream) -> Upstreams:
    return Upstreams(clients={"local": upstream}, metrics=Metrics())  # type: ignore[dict-item]  # a fake


def make(tmp_path, index: str = "index", clock: Clock | None = None, upstream: Upstream | None = None):
    """Manifests over a fake upstream, and the names of the functions it ran in threads."""
    clock = clock or Clock()
    storage = Storage(str(tmp_path / "store"), str(tmp_path / index), clock=clock.seconds)
    upstream = upstream or Upstream()
    reads = []

    def in_thread(function, *args):
        reads.append(function.__name__)
        return succeed(function(*args))

    metrics = Metrics()
    manifests = Manifests(storage=storage, upstreams=upstreams(upstream), clock=clock, in_thread=in_thread,
                          index_writes=inline, metrics=metrics, tag_ttl=300.0,
                          shared_tags=SharedTags(str(tmp_path / "store")),
                          capacity=store_capacity(clock, metrics))
    return manifests, upstream, clock, reads


def test_a_tag_is_trusted_for_tag_ttl_then_revalidated_and_served_when_upstream_is_down(tmp_path) -> None:
    manifests, upstream, clock, _ = make(tmp_path)
    assert ensureDeferred(manifests.by_tag(ROUTE, "1.0")).result.body == BODY
    assert (upstream.gets, upstream.heads) == (1, 0)
    clock.advance(299)
    ensureDeferred(manifests.by_tag(ROUTE, "1.0")).result
    assert (upstream.gets, upstream.heads) == (1, 0)  # within tag_ttl: no upstream request
    clock.advance(2)
    ensureDeferred(manifests.by_tag(ROUTE, "1.0")).result
    assert (upstream.gets, upstream.heads) == (1, 1)  # revalidated with a HEAD, not a GET
    clock.advance(301)
    upstream.down = True
    assert ensureDeferred(manifests.by_tag(ROUTE, "1.0")).result.digest == DIGEST  # last known digest


def test_a_hot_manifest_is_served_from_memory(tmp_path) -> None:
    manifests, _, _, reads = make(tmp_path)
    ensureDeferred(manifests.by_tag(ROUTE, "1.0")).result
    reads.clear()
    for _ in range(3):
        assert ensureDeferred(manifests.by_digest(ROUTE, DIGEST)).result.body == BODY
    assert "read_stored" not in reads


def test_a_tag_another_node_resolved_is_read_from_the_shared_store_once(tmp_path) -> None:
    node_a, upstream, clock, _ = make(tmp_path)
    ensureDeferred(node_a.by_tag(ROUTE, "1.0")).result  # node A resolves and shares the tag
    node_b, _, _, shared_reads = make(tmp_path, "index-b", clock, upstream)
    for _ in range(3):
        assert ensureDeferred(node_b.by_tag(ROUTE, "1.0")).result.body == BODY
    assert shared_reads.count("read") == 1 and upstream.gets == 1  # adopted once, then from B's index
    assert node_b.storage.index.get_tag("local", ROUTE.repository, "1.0").digest == DIGEST


def test_storing_a_manifest_already_in_the_store_writes_nothing(tmp_path) -> None:
    manifests, _, _, _ = make(tmp_path)
    ensureDeferred(manifests.store(ROUTE, BODY, media.OCI_MANIFEST)).result
    writes = []
    manifests.storage.blobs.writer = lambda *args: writes.append(args)  # a virtual index, rebuilt per pull
    stored = ensureDeferred(manifests.store(ROUTE, BODY, media.OCI_MANIFEST)).result
    assert stored.digest == DIGEST and writes == []


def test_a_stored_manifest_and_its_links_are_one_index_transaction(tmp_path) -> None:
    """The record and every reference's link commit together: one fdatasync per manifest, not two."""
    manifests, _, _, _ = make(tmp_path)
    layer = "application/vnd.oci.image.layer.v1.tar+gzip"
    layers = [{"mediaType": layer, "digest": sha256_digest(str(n).encode()), "size": 1} for n in range(5)]
    body = json.dumps({"schemaVersion": 2, "mediaType": media.OCI_MANIFEST, "layers": layers}).encode()
    env = manifests.storage.index.env
    before = env.info()["last_txnid"]
    stored = ensureDeferred(manifests.store(ROUTE, body, media.OCI_MANIFEST)).result
    assert env.info()["last_txnid"] - before == 1
    assert manifests.storage.index.get_blob(stored.digest).media_type == media.OCI_MANIFEST
    assert all(manifests.storage.index.is_linked(layer["digest"], ROUTE.key) for layer in layers)


def test_a_full_store_serves_the_manifest_without_keeping_it(tmp_path, monkeypatch) -> None:
    manifests, upstream, clock, _ = make(tmp_path)

    def no_space(fd, data) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    for module in (storage_files, storage_blobstore):  # blob files and shared tag records
        monkeypatch.setattr(module, "write_all", no_space)
    for _ in range(2):  # the second from memory
        served = ensureDeferred(manifests.by_tag(ROUTE, "1.0")).result
        assert served.body == BODY and served.digest == DIGEST
    assert upstream.gets == 1
    assert manifests.storage.blobs.stat(DIGEST) is None and os.listdir(manifests.storage.blobs.tmp_dir) == []
    assert manifests.shared_tags.read("local", ROUTE.repository, "1.0") is None
    registry = manifests.metrics.registry
    assert registry.get_sample_value("metahub_store_full") == 1
    assert registry.get_sample_value("metahub_store_write_failures_total", {"reason": "no_space"}) == 1
    assert registry.get_sample_value("metahub_store_bypassed_total", {"kind": "manifest"}) == 1
    other = b'{"schemaVersion": 2, "layers": []}'  # found full a moment ago: the store is not tried
    assert ensureDeferred(manifests.store(ROUTE, other, media.OCI_MANIFEST)).result.body == other
    assert registry.get_sample_value("metahub_store_write_failures_total", {"reason": "no_space"}) == 1
    monkeypatch.undo()
    clock.advance(31)
    ensureDeferred(manifests.store(ROUTE, other, media.OCI_MANIFEST)).result
    assert manifests.storage.blobs.stat(sha256_digest(other)) is not None
    assert registry.get_sample_value("metahub_store_full") == 0
