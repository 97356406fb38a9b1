"""Virtual images: the index metahub writes from a spec, where each digest comes from, and the
whole flow through the HTTP face (index, child manifest and blob under the virtual name)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from metahub.cache.routing import Route, route
from metahub.cache.virtual import VirtualImages, build_index
from metahub.config.file import Config, parse_config
from metahub.oci import errors, media
from metahub.oci.media import Manifest
from tests.unit.fakes import minimal
from tests.unit.harness import (
    FakeRegistry,
    digest_of,
    image_manifest,
    in_memory_registry,
)

GENERIC_LAYER, SKYLAKE_LAYER, SHARED_LAYER = b"generic layer", b"skylake layer", b"shared layer"
SPEC = {
    "image": "qnib/bench",
    "manifests": [
        {"image": "qnib/plain:generic", "platform": {"os": "linux", "architecture": "amd64"}},
        {"image": "ghcr.io/qnib/fast:skylake", "platform": {
            "os": "linux", "architecture": "amd64", "variant": "v3", "features": ["cpu:skylake"],
            "osfeatures": ["win32k"],
        }},
    ],
}


def config(tmp_path: Path, *images: dict[str, Any]) -> Config:
    data = minimal(tmp_path) | {
        "upstreams": {"docker.io": {"url": "http://hub.test"}, "ghcr.io": {"url": "http://ghcr.test"}},
        "default_upstream": "docker.io",
        "virtual_images": list(images or [SPEC]),
    }
    return parse_config(data, str(tmp_path))


MANIFESTS = {
    ("docker.io/qnib/plain", "generic"): image_manifest(GENERIC_LAYER, SHARED_LAYER),
    ("ghcr.io/qnib/fast", "skylake"): image_manifest(SKYLAKE_LAYER, SHARED_LAYER),
}


class Fetches:
    """A ``fetch`` from a dict of (route key, reference) -> manifest body, remembering the calls."""

    def __init__(self, manifests: dict[tuple[str, str], bytes], media_type: str = media.OCI_MANIFEST) -> None:
        self.manifests = manifests
        self.media_type = media_type
        self.calls: list[tuple[str, str]] = []

    async def __call__(self, source: Route, reference: str) -> Manifest:
        self.calls.append((source.key, reference))
        body = self.manifests[(source.key, reference)]
        return Manifest(body, self.media_type, digest_of(body))


def built(config: Config, fetch: Fetches) -> tuple[bytes, dict[str, Route]]:
    outcome: list[Any] = []
    Deferred.fromCoroutine(build_index(config, config.virtual_images[0], fetch)).addBoth(outcome.append)
    if isinstance(outcome[0], Failure):
        outcome[0].raiseException()
    return outcome[0]


def test_the_index_lists_each_build_in_spec_order_with_its_platform(tmp_path: Path) -> None:
    fetch = Fetches(MANIFESTS)
    body, _ = built(config(tmp_path), fetch)
    assert fetch.calls == [("docker.io/qnib/plain", "generic"), ("ghcr.io/qnib/fast", "skylake")]
    index = json.loads(body)
    assert (index["schemaVersion"], index["mediaType"]) == (2, media.OCI_INDEX)
    generic, skylake = (MANIFESTS[key] for key in fetch.calls)
    assert index["manifests"] == [
        {"mediaType": media.OCI_MANIFEST, "digest": digest_of(generic), "size": len(generic),
         "platform": {"architecture": "amd64", "os": "linux"}},
        {"mediaType": media.OCI_MANIFEST, "digest": digest_of(skylake), "size": len(skylake),
         "platform": {"architecture": "amd64", "os": "linux", "variant": "v3", "features": ["cpu:skylake"],
                      "os.features": ["win32k"]}},
    ]


def test_the_index_is_the_same_bytes_each_time(tmp_path: Path) -> None:
    # Its digest is what clients pull by after the tag: it must not change while the sources do not.
    first, _ = built(config(tmp_path), Fetches(MANIFESTS))
    again, _ = built(config(tmp_path), Fetches(MANIFESTS))
    assert first == again and b" " not in first


def test_every_digest_the_index_reaches_maps_to_the_repository_it_comes_from(tmp_path: Path) -> None:
    body, sources = built(config(tmp_path), Fetches(MANIFESTS))
    plain, fast = route(config(tmp_path), "qnib/plain"), route(config(tmp_path), "ghcr.io/qnib/fast")
    generic, skylake = MANIFESTS[("docker.io/qnib/plain", "generic")], MANIFESTS[("ghcr.io/qnib/fast", "skylake")]
    assert sources == {
        digest_of(generic): plain, digest_of(GENERIC_LAYER): plain,
        digest_of(SHARED_LAYER): plain,  # in both builds: the first listed is asked for it
        digest_of(skylake): fast, digest_of(SKYLAKE_LAYER): fast,
    }
    assert digest_of(body) not in sources


def test_a_build_that_is_itself_an_index_is_refused_with_502(tmp_path: Path) -> None:
    with pytest.raises(errors.RegistryError) as refused:
        built(config(tmp_path), Fetches(MANIFESTS, media_type=media.OCI_INDEX))
    assert (refused.value.status, refused.value.code) == (502, "UNAVAILABLE")
    assert "qnib/plain:generic is itself an index" in refused.value.message


def test_virtual_images_are_found_by_the_route_and_tag_clients_use(tmp_path: Path) -> None:
    tagged = {"image": "docker.io/team/tools:v2", "manifests": SPEC["manifests"][:1]}
    cfg = config(tmp_path, SPEC, tagged)
    virtual = VirtualImages(cfg)
    bench = route(cfg, "qnib/bench")
    assert virtual.find(bench, "latest") is cfg.virtual_images[0]  # no tag in the spec: latest
    assert virtual.find(route(cfg, "docker.io/qnib/bench"), "latest") is cfg.virtual_images[0]  # the same route
    assert virtual.find(bench, "v2") is None
    tools = route(cfg, "team/tools")
    assert virtual.find(tools, "v2") is cfg.virtual_images[1] and virtual.find(tools, "latest") is None
    assert virtual.is_virtual(bench) and virtual.is_virtual(tools)
    assert not virtual.is_virtual(route(cfg, "qnib/plain")) and not virtual.is_virtual(route(cfg, "ghcr.io/qnib/bench"))
    assert virtual.images_of(bench) == [cfg.virtual_images[0]]
    assert virtual.images_of(route(cfg, "qnib/plain")) == []


def test_sources_are_remembered_per_virtual_repository(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    virtual = VirtualImages(cfg)
    bench, plain, other = route(cfg, "qnib/bench"), route(cfg, "qnib/plain"), route(cfg, "qnib/other")
    assert virtual.source(bench, "sha256:" + "a" * 64) is None
    virtual.remember(bench, {"sha256:" + "a" * 64: plain})
    assert virtual.source(bench, "sha256:" + "a" * 64) == plain
    assert virtual.source(other, "sha256:" + "a" * 64) is None


# --- through the HTTP face -----------------------------------------------------------------------


@pytest.fixture
def sources() -> dict[str, FakeRegistry]:
    hub, ghcr = FakeRegistry("hub.test"), FakeRegistry("ghcr.test")
    hub.add_image("qnib/plain", "generic", GENERIC_LAYER, SHARED_LAYER)
    ghcr.add_image("qnib/fast", "skylake", SKYLAKE_LAYER, SHARED_LAYER)
    return {"docker.io": hub, "ghcr.io": ghcr}


def test_a_virtual_tag_serves_the_built_index_and_its_builds_from_their_sources(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sources: dict[str, FakeRegistry]
) -> None:
    registry = in_memory_registry(tmp_path, monkeypatch, sources, anonymous="allow", virtual_images=[SPEC])
    try:
        index = registry.get("/v2/qnib/bench/manifests/latest")
        assert index.status == 200 and index.headers["content-type"] == media.OCI_INDEX
        assert index.headers["docker-content-digest"] == digest_of(index.body)
        # Nothing named qnib/bench was asked of any upstream: the index was built here.
        assert all("qnib/bench" not in path for fake in sources.values() for _, path in fake.requests)
        skylake = json.loads(index.body)["manifests"][1]["digest"]
        child = registry.get(f"/v2/qnib/bench/manifests/{skylake}")
        assert child.status == 200 and digest_of(child.body) == skylake
        layer = registry.get(f"/v2/qnib/bench/blobs/{digest_of(SKYLAKE_LAYER)}")
        assert layer.body == SKYLAKE_LAYER
        assert sources["ghcr.io"].count("GET", f"/v2/qnib/fast/blobs/{digest_of(SKYLAKE_LAYER)}") == 1
        assert registry.get(f"/v2/qnib/bench/manifests/{digest_of(index.body)}").body == index.body
        assert registry.get("/v2/qnib/bench/manifests/other").error()["code"] == "MANIFEST_UNKNOWN"
    finally:
        registry.close()


def test_after_a_restart_a_blob_under_the_virtual_name_still_finds_its_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sources: dict[str, FakeRegistry]
) -> None:
    first = in_memory_registry(tmp_path, monkeypatch, sources, anonymous="allow", virtual_images=[SPEC])
    first.get("/v2/qnib/bench/manifests/latest")
    first.close()
    # A new process: the digest -> source map is empty, and the client asks for a layer first.
    again = in_memory_registry(tmp_path, monkeypatch, sources, anonymous="allow", virtual_images=[SPEC])
    try:
        layer = again.get(f"/v2/qnib/bench/blobs/{digest_of(GENERIC_LAYER)}")
        assert (layer.status, layer.body) == (200, GENERIC_LAYER)
        assert sources["docker.io"].count("GET", f"/v2/qnib/plain/blobs/{digest_of(GENERIC_LAYER)}") == 1
    finally:
        again.close()
