"""The pull-through proxy against real peers: docker-registry upstream; skopeo, podman, ctr clients."""
from __future__ import annotations

import http.client
import json
import os
import threading
import time
from urllib.parse import quote

import pytest

from storage import sha256_digest
from tests.peers import containerd, podman, skopeo
from tests.peers.oci import build_text, make_bench_index, make_image
from tests.peers.registry import Registry
from tests.peers.relay import Relay

from .common import ACCEPT_ALL, request, upstream_blob_path
from .metahub_process import Metahub


@pytest.fixture
def upstream(tmp_path):
    with Registry(tmp_path / "upstream") as registry:
        yield registry


@pytest.fixture
def relay(upstream):
    with Relay(upstream.url) as counting:
        yield counting


@pytest.fixture
def proxy(tmp_path, relay):
    with Metahub(tmp_path / "metahub", {"local": {"url": relay.url}}, default_upstream="local") as hub:
        yield hub


@pytest.fixture
def bench(tmp_path, upstream):
    """A 5-platform index with features, pushed to the upstream as team/bench:1.0."""
    index = make_bench_index(tmp_path / "layout", "1.0", layers=[200_000])
    skopeo.push(tmp_path / "layout", "1.0", f"{upstream.host}/team/bench:1.0")
    return index


def test_skopeo_copies_all_platforms_through_metahub(tmp_path, upstream, proxy, bench) -> None:
    raw = skopeo.inspect_raw(f"{proxy.host}/team/bench:1.0")
    assert raw == bench.manifest == skopeo.inspect_raw(f"{upstream.host}/team/bench:1.0")
    child = bench.images[3]
    assert skopeo.inspect_raw(f"{proxy.host}/team/bench@{child.digest}") == child.manifest
    skopeo.copy_to_dir(f"{proxy.host}/team/bench:1.0", tmp_path / "out", all_platforms=True)
    for image in bench.images:
        for blob in [image.config, *image.layers]:
            data = (tmp_path / "out" / blob.digest.split(":")[1]).read_bytes()
            assert sha256_digest(data) == blob.digest
            assert data == upstream_blob_path(upstream, blob.digest).read_bytes()
    # The same name through the UPSTREAM/NAME prefix is the same image.
    assert skopeo.inspect_raw(f"{proxy.host}/local/team/bench:1.0") == bench.manifest


def test_manifest_head_agrees_with_get(proxy, bench) -> None:
    for reference in ["1.0", bench.digest, bench.images[0].digest]:
        path = f"/v2/team/bench/manifests/{reference}"
        status, got_headers, body = request(proxy.host, "GET", path, {"Accept": ACCEPT_ALL})
        assert status == 200
        assert got_headers["docker-content-digest"] == sha256_digest(body)
        status, head_headers, head_body = request(proxy.host, "HEAD", path, {"Accept": ACCEPT_ALL})
        assert (status, head_body) == (200, b"")
        for header in ("content-type", "content-length", "docker-content-digest"):
            assert head_headers[header] == got_headers[header]
    assert request(proxy.host, "GET", "/v2/team/bench/manifests/1.0")[2] == bench.manifest


def test_podman_pulls_through_metahub(tmp_path, proxy, bench) -> None:
    ref = f"{proxy.host}/team/bench:1.0"
    pulled = podman.pull(ref, tmp_path / "podman", arch="arm64")
    assert pulled.digest == bench.digest
    assert pulled.architecture == "arm64"
    arm64 = bench.images[4]
    assert podman.read_file(ref, tmp_path / "podman", "build.txt") == build_text(arm64.platform)


def test_containerd_pulls_through_metahub_as_a_mirror(tmp_path, relay, proxy, bench) -> None:
    with containerd.Containerd(tmp_path / "containerd") as daemon:
        hosts_dir = tmp_path / "hosts"
        # No usable server behind the mirror: the pull can only succeed through metahub.
        containerd.write_hosts_toml(hosts_dir, relay.host, proxy.url)
        ref = f"{relay.host}/team/bench:1.0"
        containerd.ctr_pull(daemon.address, ref, hosts_dir=hosts_dir, platform="linux/amd64")
        assert containerd.image_digest(daemon.address, ref) == bench.digest
        generic = bench.images[0]
        assert containerd.content(daemon.address, generic.digest) == generic.manifest
    # containerd named the registry it meant with ?ns=, and metahub routed by it.
    assert f"/v2/team/bench/manifests/1.0?ns={quote(relay.host)}" in proxy.log()


def test_concurrent_cold_requests_fetch_upstream_once(tmp_path, upstream, relay, proxy) -> None:
    data = os.urandom(20 << 20)
    image = make_image(tmp_path / "big", "v1", layers=[data])
    skopeo.push(tmp_path / "big", "v1", f"{upstream.host}/team/big:v1")
    layer = image.layers[0]
    relay.reset()
    results: list[tuple[int, str]] = []
    lock = threading.Lock()

    def fetch() -> None:
        status, _, body = request(proxy.host, "GET", f"/v2/team/big/blobs/{layer.digest}")
        with lock:
            results.append((status, sha256_digest(body)))

    threads = [threading.Thread(target=fetch) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert results == [(200, layer.digest)] * 20
    assert relay.blob_gets("team/big", layer.digest) == 1


def assert_refused(host: str, path: str) -> None:
    """The client must not get a complete 200: either the response is cut off (the download was
    under way when it asked) or it is a 502 (the failed download had already ended)."""
    try:
        status, _, body = request(host, "GET", path)
    except (http.client.IncompleteRead, ConnectionError):
        return
    assert status == 502, status
    assert json.loads(body)["errors"][0]["code"] == "UNAVAILABLE"


def test_corrupted_upstream_blob_is_not_cached(tmp_path, upstream, proxy) -> None:
    image = make_image(tmp_path / "img", "v1", layers=[300_000])
    skopeo.push(tmp_path / "img", "v1", f"{upstream.host}/team/bad:v1")
    layer = image.layers[0]
    stored = upstream_blob_path(upstream, layer.digest)
    corrupted = bytearray(stored.read_bytes())
    corrupted[1000] ^= 0xFF
    stored.write_bytes(bytes(corrupted))
    for _ in range(3):
        assert_refused(proxy.host, f"/v2/team/bad/blobs/{layer.digest}")
    hex_ = layer.digest.split(":")[1]
    assert not (proxy.workdir / "store/blobs/sha256" / hex_[:2] / hex_).exists()
    assert os.listdir(proxy.workdir / "store/tmp") == []
    status, _, _ = request(proxy.host, "HEAD", f"/v2/team/bad/blobs/{layer.digest}")
    assert status == 200  # HEAD asks upstream, which still lists the blob; GET still refuses it
    assert "sent wrong bytes" in proxy.log()


def test_cached_image_survives_upstream_loss_and_restart(tmp_path, upstream, relay, bench) -> None:
    upstreams = {"local": {"url": relay.url}}
    with Metahub(tmp_path / "hub", upstreams, cache={"tag_ttl": "0s"}) as proxy:
        ref = f"{proxy.host}/team/bench:1.0"
        skopeo.copy_to_dir(ref, tmp_path / "first", all_platforms=True)
        upstream.stop()
        assert skopeo.inspect_raw(ref) == bench.manifest
        proxy.restart()
        skopeo.copy_to_dir(ref, tmp_path / "again", all_platforms=True)
        assert sorted(os.listdir(tmp_path / "again")) == sorted(os.listdir(tmp_path / "first"))
        # tag_ttl 0 made every tag request revalidate: each found upstream down and said so.
        assert "serving team/bench:1.0 from cache" in proxy.log()


def test_ranges_on_cold_and_cached_blobs(tmp_path, upstream, proxy) -> None:
    data = os.urandom(1 << 20)
    image = make_image(tmp_path / "r", "v1", layers=[data])
    skopeo.push(tmp_path / "r", "v1", f"{upstream.host}/team/range:v1")
    blob = upstream_blob_path(upstream, image.layers[0].digest).read_bytes()
    path = f"/v2/team/range/blobs/{image.layers[0].digest}"
    for _ in ("cold", "cached"):
        status, headers, body = request(proxy.host, "GET", path, {"Range": "bytes=100-199"})
        assert (status, body) == (206, blob[100:200])
        assert headers["content-range"] == f"bytes 100-199/{len(blob)}"
    status, headers, _ = request(proxy.host, "GET", path, {"Range": f"bytes={len(blob)}-"})
    assert status == 416 and json.loads(_)["errors"][0]["code"] == "RANGE_INVALID"
    status, headers, body = request(proxy.host, "GET", path, {"Range": "bytes=-10"})
    assert (status, body) == (206, blob[-10:])


def test_errors_are_oci_json(proxy, bench) -> None:
    cases = [
        ("GET", "/v2/Team/Bench/manifests/1.0", 400, "NAME_INVALID"),
        ("GET", "/v2/team/bench/manifests/nope", 404, "MANIFEST_UNKNOWN"),
        ("GET", "/v2/team/bench/blobs/sha256:" + "0" * 64, 404, "BLOB_UNKNOWN"),
        ("GET", "/v2/team/bench/blobs/sha256:../../etc/passwd", 400, "DIGEST_INVALID"),
        ("GET", "/v2/team/bench/blobs/md5:abc", 400, "DIGEST_INVALID"),
        ("PUT", "/v2/team/bench/manifests/1.0", 405, "UNSUPPORTED"),
        ("DELETE", "/v2/team/bench/manifests/1.0", 405, "UNSUPPORTED"),
        ("POST", "/v2/team/bench/blobs/uploads/", 405, "UNSUPPORTED"),
        ("GET", "/v2/nobody/here/manifests/latest", 404, None),
    ]
    for method, path, status, code in cases:
        got_status, headers, body = request(proxy.host, method, path)
        assert got_status == status, (method, path, body)
        assert headers["content-type"] == "application/json"
        errors = json.loads(body)["errors"]
        if code:
            assert errors[0]["code"] == code, (method, path, body)


def test_tags_list_pages_from_upstream(tmp_path, upstream, proxy) -> None:
    make_image(tmp_path / "t", "a", layers=[b"x"])
    for tag in ["a", "b", "c"]:
        skopeo.push(tmp_path / "t", "a", f"{upstream.host}/team/tags:{tag}")
    status, headers, body = request(proxy.host, "GET", "/v2/team/tags/tags/list?n=2")
    assert status == 200
    assert json.loads(body) == {"name": "team/tags", "tags": ["a", "b"]}
    assert "/v2/team/tags/tags/list?" in headers["link"]
    status, _, body = request(proxy.host, "GET", "/v2/team/tags/tags/list?n=2&last=b")
    assert json.loads(body)["tags"] == ["c"]


@pytest.mark.parametrize("auth", ["htpasswd", "token"])
def test_authenticated_upstreams(tmp_path, auth: str) -> None:
    with Registry(tmp_path / "up", auth=auth) as upstream:
        make_image(tmp_path / "l", "v1", layers=[b"secret layer"])
        skopeo.push(tmp_path / "l", "v1", f"{upstream.host}/team/private:v1", creds=upstream.creds)
        secret = tmp_path / "password"
        secret.write_text(upstream.password + "\n")
        upstreams = {"private": {"url": upstream.url, "username": upstream.username, "password_file": str(secret)}}
        with Metahub(tmp_path / "hub", upstreams) as hub:
            skopeo.copy_to_dir(f"{hub.host}/team/private:v1", tmp_path / "out")
            assert upstream.password not in hub.log()


def test_a_cached_blob_does_not_leak_to_another_repository(tmp_path, upstream, proxy) -> None:
    secret = make_image(tmp_path / "a", "v1", layers=[os.urandom(5000)])
    skopeo.push(tmp_path / "a", "v1", f"{upstream.host}/team/private:v1")
    make_image(tmp_path / "b", "v1", layers=[b"public"])
    skopeo.push(tmp_path / "b", "v1", f"{upstream.host}/team/public:v1")
    layer = secret.layers[0].digest
    assert request(proxy.host, "GET", f"/v2/team/private/blobs/{layer}")[0] == 200  # now cached
    for method in ("GET", "HEAD"):
        status, _, body = request(proxy.host, method, f"/v2/team/public/blobs/{layer}")
        assert status == 404, (method, body)
    # A repository that does hold the same layer upstream gets it (confirmed, then linked).
    skopeo.push(tmp_path / "a", "v1", f"{upstream.host}/team/fork:v1")
    status, _, body = request(proxy.host, "GET", f"/v2/team/fork/blobs/{layer}")
    assert status == 200 and sha256_digest(body) == layer


def test_metrics_count_hits_misses_and_upstream_fetches(tmp_path, upstream, proxy) -> None:
    image = make_image(tmp_path / "m", "v1", layers=[os.urandom(10_000)])
    skopeo.push(tmp_path / "m", "v1", f"{upstream.host}/team/m:v1")
    digest = image.layers[0].digest
    assert request(proxy.host, "GET", f"/v2/team/m/blobs/{digest}")[0] == 200
    # The client has every byte once they verified; the fsync and rename come after. A request
    # before the rename would follow the download rather than hit the cache.
    stored = proxy.workdir / "store" / "blobs" / "sha256" / digest[7:9] / digest[7:]
    deadline = time.monotonic() + 10
    while not stored.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    for _ in range(2):
        assert request(proxy.host, "GET", f"/v2/team/m/blobs/{digest}")[0] == 200
    status, headers, body = request(proxy.host, "GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    lines = body.decode().splitlines()

    def value(prefix: str) -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(prefix))

    assert value('metahub_upstream_fetches_total{kind="blob",upstream="local"}') == 1
    assert value('metahub_cache_lookups_total{kind="blob",result="hit"}') == 2
    assert value('metahub_bytes_served_total{source="cache"}') == 2 * image.layers[0].size
    assert value('metahub_bytes_served_total{source="upstream"}') == image.layers[0].size
    assert value('metahub_requests_total{method="GET",route="blobs",status="200"}') == 3


def test_access_log_can_be_turned_off(tmp_path, relay, bench) -> None:
    with Metahub(tmp_path / "quiet", {"local": {"url": relay.url}}, access_log=False) as hub:
        assert request(hub.host, "GET", "/v2/team/bench/manifests/1.0")[0] == 200
        hub.stop()
        assert '"GET /v2/team/bench/manifests/1.0' not in hub.log()
        assert "metahub serving the registry API" in hub.log()
