"""The real-peer harness proven against the real programs, with no metahub involved.

If these fail, integration tests of metahub cannot be trusted either way, so each check here is
one thing a later test leans on: bytes survive a push, auth really is enforced, every client can
pull, and the relay's counts are exact.
"""
import base64
import http.client
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.peers import containerd as ctr
from tests.peers import oci, podman, skopeo
from tests.peers.containerd import Containerd
from tests.peers.process import PeerError
from tests.peers.registry import Registry
from tests.peers.relay import Relay
from tests.peers.require import require_binary

RegistryFactory = Callable[..., Registry]


def get(host: str, path: str, headers: dict[str, str] | None = None) -> http.client.HTTPResponse:
    host_name, _, port = host.rpartition(":")
    connection = http.client.HTTPConnection(host_name, int(port), timeout=10)
    connection.request("GET", path, headers=headers or {})
    response = connection.getresponse()
    response.read()
    connection.close()
    return response


def basic(creds: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(creds.encode()).decode()}


@pytest.mark.parametrize("ci", ["true", "1", "TRUE"])
def test_missing_peer_fails_in_ci(monkeypatch: pytest.MonkeyPatch, ci: str) -> None:
    monkeypatch.setenv("CI", ci)
    with pytest.raises(pytest.fail.Exception, match="no-such-peer"):
        require_binary("no-such-peer")


@pytest.mark.parametrize("ci", ["false", "", None])
def test_missing_peer_skips_outside_ci(monkeypatch: pytest.MonkeyPatch, ci: str | None) -> None:
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    with pytest.raises(pytest.skip.Exception):
        require_binary("no-such-peer")


def test_single_image_push_round_trips_the_manifest(registry: Registry, layout_dir: Path,
                                                    tmp_path: Path) -> None:
    image = oci.make_image(layout_dir, "v1", [256 * 1024], files={"hello.txt": b"hello\n"})
    skopeo.push(layout_dir, "v1", f"{registry.host}/team/app:v1")

    assert skopeo.inspect_raw(f"{registry.host}/team/app:v1") == image.manifest
    skopeo.copy_to_dir(f"{registry.host}/team/app:v1", tmp_path / "copy")
    for layer in image.layers:
        assert (tmp_path / "copy" / layer.digest[7:]).stat().st_size == layer.size


def test_bench_index_push_keeps_platform_features(registry: Registry, layout_dir: Path) -> None:
    index = oci.make_bench_index(layout_dir, "latest")
    skopeo.push(layout_dir, "latest", f"{registry.host}/qnib/bench:latest")

    raw = skopeo.inspect_raw(f"{registry.host}/qnib/bench:latest")
    assert raw == index.manifest
    features = [entry["platform"].get("features") for entry in json.loads(raw)["manifests"]]
    assert features == [None, ["cpu:skylake"], ["cpu:broadwell"], ["cpu:broadwell", "nvcap:5.2"],
                        None]
    for image in index.images:
        assert skopeo.inspect_raw(f"{registry.host}/qnib/bench@{image.digest}") == image.manifest


def test_htpasswd_registry_demands_credentials(registry_factory: RegistryFactory,
                                               layout_dir: Path) -> None:
    registry = registry_factory(auth="htpasswd")
    oci.make_image(layout_dir, "v1", files={"a.txt": b"a"})
    assert registry.creds is not None

    assert get(registry.host, "/v2/").status == 401
    assert get(registry.host, "/v2/", basic("tester:wrong")).status == 401
    assert get(registry.host, "/v2/", basic(registry.creds)).status == 200
    with pytest.raises(PeerError, match="unauthorized"):
        skopeo.push(layout_dir, "v1", f"{registry.host}/team/app:v1")
    skopeo.push(layout_dir, "v1", f"{registry.host}/team/app:v1", creds=registry.creds)
    assert skopeo.inspect_raw(f"{registry.host}/team/app:v1", creds=registry.creds)


def test_token_registry_runs_the_bearer_flow(registry_factory: RegistryFactory,
                                             layout_dir: Path) -> None:
    registry = registry_factory(auth="token")
    image = oci.make_image(layout_dir, "v1", files={"a.txt": b"a"})
    assert registry.token_server is not None and registry.creds is not None

    challenge = get(registry.host, "/v2/").getheader("WWW-Authenticate", "")
    assert challenge.startswith(f'Bearer realm="{registry.token_server.realm}"')
    with pytest.raises(PeerError, match="unauthorized"):
        skopeo.push(layout_dir, "v1", f"{registry.host}/team/app:v1", creds="tester:wrong")
    skopeo.push(layout_dir, "v1", f"{registry.host}/team/app:v1", creds=registry.creds)
    assert skopeo.inspect_raw(f"{registry.host}/team/app:v1", creds=registry.creds) == image.manifest
    assert registry.token_server.issued >= 2


def test_podman_pulls_the_platform_build(registry: Registry, layout_dir: Path,
                                         tmp_path: Path) -> None:
    index = oci.make_bench_index(layout_dir, "latest")
    skopeo.push(layout_dir, "latest", f"{registry.host}/qnib/bench:latest")
    ref = f"{registry.host}/qnib/bench:latest"

    amd64 = podman.pull(ref, tmp_path / "podman")
    assert amd64.digest == index.digest
    assert f"{registry.host}/qnib/bench@{index.images[0].digest}" in amd64.repo_digests
    assert podman.read_file(ref, tmp_path / "podman", "build.txt") == \
        oci.build_text(oci.BENCH_PLATFORMS[0])
    arm64 = podman.pull(ref, tmp_path / "podman", arch="arm64")
    assert arm64.architecture == "arm64"
    assert podman.read_file(ref, tmp_path / "podman", "/build.txt") == \
        oci.build_text(oci.BENCH_PLATFORMS[4])


def test_ctr_pulls_over_plain_http(registry: Registry, containerd: Containerd,
                                   layout_dir: Path) -> None:
    index = oci.make_bench_index(layout_dir, "latest")
    skopeo.push(layout_dir, "latest", f"{registry.host}/qnib/bench:latest")

    ctr.ctr_pull(containerd.address, f"{registry.host}/qnib/bench:latest")
    assert ctr.image_digest(containerd.address, f"{registry.host}/qnib/bench:latest") == index.digest
    assert ctr.content(containerd.address, index.digest) == index.manifest


def test_ctr_mirror_requests_carry_ns(registry: Registry, containerd: Containerd,
                                      relay_factory: Callable[[str], Relay], layout_dir: Path,
                                      tmp_path: Path) -> None:
    image = oci.make_image(layout_dir, "v1", files={"a.txt": b"mirrored"})
    skopeo.push(layout_dir, "v1", f"{registry.host}/team/app:v1")
    mirror = relay_factory(registry.host)
    ctr.write_hosts_toml(tmp_path / "hosts", "upstream.test:5000", mirror.url)

    ctr.ctr_pull(containerd.address, "upstream.test:5000/team/app:v1", plain_http=False,
                 hosts_dir=tmp_path / "hosts")
    assert mirror.requests
    # The colon arrives percent-encoded: a server must decode the query before matching hosts.
    assert all(target.endswith("?ns=upstream.test%3A5000") for _, target, _ in mirror.requests)
    assert mirror.blob_gets("team/app", image.layers[0].digest) == 1


def test_ctr_pulls_with_token_auth(registry_factory: RegistryFactory, containerd: Containerd,
                                   layout_dir: Path) -> None:
    registry = registry_factory(auth="token")
    oci.make_image(layout_dir, "v1", files={"a.txt": b"a"})
    skopeo.push(layout_dir, "v1", f"{registry.host}/team/app:v1", creds=registry.creds)

    with pytest.raises(PeerError, match="failed to authorize"):
        ctr.ctr_pull(containerd.address, f"{registry.host}/team/app:v1")
    ctr.ctr_pull(containerd.address, f"{registry.host}/team/app:v1", user=registry.creds)


def test_relay_counts_one_blob_get(registry: Registry, relay_factory: Callable[[str], Relay],
                                   layout_dir: Path, tmp_path: Path) -> None:
    image = oci.make_image(layout_dir, "v1", [3 * 1024 * 1024])
    skopeo.push(layout_dir, "v1", f"{registry.host}/team/app:v1")
    relay = relay_factory(registry.host)

    skopeo.copy_to_dir(f"{relay.host}/team/app:v1", tmp_path / "copy")
    layer = image.layers[0]
    assert relay.blob_gets("team/app", layer.digest) == 1
    assert relay.bytes_by_path[f"/v2/team/app/blobs/{layer.digest}"] == layer.size
    assert (tmp_path / "copy" / layer.digest[7:]).stat().st_size == layer.size


def test_proxy_registry_serves_upstream_then_its_cache(registry_factory: RegistryFactory,
                                                       relay_factory: Callable[[str], Relay],
                                                       layout_dir: Path, tmp_path: Path) -> None:
    upstream = registry_factory()
    image = oci.make_image(layout_dir, "v1", [1024 * 1024])
    skopeo.push(layout_dir, "v1", f"{upstream.host}/team/app:v1")
    counted = relay_factory(upstream.host)
    proxy = registry_factory(proxy_of=counted.url)
    layer = image.layers[0]

    skopeo.copy_to_dir(f"{proxy.host}/team/app:v1", tmp_path / "cold")
    # distribution 2.8 fetches a cold blob twice: one stream for the client, one to store.
    assert 1 <= counted.blob_gets("team/app", layer.digest) <= 2
    counted.reset()
    skopeo.copy_to_dir(f"{proxy.host}/team/app:v1", tmp_path / "warm")
    assert counted.blob_gets("team/app", layer.digest) == 0
    assert skopeo.inspect_raw(f"{proxy.host}/team/app:v1") == image.manifest
    assert (tmp_path / "warm" / layer.digest[7:]).read_bytes() == \
        (layout_dir / "blobs" / "sha256" / layer.digest[7:]).read_bytes()
