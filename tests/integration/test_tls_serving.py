"""metahub serving HTTPS itself (``--listen ssl:...``): every real client pulls over it with
certificate verification on, trusting the test's CA the way that client is configured to.

The upstream is a plain-HTTP docker-registry; only the client side is TLS here. Each client also
fails without the CA, which is what shows that its verification is really on (dockerd, for one,
silently skips it for registries on 127.0.0.0/8; see tests/peers/dockerd.py).
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from storage import sha256_digest
from tests.peers import containerd as ctr
from tests.peers import podman, skopeo
from tests.peers.connect_proxy import ConnectProxy
from tests.peers.dockerd import Dockerd, TrustedCA
from tests.peers.oci import ImageIndex, make_bench_index
from tests.peers.process import PeerError
from tests.peers.registry import Registry
from tests.peers.tls import make_ca

from .metahub_process import Metahub, ServerTLS

#: How dockerd calls metahub: a name that does not resolve, reached through ConnectProxy.
DOCKER_NAME = "metahub.test"
UNKNOWN_CA = "unknown authority"  # what Go (ctr, dockerd, skopeo, podman) says without the CA


@dataclass(frozen=True)
class World:
    hub: Metahub
    index: ImageIndex
    upstream_digest: str
    cert_dir: Path  # holds only the CA, as ca.crt
    ca_path: Path
    root: Path

    def ref(self, host: str | None = None) -> str:
        return f"{host or self.hub.host}/team/bench:1.0"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """A bench index upstream, and metahub in front of it serving HTTPS on a certificate from a
    CA of the test's own, valid for 127.0.0.1 and for the name dockerd uses."""
    root = tmp_path_factory.mktemp("tls-serving")
    ca = make_ca(root / "ca")
    cert_path, key_path = ca.issue(root / "server", "metahub", hosts=["127.0.0.1", DOCKER_NAME])
    with Registry(root / "upstream") as upstream:
        index = make_bench_index(root / "layout", "1.0", layers=[20_000])
        skopeo.push(root / "layout", "1.0", f"{upstream.host}/team/bench:1.0")
        upstream_digest = sha256_digest(skopeo.inspect_raw(f"{upstream.host}/team/bench:1.0"))
        tls = ServerTLS(cert_path, key_path, ca.cert_path)
        with Metahub(root / "hub", {"local": {"url": upstream.url}}, tls=tls,
                     default_upstream="local") as hub:
            yield World(hub, index, upstream_digest, ca.cert_path.parent, ca.cert_path, root)


def test_the_upstream_serves_the_index_we_built(world: World) -> None:
    assert world.upstream_digest == world.index.digest
    assert world.hub.url.startswith("https://")


def test_skopeo_pulls_over_tls_with_its_cert_dir(world: World) -> None:
    out = world.root / "skopeo-out"
    skopeo.copy_to_dir(world.ref(), out, all_platforms=True, cert_dir=world.cert_dir)
    assert sha256_digest((out / "manifest.json").read_bytes()) == world.upstream_digest
    for blob in world.index.images[0].layers:
        assert sha256_digest((out / blob.digest.split(":")[1]).read_bytes()) == blob.digest


def test_podman_pulls_over_tls_with_its_cert_dir(world: World) -> None:
    pulled = podman.pull(world.ref(), world.root / "podman", cert_dir=world.cert_dir)
    assert pulled.digest == world.upstream_digest


def _hosts_dir(world: World, directory: Path, trust: bool) -> Path:
    """A ctr ``--hosts-dir`` naming metahub as an HTTPS host, with the CA in the host entry."""
    (directory / world.hub.host).mkdir(parents=True)
    ca_line = f'  ca = "{world.ca_path}"\n' if trust else ""
    (directory / world.hub.host / "hosts.toml").write_text(
        f'server = "{world.hub.url}"\n\n[host."{world.hub.url}"]\n'
        f'  capabilities = ["pull", "resolve"]\n{ca_line}')
    return directory


def test_ctr_pulls_over_tls_with_a_hosts_toml_ca(world: World, containerd: ctr.Containerd) -> None:
    hosts_dir = _hosts_dir(world, world.root / "hosts-trusted", trust=True)
    ctr.ctr_pull(containerd.address, world.ref(), plain_http=False, hosts_dir=hosts_dir)
    assert ctr.image_digest(containerd.address, world.ref()) == world.upstream_digest


@pytest.fixture
def docker_proxy(world: World) -> Iterator[ConnectProxy]:
    with ConnectProxy(DOCKER_NAME, world.hub.port) as proxy:
        yield proxy


def test_dockerd_pulls_over_tls_once_certs_d_has_the_ca(world: World, docker_proxy: ConnectProxy) -> None:
    """Refused without the CA, then pulls by name and as Docker Hub's mirror once the CA is in
    /etc/docker/certs.d/HOST:PORT, with no restart in between."""
    host = f"{DOCKER_NAME}:{world.hub.port}"
    with Dockerd(world.root / "dockerd", registry_mirrors=[f"https://{host}"],
                 https_proxy=docker_proxy.url) as engine:
        with pytest.raises(PeerError, match=UNKNOWN_CA):
            engine.pull(world.ref(host))
        assert docker_proxy.tunnels > 0  # it did reach metahub, and refused its certificate
        with TrustedCA(host, world.ca_path):
            assert world.upstream_digest in engine.pull(world.ref(host)).digests()
            # docker.io/team/bench: the mirror, or Docker Hub through a proxy that refuses it.
            mirrored = engine.pull("team/bench:1.0")
            assert f"team/bench@{world.upstream_digest}" in mirrored.repo_digests


# Without the CA the other clients refuse too: that verification is on is what these prove.

def test_skopeo_refuses_without_the_ca(world: World) -> None:
    empty = world.root / "no-ca-skopeo"
    empty.mkdir()
    with pytest.raises(PeerError, match=UNKNOWN_CA):
        skopeo.inspect_raw(world.ref(), cert_dir=empty)


def test_podman_refuses_without_the_ca(world: World) -> None:
    empty = world.root / "no-ca-podman"
    empty.mkdir()
    with pytest.raises(PeerError, match=UNKNOWN_CA):
        podman.pull(world.ref(), world.root / "podman-untrusted", cert_dir=empty)


def test_ctr_refuses_without_the_ca(world: World, containerd: ctr.Containerd) -> None:
    hosts_dir = _hosts_dir(world, world.root / "hosts-untrusted", trust=False)
    with pytest.raises(PeerError, match=UNKNOWN_CA):
        ctr.ctr_pull(containerd.address, world.ref(), plain_http=False, hosts_dir=hosts_dir)
